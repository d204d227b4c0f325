"""The peak FLOP/s: /proc/cpuinfo parsing, the theoretical CPU peak, the measured peak's cache,
and the choice between them. No test depends on this machine's speed: peaks are injected."""

import json

import pytest
import torch

from estimate.hardware import Peak
from model.precision import precision
from train.clock import (
    CpuInfo,
    MachinePeak,
    PeakSampler,
    choose_cpu_peak,
    cpu_machine_peak,
    flops_per_cycle,
    parse_cpuinfo,
    peak_cache_path,
    rate_precision,
    theoretical_cpu_peak,
)

CPUINFO = """processor\t: {i}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Test CPU @ 2.00GHz
cpu MHz\t\t: {mhz}
physical id\t: 0
core id\t\t: {core}
flags\t\t: fpu sse2 avx fma avx2 {extra}
"""


def cpuinfo_text(cores=2, smt=2, extra="", mhz=2000.0):
    """`cores` physical cores with `smt` hardware threads each."""
    return "\n".join(CPUINFO.format(i=i, core=i % cores, mhz=mhz, extra=extra)
                     for i in range(cores * smt))


def cpu(flags, vendor="GenuineIntel", family=6, cores=4, logical=8, mhz=3000.0):
    return CpuInfo("test cpu", vendor, family, 1, frozenset(flags.split()), logical, cores, mhz,
                   "test clock")


def test_parse_cpuinfo_counts_physical_cores_and_prefers_the_sys_clock():
    info = parse_cpuinfo(cpuinfo_text(cores=2, smt=2))
    assert (info.logical, info.cores, info.clock_mhz) == (4, 2, 2000.0)
    assert "cpu MHz" in info.clock_source and "avx2" in info.flags
    info = parse_cpuinfo(cpuinfo_text(cores=2, smt=2), max_freq_khz={0: 3.5e6, 1: 3.4e6})
    assert info.clock_mhz == 3500.0 and "cpuinfo_max_freq" in info.clock_source
    slow_now = parse_cpuinfo(cpuinfo_text(cores=2, smt=2, mhz=1200.0))  # "@ 2.00GHz" is higher
    assert slow_now.clock_mhz == 2000.0 and "nominal" in slow_now.clock_source
    only_two = parse_cpuinfo(cpuinfo_text(cores=2, smt=2), cpus={0, 1})  # the affinity set
    assert (only_two.logical, only_two.cores) == (2, 2)


def test_theoretical_peak_is_cores_times_flop_per_cycle_times_clock():
    avx2 = cpu("avx fma avx2")
    peak = theoretical_cpu_peak("fp32", avx2)
    assert peak.flops == pytest.approx(4 * 32 * 3.0e9)
    assert "4 cores x 32 FLOP/cycle" in peak.source and "test clock" in peak.source
    assert flops_per_cycle(cpu("avx fma avx2 avx512f"), "fp32")[0] == 64
    zen4 = cpu("avx fma avx2 avx512f avx512_bf16", vendor="AuthenticAMD", family=0x19)
    assert flops_per_cycle(zen4, "fp32")[0] == 32 and flops_per_cycle(zen4, "bf16")[0] == 64
    assert flops_per_cycle(cpu("avx fma avx2 avx512f amx_bf16"), "bf16")[0] == 1024
    assert theoretical_cpu_peak("fp32", cpu("sse2 neon")) is None  # unknown ISA: measured only


def test_bf16_without_native_support_is_the_fp32_rate_and_says_so():
    plain = cpu("avx fma avx2 avx512f")
    rate, note = rate_precision("bf16", plain.flags)
    assert rate == "fp32" and "no native support" in note and "avx512_bf16" in note
    assert theoretical_cpu_peak("bf16", plain).flops == theoretical_cpu_peak("fp32", plain).flops
    assert theoretical_cpu_peak("bf16", plain).source.startswith("theoretical fp32")
    native = cpu("avx fma avx2 avx512f avx512_bf16")
    assert rate_precision("bf16", native.flags) == ("bf16", None)
    assert theoretical_cpu_peak("bf16", native).flops == 2 * theoretical_cpu_peak("fp32", native).flops


def measurer(*figures):
    """A fake matmul measurement returning `figures` in turn; `calls` records each call."""
    calls = []

    def measure(catalog, info):
        calls.append(catalog)
        return Peak(figures[len(calls) - 1], f"fake {catalog}")

    return measure, calls


def test_measured_peak_learns_upward_only(tmp_path, caplog):
    """Every run measures; the cache keeps the highest figure, with when it was measured; a run
    measuring under half the cache says so in one line and keeps the cache."""
    info = cpu("avx fma avx2", mhz=100.0)  # theoretical 4 x 32 x 0.1 GHz = 12.8 GFLOP/s
    measure, calls = measurer(1e10, 3e10, 2e10, 1e10)
    seen = [cpu_machine_peak("fp32", info, cache_dir=tmp_path, measure=measure)
            for _ in range(3)]
    assert [p.measured["flops"] for p in seen] == [1e10, 3e10, 3e10]
    assert [p.method for p in seen] == ["theoretical", "measured", "measured"]
    assert seen[1].flops == 3e10 and "; measured 20" in seen[1].source  # the UTC time
    assert seen[0].measured["cache"] == str(peak_cache_path("fp32", info, tmp_path))
    with caplog.at_level("WARNING", logger="train"):
        last = cpu_machine_peak("fp32", info, cache_dir=tmp_path, measure=measure)
    assert calls == ["fp32"] * 4 and last.measured["flops"] == 3e10
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "this run measured 0.01 TFLOP/s, under half the cached" in lines[0]
    assert "under half the cached" in last.note
    cpu_machine_peak("bf16", cpu("avx fma avx2 avx512_bf16"), cache_dir=tmp_path,
                     measure=measurer(1e11)[0])  # another dtype (and another CPU): another entry
    assert len(list(tmp_path.glob("peak-*.json"))) == 2


def test_a_cached_peak_far_above_the_theoretical_one_is_not_believed(tmp_path, caplog):
    """Issue 22, item 9: a cache file claiming 1e16 FLOP/s (MFU 0.0%) is replaced."""
    info = cpu("avx fma avx2")  # theoretical 384 GFLOP/s
    path = peak_cache_path("fp32", info, tmp_path)
    path.write_text('{"flops": 1e16, "source": "forged"}')
    with caplog.at_level("WARNING", logger="train"):
        peak = cpu_machine_peak("fp32", info, cache_dir=tmp_path, measure=measurer(3e11)[0])
    assert peak.method == "theoretical" and peak.measured["flops"] == 3e11
    assert "over 4x the theoretical 0.384 TFLOP/s: not believed" in caplog.text
    assert json.loads(path.read_text())["flops"] == 3e11


def test_a_measured_peak_far_below_the_theoretical_one_is_named(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="train"):
        peak = cpu_machine_peak("fp32", cpu("avx fma avx2"), cache_dir=tmp_path,
                                measure=measurer(1e11)[0])
    assert peak.method == "theoretical"
    assert "the best measured peak 0.1 TFLOP/s is under half the theoretical" in caplog.text
    assert "under half the theoretical" in peak.note


def test_only_the_local_main_process_measures_and_the_others_read_its_cache(tmp_path):
    calls, order = [], []
    info = cpu("avx fma avx2")

    def measure(catalog, _):
        calls.append(catalog)
        return Peak(1e11, "fake")

    # A non-main rank reaches the barrier first, then reads what the main rank wrote.
    cpu_machine_peak("fp32", info, local_main=True, cache_dir=tmp_path, measure=measure,
                     barrier=lambda: order.append("barrier"))
    other = cpu_machine_peak("fp32", info, local_main=False, cache_dir=tmp_path, measure=measure,
                             barrier=lambda: order.append("barrier"))
    assert calls == ["fp32"] and order == ["barrier", "barrier"]
    assert other.measured["flops"] == 1e11


def test_the_theoretical_figure_is_used_unless_the_matmul_beats_it():
    theo, slow, fast = Peak(4e11, "theo"), Peak(1e11, "meas"), Peak(5e11, "meas")
    assert choose_cpu_peak(theo, slow, "fp32").method == "theoretical"
    beaten = choose_cpu_peak(theo, fast, "fp32")
    assert beaten.method == "measured" and beaten.flops == 5e11 and "beat" in beaten.note
    assert choose_cpu_peak(None, slow, "fp32").method == "measured"


def test_peak_per_process_is_the_machine_peak_over_the_processes_on_the_host(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)
    machine = MachinePeak(8e11, "theoretical", "theo", "fp32",
                          theoretical={"flops": 8e11, "source": "theo"},
                          measured={"flops": 3e11, "source": "meas"})
    one = PeakSampler(torch.device("cpu"), precision("fp32"), machine=machine)
    four = PeakSampler(torch.device("cpu"), precision("fp32"), world=4, machine=machine)
    assert one.median() == 8e11 and four.median() == 2e11  # LOCAL_WORLD_SIZE unset: world
    assert four.spread() == {"median": 2e11, "min": 2e11, "max": 2e11, "samples": [2e11],
                             "source": four.source}
    text = four.describe()
    assert "0.2 TFLOP/s = 0.8 TFLOP/s machine peak / 4 processes" in text
    assert "theoretical machine peak: 0.8 TFLOP/s (theo) [used]" in text
    assert "measured machine peak: 0.3 TFLOP/s" in text


def test_local_processes_follow_local_world_size(monkeypatch):
    machine = MachinePeak(8e11, "theoretical", "theo", "fp32")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 of 4 processes on this host
    sampler = PeakSampler(torch.device("cpu"), precision("fp32"), world=4, machine=machine)
    assert sampler.processes_on_host == 2 and sampler.median() == 4e11


def test_a_gpu_keeps_its_catalog_peak_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # one process per GPU: no sharing
    sampler = PeakSampler(torch.device("cuda", 0), precision("bf16"), world=8)
    assert sampler.machine.method == "catalog" and sampler.processes_on_host == 1
    assert sampler.source.startswith("catalog:")  # contracts.run.RunSummary.peak_from_catalog
    assert sampler.median() == sampler.machine.flops > 1e14


def test_float8_matmul_rates_use_the_scaled_matmul():
    """The fp8 peak of a GPU missing from the catalog is measured with torch._scaled_mm (a
    plain matmul has no float8 kernel); on CPU where this torch has the kernel too."""
    from train.clock import matmul_rates

    try:
        rates = matmul_rates(torch.float8_e4m3fn, "cpu", n=64, seconds=0.0, min_calls=2)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no float8 scaled matmul on this CPU build: {e}")
    assert len(rates) >= 2 and all(r > 0 for r in rates)
