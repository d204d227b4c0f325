"""Clocks for every training step: phase timings, throughput, FLOP utilisation and memory.

Definitions (all per optimizer step):
- `data_wait_s`: time spent fetching the step's micro-batches from the loader;
- `fwd_bwd_s`: forward + backward of all micro-batches (with DDP this includes the gradient
  all-reduce, which overlaps the last backward);
- `optim_s`: gradient clipping + optimizer step + zeroing;
- `step_s`: wall time of the whole step; `tokens_per_s` counts tokens of all ranks;
- on a GPU the phases come from CUDA events, stamped when the device reaches them and read at
  log steps, so no phase waits for the device: `data_wait_s` is then the time the device waited
  for its batch (zero while the host keeps ahead), the others the device's time per phase;
- `mfu`: model FLOPs (6N + 12LdT per token, `model.flops`) per second over the peak of all
  processes; `hfu` uses the FLOPs actually executed under activation recomputation.

The peak is one figure per machine, fixed for the whole run and the same for every step, so
that MFU is proportional to tokens/s whatever the split into processes and threads:
- on a GPU, the sourced catalog figure per device (a GPU missing from the catalog: a matmul
  measured on it once at start-up);
- on a CPU, the whole machine (every core this process may run on), shared evenly by the
  training processes of the host. Two figures are computed and both are printed:
  `theoretical` = cores x FLOP/cycle x clock, from the ISA flags of /proc/cpuinfo and the clock
  of /sys cpufreq `cpuinfo_max_freq` (else the model name's nominal "@ x GHz", else
  /proc/cpuinfo's current `cpu MHz`, whichever is higher), and `measured` = the 90th
  percentile of 2048^3 matmuls over one second on all cores at once, measured by every run and
  cached per machine (`peak_cache_dir()`) only when it beats the cached figure: a measurement
  under load can only be too low, so the cache learns upward. MFU divides by the higher of the
  two (the theoretical one unless the matmul beat it, which shows it is wrong here). One
  warning line each: a run measuring under half its cache, a cache under half the theoretical
  figure, a cache above 4x the theoretical figure (not believed, replaced).
- bf16 or fp16 on a CPU without native support (no avx512_bf16/amx_bf16, no
  avx512_fp16/amx_fp16 flag) is emulated: its peak is the fp32 rate, and the source says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from estimate.hardware import Peak, catalog_peak
from model.precision import Precision, precision

log = logging.getLogger("train")

MATMUL_N = 2048  # the measured peak's matmul size (n x n x n)
MATMUL_SECONDS = 1.0  # how long it is repeated
MATMUL_QUANTILE = 0.9  # the quantile of the per-call rates taken as the peak
NATIVE = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}


class StepTimes:
    """The marks of one step's phases, read later: `resolve` turns them into seconds.

    On CPU the marks are perf_counter readings. On GPU they are CUDA events recorded on the
    current stream: each is stamped when the device reaches it, so the phases are the device's
    (`data_wait_s` is the time the device waited for its batch), and reading them waits only
    for the last event, at a log step, after the device has done that work anyway.
    """

    def __init__(self, marks: list[tuple[str, object]]):
        self.marks = marks
        self.phases: dict[str, float] = {}
        self._total = 0.0

    def resolve(self) -> StepTimes:
        """Seconds per phase (`phases`) and for the whole step (`total()`); returns self."""
        first = self.marks[0][1] if self.marks else 0.0
        if isinstance(first, float):
            seconds = [m - first for _, m in self.marks] or [0.0]
        else:  # CUDA events: the last one done means all are
            self.marks[-1][1].synchronize()
            seconds = [0.0] + [first.elapsed_time(m) / 1e3 for _, m in self.marks[1:]]
        self.phases = {}
        for (name, _), before, after in zip(self.marks[1:], seconds, seconds[1:], strict=False):
            self.phases[name] = self.phases.get(name, 0.0) + after - before
        self._total = seconds[-1]
        return self

    def total(self) -> float:
        return self._total


class PhaseTimer:
    """Phases of one step, without waiting for the device: on CPU perf_counter laps; on GPU
    CUDA events, read at log steps (`snapshot().resolve()`). `wall()` is the host's own clock
    of the step, known at once (the stopper's estimate of a step's length)."""

    def __init__(self, device: torch.device, event: Callable[[], object] | None = None):
        if event is None and device.type == "cuda":
            def event():
                return torch.cuda.Event(enable_timing=True)
        self._event = event  # None: perf_counter marks
        self._marks: list[tuple[str, object]] = []
        self._host_start = self._host_last = 0.0

    def _mark(self) -> object:
        if self._event is None:
            return time.perf_counter()
        e = self._event()
        e.record()
        return e

    def start(self) -> None:
        self._marks = [("start", self._mark())]
        self._host_start = self._host_last = time.perf_counter()

    def lap(self, name: str) -> None:
        self._marks.append((name, self._mark()))
        self._host_last = time.perf_counter()

    def wall(self) -> float:
        """Host seconds from `start` to the last lap."""
        return self._host_last - self._host_start

    def snapshot(self) -> StepTimes:
        """This step's marks, to resolve later (after the next `start` too)."""
        return StepTimes(list(self._marks))


def matmul_rates(dtype: torch.dtype, device: str | torch.device = "cpu", n: int = MATMUL_N,
                 seconds: float = MATMUL_SECONDS, min_calls: int = 3) -> list[float]:
    """FLOP/s of each n x n x n matmul in `dtype` on `device`, repeated for `seconds` (at least
    `min_calls` times) after one warm-up call. A float8 dtype (the fp8 peak of a GPU missing
    from the catalog) goes through `torch._scaled_mm` with unit scales, as float8 linears do."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul = torch.matmul
    if dtype.itemsize == 1 and dtype.is_floating_point:  # float8: the scaled matmul, bf16 out
        one = torch.ones((), device=device)
        b = b.t().contiguous().t()  # its second operand must be column-major

        def matmul(x, y):
            return torch._scaled_mm(x, y, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    matmul(a, b)
    sync()
    rates, begin = [], time.perf_counter()
    while len(rates) < min_calls or time.perf_counter() - begin < seconds:
        start = time.perf_counter()
        matmul(a, b)
        sync()
        rates.append(2.0 * n**3 / (time.perf_counter() - start))
    return rates


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_matmul_flops(dtype: torch.dtype, device: str | torch.device = "cpu",
                         n: int = MATMUL_N, seconds: float = MATMUL_SECONDS) -> float:
    """The 90th percentile FLOP/s of n^3 matmuls in `dtype` on `device` with the current threads."""
    return quantile(matmul_rates(dtype, device, n, seconds), MATMUL_QUANTILE)


# --- the CPU: what it is ---------------------------------------------------------------------

@dataclass(frozen=True)
class CpuInfo:
    """The cores this process may run on, as /proc/cpuinfo and /sys describe them."""

    model: str
    vendor: str
    family: int | None
    model_number: int | None
    flags: frozenset[str]
    logical: int  # logical CPUs (hardware threads) in the affinity set
    cores: int  # physical cores among them (SMT siblings share their FMA units)
    clock_mhz: float | None
    clock_source: str

    def key(self) -> dict:
        """What identifies the machine for the peak cache."""
        return {"model": self.model, "vendor": self.vendor, "family": self.family,
                "model_number": self.model_number, "logical": self.logical, "cores": self.cores,
                "flags": hashlib.sha256(" ".join(sorted(self.flags)).encode()).hexdigest()[:16]}


def _blocks(text: str) -> list[dict[str, str]]:
    blocks = []
    for chunk in text.strip().split("\n\n"):
        entry = {}
        for line in chunk.splitlines():
            name, sep, value = line.partition(":")
            if sep:
                entry[name.strip()] = value.strip()
        if entry:
            blocks.append(entry)
    return blocks


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_cpuinfo(text: str, cpus: set[int] | None = None,
                  max_freq_khz: dict[int, float] | None = None) -> CpuInfo:
    """A CpuInfo from /proc/cpuinfo's text, restricted to the logical CPUs `cpus` (all if None);
    `max_freq_khz` maps a CPU to its /sys cpufreq `cpuinfo_max_freq`, where there is one."""
    blocks = [b for b in _blocks(text) if cpus is None or _int(b.get("processor")) in cpus]
    if not blocks:
        raise ValueError("no processor entries in /proc/cpuinfo for this process's CPUs")
    first = blocks[0]
    cores = {(b.get("physical id"), b.get("core id")) for b in blocks}
    if any(c == (None, None) for c in cores):  # no topology given (some VMs, ARM): one per CPU
        cores = set(range(len(blocks)))
    ids = [_int(b.get("processor")) for b in blocks]
    sys_khz = [max_freq_khz[i] for i in ids if max_freq_khz and i in max_freq_khz]
    mhz = [float(b["cpu MHz"]) for b in blocks if b.get("cpu MHz")]
    brand = re.search(r"@\s*([0-9.]+)\s*GHz", first.get("model name", ""))
    brand_mhz = float(brand.group(1)) * 1e3 if brand else 0.0
    if sys_khz:
        clock, clock_source = max(sys_khz) / 1e3, "/sys cpufreq cpuinfo_max_freq (max turbo)"
    elif brand_mhz > max(mhz, default=0.0):  # the current clock can sit below the nominal one
        clock, clock_source = brand_mhz, ("the model name's nominal clock (no cpufreq; above "
                                          "/proc/cpuinfo's current cpu MHz)")
    elif mhz:
        clock, clock_source = max(mhz), ("/proc/cpuinfo cpu MHz (the current clock: no cpufreq "
                                         "max and no nominal clock in the model name; the "
                                         "turbo clock may be higher, the measured peak then "
                                         "beats this figure and is used)")
    else:
        clock, clock_source = None, "no clock in /sys cpufreq or /proc/cpuinfo"
    return CpuInfo(
        model=first.get("model name", first.get("Hardware", "unknown")),
        vendor=first.get("vendor_id", "unknown"), family=_int(first.get("cpu family")),
        model_number=_int(first.get("model")),
        flags=frozenset((first.get("flags") or first.get("Features") or "").split()),
        logical=len(blocks), cores=len(cores), clock_mhz=clock, clock_source=clock_source,
    )


def cpu_info() -> CpuInfo:
    """This machine's CpuInfo: the CPUs of this process's affinity set."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    khz = {}
    for cpu in cpus or range(os.cpu_count() or 1):
        f = Path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq")
        if f.is_file():
            khz[cpu] = float(f.read_text())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    if not text:  # not Linux: cores and no ISA, so only the measured peak will exist
        n = os.cpu_count() or 1
        return CpuInfo("unknown", "unknown", None, None, frozenset(), n, n, None, "not Linux")
    return parse_cpuinfo(text, set(cpus) if cpus else None, khz)


def rate_precision(catalog: str, flags: frozenset[str]) -> tuple[str, str | None]:
    """The precision whose rate is this CPU's peak for training in `catalog`, and a note when it
    differs: bf16/fp16 without native instructions is emulated, so the peak is the fp32 rate."""
    if catalog in NATIVE and not flags & set(NATIVE[catalog]):
        return "fp32", (f"{catalog} has no native support on this CPU (no "
                        f"{'/'.join(NATIVE[catalog])} flag): the peak is the fp32 rate, not an "
                        f"emulated {catalog} rate")
    return catalog, None


def flops_per_cycle(cpu: CpuInfo, rate: str) -> tuple[float, str] | None:
    """Dense FLOP per cycle per core in precision `rate` from the ISA flags, with the reasoning;
    None for an ISA this table does not know (then only the measured peak exists)."""
    flags = cpu.flags
    if rate in ("bf16", "fp16") and f"amx_{rate}" in flags:
        return 1024.0, f"AMX {rate} tiles: 1024 FLOP/cycle"
    if "avx512f" in flags:
        if cpu.vendor == "AuthenticAMD" and (cpu.family or 0) < 0x1A:  # Zen 4: 2 x 256 bits
            fp32, how = 32.0, "AVX-512 on a 256-bit datapath (AMD Zen 4): 2 FMA x 8 fp32 lanes x 2"
        else:
            fp32, how = 64.0, ("AVX-512: 2 FMA units x 16 fp32 lanes x 2 (parts with one "
                               "512-bit FMA unit reach half)")
    elif "avx2" in flags and "fma" in flags:
        fp32, how = 32.0, "AVX2: 2 FMA units x 8 fp32 lanes x 2"
    elif "avx" in flags:
        fp32, how = 16.0, "AVX without FMA: one 8-lane add and one 8-lane multiply"
    else:
        return None
    if rate in NATIVE and f"avx512_{rate}" in flags:
        return 2 * fp32, f"{how}; x2 for avx512_{rate} (pairs of {rate} per fp32 lane)"
    return fp32, how


def theoretical_cpu_peak(catalog: str, cpu: CpuInfo | None = None) -> Peak | None:
    """cores x FLOP/cycle x clock of the whole machine in precision `catalog` (bf16/fp16 without
    native support: the fp32 rate), or None where the ISA or the clock is unknown."""
    cpu = cpu or cpu_info()
    rate, _ = rate_precision(precision(catalog).catalog, cpu.flags)
    per_cycle = flops_per_cycle(cpu, rate)
    if per_cycle is None or not cpu.clock_mhz:
        return None
    fpc, how = per_cycle
    flops = cpu.cores * fpc * cpu.clock_mhz * 1e6
    return Peak(flops, f"theoretical {rate}: {cpu.cores} cores x {fpc:g} FLOP/cycle ({how}) x "
                       f"{cpu.clock_mhz / 1e3:.3f} GHz ({cpu.clock_source}); {cpu.model}")


# --- the CPU: what it does, measured once and cached -----------------------------------------

def peak_cache_dir() -> Path:
    """$TOKENCLOCK_CACHE_DIR, else $XDG_CACHE_HOME/tokenclock, else ~/.cache/tokenclock."""
    if os.environ.get("TOKENCLOCK_CACHE_DIR"):
        return Path(os.environ["TOKENCLOCK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenclock"


def peak_cache_path(catalog: str, cpu: CpuInfo, cache_dir: Path | None = None) -> Path:
    """peak-<hash>.json: the hash of the CPU (model, cores, flags), torch version and dtype."""
    key = {**cpu.key(), "torch": torch.__version__, "precision": catalog, "n": MATMUL_N}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (cache_dir or peak_cache_dir()) / f"peak-{digest}.json"


def measure_cpu_peak(catalog: str, cpu: CpuInfo) -> Peak:
    """The 90th percentile FLOP/s of one second of 2048^3 matmuls with one thread per logical
    CPU of this process (the whole machine), in precision `catalog`."""
    dtype = getattr(torch, precision(catalog).torch_dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu.logical)
    try:
        rates = matmul_rates(dtype, "cpu")
    finally:
        torch.set_num_threads(threads)
    return Peak(quantile(rates, MATMUL_QUANTILE),
                f"measured {catalog}: p{MATMUL_QUANTILE * 100:.0f} of {len(rates)} "
                f"{MATMUL_N}^3 matmuls over {MATMUL_SECONDS:g} s on {cpu.logical} threads at once, "
                f"torch {torch.__version__}; {cpu.model}")


FAR_BELOW = 0.5  # a figure under half of another it should match is flagged in one line
IMPLAUSIBLE = 4.0  # a cached figure above this many times the theoretical one is not believed


def _read_cache(path: Path) -> Peak | None:
    """The cached measured peak, its source naming when it was measured."""
    try:
        raw = json.loads(path.read_text())
        when = raw.get("measured_utc")
        return Peak(float(raw["flops"]), str(raw["source"]) + (f"; measured {when}" if when
                                                               else ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_cache(path: Path, peak: Peak, key: dict) -> Peak:
    """Cache `peak` atomically; returns it with the measurement time in its source."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"flops": peak.flops, "source": peak.source, "key": key,
                                   "measured_utc": when}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning(f"could not cache the measured peak in {path}: {e}")
    return Peak(peak.flops, f"{peak.source}; measured {when}")


def _tflops(peak: Peak) -> str:
    return f"{peak.flops / 1e12:.4g} TFLOP/s"


def cached_cpu_peak(catalog: str, cpu: CpuInfo, cache_dir: Path | None = None,
                    measure: Callable[[str, CpuInfo], Peak] = measure_cpu_peak,
                    may_measure: bool = True, theoretical: Peak | None = None,
                    ) -> tuple[Peak | None, Path, list[str]]:
    """The best measured peak of this machine so far, and one-line notes on what looks wrong.

    A matmul measured while other work shares the machine can only come out too low, so the
    figure learns upward: this run measures (when `may_measure`), and its figure replaces the
    cached one only if it is higher. A run measuring under half the cache says so (and keeps
    the cache). A cached figure above `IMPLAUSIBLE` x the theoretical one (a hand-edited or
    foreign file) is not believed: this run's measurement replaces it.
    """
    path = peak_cache_path(catalog, cpu, cache_dir)
    cached, notes = _read_cache(path), []
    if cached and theoretical and cached.flops > IMPLAUSIBLE * theoretical.flops:
        notes.append(f"the cached peak {_tflops(cached)} in {path} is over {IMPLAUSIBLE:g}x the "
                     f"theoretical {_tflops(theoretical)}: not believed, "
                     + ("replaced by this run's measurement" if may_measure else "ignored"))
        cached = None
    if not may_measure:
        return cached, path, notes
    now = measure(catalog, cpu)
    if cached is None or now.flops > cached.flops:
        key = {**cpu.key(), "torch": torch.__version__, "precision": catalog}
        return _write_cache(path, now, key), path, notes
    if now.flops < FAR_BELOW * cached.flops:
        notes.append(f"this run measured {_tflops(now)}, under half the cached "
                     f"{_tflops(cached)} ({path}): the machine is busier now; MFU keeps the "
                     "cached figure")
    return cached, path, notes


@dataclass
class MachinePeak:
    """The peak FLOP/s of the whole machine that every step's MFU divides by, and both figures
    it was chosen from."""

    flops: float
    method: str  # "catalog", "theoretical" or "measured"
    source: str
    rate_precision: str  # the precision of the rate (fp32 for emulated bf16/fp16)
    note: str | None = None  # emulated precision, why the measured figure was chosen, warnings
    theoretical: dict | None = None  # {"flops", "source"}
    measured: dict | None = None  # {"flops", "source", "cache"}

    def to_dict(self) -> dict:
        return asdict(self)


def choose_cpu_peak(theoretical: Peak | None, measured: Peak | None, rate: str,
                    note: str | None = None) -> MachinePeak:
    """The higher of the theoretical figure and the best measured one: a matmul that beats
    the theoretical figure shows its clock or FMA assumption is wrong here."""
    if theoretical is None and measured is None:
        raise ValueError("no CPU peak: the ISA is unknown and nothing was measured")
    theo = {"flops": theoretical.flops, "source": theoretical.source} if theoretical else None
    meas = {"flops": measured.flops, "source": measured.source} if measured else None
    notes = [note] if note else []
    if theoretical is not None and (measured is None or measured.flops <= theoretical.flops):
        chosen, method = theoretical, "theoretical"
    else:
        chosen, method = measured, "measured"
        if theoretical is not None:
            notes.append("the measured matmul beat the theoretical figure, whose clock or FMA "
                         "assumption is therefore wrong here: MFU uses the measured figure")
    return MachinePeak(chosen.flops, method, chosen.source, rate, "; ".join(notes) or None,
                       theo, meas)


def cpu_machine_peak(catalog: str, cpu: CpuInfo | None = None, *, local_main: bool = True,
                     barrier: Callable[[], None] | None = None, cache_dir: Path | None = None,
                     measure: Callable[[str, CpuInfo], Peak] = measure_cpu_peak) -> MachinePeak:
    """The CPU's MachinePeak. With several processes on the host, the local main process
    measures (all cores, the others waiting at `barrier`) and the others read its cache.
    Each note on the figures is logged as one warning line."""
    cpu = cpu or cpu_info()
    rate, note = rate_precision(precision(catalog).catalog, cpu.flags)
    theoretical = theoretical_cpu_peak(rate, cpu)
    if local_main:
        measured, path, notes = cached_cpu_peak(rate, cpu, cache_dir, measure,
                                                theoretical=theoretical)
    if barrier is not None:
        barrier()  # every rank calls it: it is a collective
    if not local_main:  # after the barrier: the figure the local main process just settled
        measured, path, notes = cached_cpu_peak(rate, cpu, cache_dir, measure,
                                                may_measure=False, theoretical=theoretical)
        if measured is None:  # nothing cached that this process can read: measure here
            measured, path, notes = cached_cpu_peak(rate, cpu, cache_dir, measure,
                                                    theoretical=theoretical)
    if measured and theoretical and measured.flops < FAR_BELOW * theoretical.flops:
        notes.append(f"the best measured peak {_tflops(measured)} is under half the "
                     f"theoretical {_tflops(theoretical)}: every measurement so far ran under "
                     "load, or the theoretical clock or FMA count is too high")
    for line in notes:
        log.warning(f"CPU peak: {line}")
    peak = choose_cpu_peak(theoretical, measured, rate, "; ".join(filter(None, [note, *notes]))
                           or None)
    if peak.measured is not None:
        peak.measured["cache"] = str(path)
    return peak


def local_processes(world: int) -> int:
    """Training processes on this host: LOCAL_WORLD_SIZE (torchrun, accelerate launch), else
    the local size of Open MPI or Intel MPI, else all of them."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return max(1, world)


@dataclass
class PeakSampler:
    """The peak FLOP/s per process: the machine's peak over the training processes on its host
    (a GPU: its catalog figure). One figure for the whole run; `machine` may be injected."""

    device: torch.device
    precision: Precision
    world: int = 1
    local_main: bool = True
    barrier: Callable[[], None] | None = None
    machine: MachinePeak | None = None
    processes_on_host: int = field(default=0)

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.device.type != "cpu":
            self.processes_on_host = 1  # one process per device
        elif not self.processes_on_host:
            self.processes_on_host = local_processes(self.world)
        if self.machine is None:
            self.machine = self._machine_peak()
        self.samples = [self.median()]

    def _machine_peak(self) -> MachinePeak:
        key = self.precision.catalog
        if self.device.type == "cpu":
            return cpu_machine_peak(key, local_main=self.local_main, barrier=self.barrier)
        found = catalog_peak(torch.cuda.get_device_name(self.device), key) \
            if self.device.type == "cuda" else None
        if found is not None:
            return MachinePeak(found.flops, "catalog", found.source, key)
        dtype = getattr(torch, self.precision.torch_dtype)
        flops = measure_matmul_flops(dtype, self.device)
        source = (f"measured {key}: p{MATMUL_QUANTILE * 100:.0f} of {MATMUL_N}^3 matmuls over "
                  f"{MATMUL_SECONDS:g} s on {self.device.type} (not in the catalog)")
        return MachinePeak(flops, "measured", source, key,
                           measured={"flops": flops, "source": source})

    @property
    def source(self) -> str:
        m = self.machine
        share = (f"; machine peak {m.flops / 1e12:.4g} TFLOP/s / {self.processes_on_host} "
                 "processes on the host" if self.processes_on_host > 1 else "")
        return m.source + share + (f" [{m.note}]" if m.note else "")

    def median(self) -> float:
        """The peak per process (named for the summary's key)."""
        return self.machine.flops / self.processes_on_host

    def spread(self) -> dict:
        per = self.median()
        return {"median": per, "min": per, "max": per, "samples": [per], "source": self.source}

    def describe(self) -> str:
        """The start-up log lines: the figure used, and both CPU figures with their sources."""
        m, n = self.machine, self.processes_on_host
        share = f" = {m.flops / 1e12:.4g} TFLOP/s machine peak / {n} processes on the host"
        lines = [f"peak FLOP/s per process: {self.median() / 1e12:.4g} TFLOP/s"
                 f"{share if n > 1 else ''} ({m.method}"
                 + (f": {m.source})" if m.method == "catalog" else ")")]
        if m.note:
            lines.append(f"  note: {m.note}")
        for name in ("theoretical", "measured"):
            fig = getattr(m, name)
            if fig is not None and m.method != "catalog":
                cache = f"; cached in {fig['cache']}" if fig.get("cache") else ""
                lines.append(f"  {name} machine peak: {fig['flops'] / 1e12:.4g} TFLOP/s "
                             f"({fig['source']}{cache})" + (" [used]" if m.method == name else ""))
        return "\n".join(lines)


def time_allreduce(numel: int, device: torch.device, repeats: int = 3) -> float:
    """Median seconds for an all-reduce of `numel` fp32 values, the size of the gradients.

    DDP overlaps its gradient all-reduce with the backward pass, so the step clock cannot
    separate it; this probe, run at evaluation steps, measures what the communication alone
    costs on this process group (an upper bound on what the overlap can hide).
    """
    import torch.distributed as dist

    buffer = torch.ones(numel, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    """"cpu" (or "mps"), or the GPU's name, as summary.json records it."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_memory_bytes(device: torch.device) -> int:
    """Allocator peak on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
