"""Issue 15 item 6: an MFU above 100% shown as a measurement, and an MFU that did not track
throughput (the CPU peak was re-measured per process, with its own threads, at every sample).
Fast: the peak is injected or the matmul faked, so nothing depends on this machine's speed."""

import logging
from types import SimpleNamespace

import pytest
import torch

import train.clock as clock
from model.precision import precision
from train.config import TrainConfig
from train.metrics import MetricsLog, RunInfo, StepResult, summarize

MODEL_FLOPS = 1e6  # per token


class FixedPeaks:
    """A peak object with the old and the new interface: one per-process figure."""

    def __init__(self, per_process: float):
        self.per = per_process
        self.device = torch.device("cpu")
        self.machine = (clock.MachinePeak(per_process, "theoretical", "injected", "fp32")
                        if hasattr(clock, "MachinePeak") else None)  # None before the fix
        self.processes_on_host = 1
        self.source = "injected"
        self.samples = [per_process]

    def median(self):
        return self.per

    def spread(self):
        return {"median": self.per, "min": self.per, "max": self.per, "samples": [self.per],
                "source": "injected"}


def info(world=1):
    return RunInfo(steps=10, world_size=world, device="cpu", params=1, seq_len=8,
                   model_flops_per_token=MODEL_FLOPS, hardware_flops_per_token=MODEL_FLOPS,
                   techniques={"compile": False}, threads_per_process=1)


def step(metrics, n, tokens_per_s):
    timer = SimpleNamespace(total=lambda: 1.0, phases={"data_wait_s": 0.0, "fwd_bwd_s": 1.0,
                                                       "optim_s": 0.0})
    record = metrics.step_record(n, 1e-3, StepResult(1.0, 1.0, tokens_per_s, False, False),
                                 n * int(tokens_per_s), timer)
    metrics.write(record)
    return record


def test_summary_flags_any_step_above_100_percent_with_count_and_max(tmp_path, caplog):
    """Two of eight steps above 100% (the median is not): the summary counts them, gives the
    highest, and the log warns once."""
    metrics = MetricsLog(tmp_path / "metrics.jsonl", True, info(), FixedPeaks(1e9))
    metrics.write({"step": 0, "val_loss": 5.0})
    with caplog.at_level(logging.WARNING, logger="train"):
        for n, tok_s in enumerate([500, 500, 500, 1200, 600, 1500, 500, 500], start=1):
            step(metrics, n, float(tok_s))  # MFU = tok_s * 1e6 / 1e9
    metrics.records[-1]["val_loss"] = 4.0
    cfg = TrainConfig(warmup_steps_excluded=0)
    state = SimpleNamespace(skipped_steps=0, initial_val_loss=5.0)
    summary = summarize(cfg, info(), metrics, state)
    assert summary["mfu"]["median"] < 1
    assert summary["mfu_above_100_percent"] is True
    above = summary["mfu_steps_above_100_percent"]
    assert above["count"] == 2 and above["max"] == pytest.approx(1.5) and above["steps"] == [4, 6]
    warnings = [r for r in caplog.records if "above 100%" in r.getMessage()]
    assert len(warnings) == 1 and "step 4" in warnings[0].getMessage()


def test_no_flag_when_every_step_is_below_100_percent(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl", False, info(), FixedPeaks(1e9))
    metrics.write({"step": 0, "val_loss": 5.0})
    for n in range(1, 4):
        step(metrics, n, 500.0)
    metrics.records[-1]["val_loss"] = 4.0
    summary = summarize(TrainConfig(warmup_steps_excluded=0), info(), metrics,
                        SimpleNamespace(skipped_steps=0, initial_val_loss=5.0))
    assert summary["mfu_above_100_percent"] is False
    assert summary["mfu_steps_above_100_percent"]["count"] == 0


@pytest.fixture
def sublinear_matmul(monkeypatch, tmp_path):
    """A matmul whose rate grows slower than its thread count (as real ones do), in a fresh
    peak cache, on a CPU whose ISA the theoretical table does not know (so the measured figure
    is the one used)."""
    monkeypatch.setenv("TOKENCLOCK_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)
    machine = clock.CpuInfo("fake", "fake", None, None, frozenset(), 2, 2, None, "none")
    monkeypatch.setattr(clock, "cpu_info", lambda: machine)
    monkeypatch.setattr(clock, "matmul_rates",
                        lambda *a, **k: [1e10 * torch.get_num_threads() ** 0.7] * 3)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


@pytest.mark.parametrize("split", [(1, 2), (2, 1)], ids=["1proc_x_2threads", "2procs_x_1thread"])
def test_mfu_is_the_same_for_the_same_throughput_whatever_the_split(sublinear_matmul, tmp_path,
                                                                    split):
    """884 tok/s on one host gives one MFU, whether 1 process x 2 threads or 2 x 1."""
    procs, threads = split
    sublinear_matmul.setenv("LOCAL_WORLD_SIZE", str(procs))
    torch.set_num_threads(threads)
    peaks = clock.PeakSampler(torch.device("cpu"), precision("fp32"), world=procs)
    metrics = MetricsLog(tmp_path / "m.jsonl", False, info(world=procs), peaks)
    mfu = step(metrics, 1, 884.0)["mfu"]
    machine = 1e10 * 2**0.7  # the whole machine measured at once, on both its CPUs
    assert mfu == pytest.approx(884.0 * MODEL_FLOPS / machine)
    assert peaks.median() * procs == pytest.approx(machine)


def test_mfu_is_proportional_to_throughput_across_splits(tmp_path):
    """Against one machine peak, MFU / tokens-per-s is one constant for every split."""
    machine = clock.MachinePeak(4e11, "theoretical", "injected", "fp32")
    ratios = set()
    for procs, tok_s in [(1, 884.0), (2, 884.0), (4, 1768.0), (2, 3000.0)]:
        peaks = clock.PeakSampler(torch.device("cpu"), precision("fp32"), world=procs,
                                  processes_on_host=procs, machine=machine)
        metrics = MetricsLog(tmp_path / "m.jsonl", False, info(world=procs), peaks)
        ratios.add(round(step(metrics, 1, tok_s)["mfu"] / tok_s, 15))
    assert ratios == {MODEL_FLOPS / 4e11}


def test_bf16_on_a_cpu_without_native_bf16_uses_the_fp32_rate_and_labels_it(tmp_path):
    measured = []

    def measure(catalog, _):
        measured.append(catalog)
        return clock.Peak(1e11, f"fake {catalog}")

    plain = clock.CpuInfo("fake", "GenuineIntel", 6, 1, frozenset({"avx", "fma", "avx2"}), 4, 4,
                          3000.0, "test")
    peak = clock.cpu_machine_peak("bf16", plain, cache_dir=tmp_path, measure=measure)
    assert measured == ["fp32"]  # never an emulated bf16 matmul
    assert peak.rate_precision == "fp32" and "no native support" in peak.note
    assert peak.flops == pytest.approx(4 * 32 * 3e9)  # the fp32 theoretical rate
    sampler = clock.PeakSampler(torch.device("cpu"), precision("bf16"), machine=peak)
    assert "no native support" in sampler.source and "fp32" in sampler.describe()
