"""The calibration sweep: its YAML (`Sweep`), the runs it plans (`RunSpec`), running them as
training commands (`Runner`, through `contracts.run.launch_training`) and what each measured
(`Measured`), with the CPU time other work took from the machine meanwhile."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from contracts.config import load_structured
from contracts.run import RunSummary, launch_training
from model.config import ModelConfig, get_preset
from model.flops import hardware_flops_per_token
from model.precision import precision

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SWEEP = ROOT / "configs" / "estimate" / "calibrate.yaml"
QUICK_SWEEP = ROOT / "configs" / "estimate" / "calibrate_quick.yaml"
RERUN_OTHERS_CORES = 0.5  # a run during which others used this many cores is run once more


@dataclass
class Shape:
    n_layer: int = 4
    d_model: int = 256

    @property
    def label(self) -> str:
        return f"L{self.n_layer} d{self.d_model}"


@dataclass
class Sweep:
    """A calibration sweep (configs/estimate/calibrate.yaml documents each field)."""

    train_config: str = "configs/estimate/calibrate_train.yaml"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "small"})
    seq_len: int = 128
    micro_batch_size: int = 8
    steps: int = 20
    warmup_steps_excluded: int = 5
    threads: int = 1
    repeats: int = 1
    fit: list[Shape] = field(default_factory=list)
    reference: Shape = field(default_factory=Shape)
    long_seq_len: int = 1024
    nproc: int = 2
    compare_threads: bool = True
    held_out: Shape = field(default_factory=Shape)


def load_sweep(path: str | Path, *, steps: int | None = None, nproc: int | None = None,
               repeats: int | None = None) -> Sweep:
    """Read a sweep YAML (unknown keys are errors) and apply the command-line overrides."""
    overrides = [f"{name}={value}" for name, value in
                 (("steps", steps), ("nproc", nproc), ("repeats", repeats)) if value is not None]
    sweep: Sweep = load_structured(Sweep, path, overrides, example="steps=20")
    validate_sweep(sweep)
    return sweep


def validate_sweep(s: Sweep) -> None:
    if len({(x.n_layer, x.d_model) for x in s.fit}) < 2:
        raise ValueError(f"the sweep needs at least two different fit shapes, got {s.fit}")
    if s.reference not in s.fit:
        raise ValueError(f"reference {s.reference.label} must be one of the fit shapes")
    if s.steps <= s.warmup_steps_excluded + 2:
        raise ValueError(f"steps={s.steps} leaves too few steps after warmup_steps_excluded="
                         f"{s.warmup_steps_excluded}; use steps >= {s.warmup_steps_excluded + 3}")
    tokens = s.seq_len * s.micro_batch_size
    if s.long_seq_len <= s.seq_len or tokens % s.long_seq_len:
        raise ValueError(f"long_seq_len={s.long_seq_len} must exceed seq_len={s.seq_len} and divide "
                         f"the tokens per micro-batch ({tokens}) to keep tokens per step fixed")
    if s.nproc < 2:
        raise ValueError(f"nproc={s.nproc}: the data-parallel check needs at least 2 processes")
    if s.repeats < 1 or s.threads < 1:
        raise ValueError("repeats and threads must be >= 1")
    if "preset" not in s.model:
        raise ValueError("the sweep's model section needs a preset (model.config.PRESETS)")
    for key in ("n_layer", "d_model", "seq_len", "vocab_size"):
        if key in s.model:
            raise ValueError(f"model.{key} is set by the sweep itself; remove it from the model section")


@dataclass
class RunSpec:
    """One configuration of the sweep."""

    role: str  # fit | held_out | long_seq | recompute | bf16 | dp | threads | parallel's
    shape: Shape
    seq_len: int
    micro_batch_size: int
    precision: str = "no"  # train's mixed_precision (a model.precision switch)
    recompute: str = "none"  # train's activation_checkpointing
    nproc: int = 1
    threads: int = 1
    fsdp: bool = False  # train's fsdp (FSDP2 over the nproc processes)
    tp: int = 1  # train's parallel.tp (tensor parallel over tp of the nproc processes)
    cp: int = 1  # train's parallel.cp (context parallel: the sequence split over cp processes)

    @property
    def name(self) -> str:
        prec = precision(self.precision).catalog
        ckpt = "" if self.recompute == "none" else f"_ckpt-{self.recompute}"
        return (f"L{self.shape.n_layer}_d{self.shape.d_model}_T{self.seq_len}_{prec}{ckpt}"
                f"_{self.nproc}x{self.threads}" + ("_fsdp" if self.fsdp else "")
                + (f"_tp{self.tp}" if self.tp > 1 else "") + (f"_cp{self.cp}" if self.cp > 1 else ""))

    @property
    def label(self) -> str:
        parts = [self.shape.label, f"T{self.seq_len}"]
        if not self.fp32:
            parts.append(self.precision)
        if self.recompute != "none":
            parts.append(f"recompute {self.recompute}")
        if self.nproc > 1 or self.threads > 1:
            parts.append(f"{self.nproc} proc x {self.threads} thr")
        if self.fsdp:
            parts.append("FSDP")
        if self.tp > 1:
            parts.append(f"tp={self.tp}")
        if self.cp > 1:
            parts.append(f"cp={self.cp}")
        return " ".join(parts)

    @property
    def fp32(self) -> bool:
        return precision(self.precision).catalog == "fp32"

    @property
    def fp32_single_core(self) -> bool:
        """Runs the FLOPs model describes: fp32, one process of the sweep's thread count."""
        return self.fp32 and self.nproc == 1 and self.role != "threads"

    def model_config(self, sweep: Sweep, vocab_size: int) -> ModelConfig:
        extra = {k: v for k, v in sweep.model.items() if k != "preset"}
        return get_preset(str(sweep.model["preset"]), **extra, n_layer=self.shape.n_layer,
                          d_model=self.shape.d_model, seq_len=self.seq_len, vocab_size=vocab_size)

    def tokens_per_step(self) -> int:
        """Tokens of all processes per optimizer step (one micro-batch per data-parallel
        rank: the tp and cp ranks of a group share theirs)."""
        return self.nproc // (self.tp * self.cp) * self.micro_batch_size * self.seq_len

    def hardware_flops_per_step(self, sweep: Sweep, vocab_size: int) -> float:
        """FLOPs one process executes per step, by arithmetic (before running)."""
        cfg = self.model_config(sweep, vocab_size)
        return (hardware_flops_per_token(cfg, self.seq_len, self.recompute)
                * self.micro_batch_size * self.seq_len)

    def overrides(self, sweep: Sweep, data_dir: Path) -> list[str]:
        """The training command's key=value overrides (launch_training adds out_dir)."""
        return [
            f"data_dir={data_dir}",
            *[f"model.{k}={v}" for k, v in sweep.model.items()],
            f"model.n_layer={self.shape.n_layer}", f"model.d_model={self.shape.d_model}",
            f"model.seq_len={self.seq_len}", "seq_len=0",
            f"micro_batch_size={self.micro_batch_size}",
            f"batch_size={self.micro_batch_size * self.nproc // (self.tp * self.cp)}",
            f"steps={sweep.steps}", f"eval_every={sweep.steps}",
            f"warmup_steps_excluded={sweep.warmup_steps_excluded}",
            f"threads_per_process={self.threads}", f"mixed_precision='{self.precision}'",
            f"activation_checkpointing={self.recompute}", "compile=false", f"fsdp={str(self.fsdp).lower()}",
            *([f"parallel.tp={self.tp}"] if self.tp > 1 else []),
            *([f"parallel.cp={self.cp}"] if self.cp > 1 else []),
        ]


def plan(sweep: Sweep) -> tuple[list[RunSpec], RunSpec]:
    """The sweep's runs in the order of one round, and the held-out run. Each check's run sits
    next to the reference run, so that the two see the same machine."""
    T, B, ref, thr = sweep.seq_len, sweep.micro_batch_size, sweep.reference, sweep.threads
    fit = {(s.n_layer, s.d_model): RunSpec("fit", s, T, B, threads=thr) for s in sweep.fit}
    checks = [
        RunSpec("long_seq", ref, sweep.long_seq_len, T * B // sweep.long_seq_len, threads=thr),
        RunSpec("recompute", ref, T, B, recompute="full", threads=thr),
        RunSpec("bf16", ref, T, B, precision="bf16", threads=thr),
        RunSpec("dp", ref, T, B, nproc=sweep.nproc, threads=thr),
    ]
    if sweep.compare_threads:
        checks.append(RunSpec("threads", ref, T, B, threads=thr * sweep.nproc))
    runs: list[RunSpec] = []
    for key, spec in fit.items():
        runs.append(spec)
        if key == (ref.n_layer, ref.d_model):
            runs += checks
    held_out = RunSpec("held_out", sweep.held_out, T, B, threads=thr)
    return runs, held_out


@dataclass
class Measured:
    """A configuration's measurements: per-round summary figures and their medians."""

    spec: RunSpec
    params: int
    model_flops_per_token: float
    hardware_flops_per_token: float
    step_s_rounds: list[float]
    step_s_p10: float
    step_s_p90: float
    tokens_per_s_rounds: list[float]
    mfu_rounds: list[float]
    peak_flops_rounds: list[float]
    run_dirs: list[str]
    wall_s: float
    others_cores_rounds: list[float] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # summary.json's device, per round

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_s_rounds)

    @property
    def tokens_per_s(self) -> float:
        return self.spec.tokens_per_step() / self.step_s

    @property
    def hardware_flops_per_step(self) -> float:
        """FLOPs one process executed per step, from the run's own summary."""
        return self.hardware_flops_per_token * self.spec.micro_batch_size * self.spec.seq_len

    @property
    def n_6n(self) -> float:
        """N of 6N (matmul weights per token, LM head included), from the summary's FLOPs."""
        attention = 12 * self.spec.shape.n_layer * self.spec.shape.d_model * self.spec.seq_len
        return (self.model_flops_per_token - attention) / 6

    def add(self, summary: RunSummary, run_dir: Path, wall_s: float,
            others_cores: float | None = None) -> None:
        self.step_s_rounds.append(float(summary.step_s["median"]))
        self.step_s_p10, self.step_s_p90 = summary.step_s["p10"], summary.step_s["p90"]
        self.tokens_per_s_rounds.append(summary.tokens_per_s_median)
        self.mfu_rounds.append(summary.mfu_median)
        self.peak_flops_rounds.append(summary.peak_flops_median)
        self.run_dirs.append(str(run_dir))
        self.wall_s += wall_s
        if others_cores is not None:
            self.others_cores_rounds.append(others_cores)
        if summary.raw.get("device"):
            self.devices.append(str(summary.raw["device"]))

    def to_dict(self) -> dict:
        return {"name": self.spec.name, "role": self.spec.role, "label": self.spec.label,
                "spec": dataclasses.asdict(self.spec), "params": self.params,
                "model_flops_per_token": self.model_flops_per_token,
                "hardware_flops_per_token": self.hardware_flops_per_token,
                "tokens_per_step": self.spec.tokens_per_step(),
                "step_s_median": self.step_s, "step_s_rounds": self.step_s_rounds,
                "tokens_per_s": self.tokens_per_s, "mfu_rounds": self.mfu_rounds,
                "peak_flops_per_process_rounds": self.peak_flops_rounds,
                "run_dirs": self.run_dirs, "wall_s": self.wall_s,
                "others_cores_rounds": self.others_cores_rounds, "devices": self.devices}


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, including time the hypervisor gave to other
    guests ("steal"), CPU seconds of this process's finished children); None off Linux.

    Their difference over a run is what *others* used while it ran: the machine is shared, and
    a neighbour's burst slows a run without leaving a trace in its own clocks."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


def cpu_info() -> dict:
    """The machine, in words: model, cores, the vector/matrix units bf16 speed depends on."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "unknown"
    bf16_units = sorted(flags & {"amx_bf16", "avx512_bf16", "amx_tile"})
    return {"cpu": model, "logical_cores": os.cpu_count(), "torch": torch_version,
            "avx512f": "avx512f" in flags, "bf16_units": bf16_units,
            "flags_known": bool(flags)}


def others_cores(before: tuple[float, float] | None, after: tuple[float, float] | None,
                 wall_s: float) -> float | None:
    """Cores that other work used between two cpu_seconds() readings: the machine's busy CPU
    time minus this process's children's, per second of wall time."""
    if not (before and after):
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall_s


class Runner:
    """Runs the sweep's configurations one at a time (`contracts.run.launch_training`), collecting
    a Measured per configuration; a run during which other work used RERUN_OTHERS_CORES cores
    or more is run once more."""

    def __init__(self, sweep: Sweep, data_dir: Path, runs_dir: Path, vocab_size: int, total: int,
                 log: Callable[[str], None] = print) -> None:
        self.sweep, self.data_dir, self.runs_dir = sweep, data_dir, runs_dir
        self.vocab_size, self.total, self.log = vocab_size, total, log
        config = Path(sweep.train_config)
        self.train_config = config if config.is_absolute() else ROOT / config
        self.measured: dict[str, Measured] = {}
        self.reruns: list[str] = []  # runs repeated because others were busy
        self.done = 0

    def run(self, spec: RunSpec, r: int) -> Measured:
        """Round `r` of one configuration."""
        self.done += 1
        run_dir = self.runs_dir / f"{spec.role}_{spec.name}_r{r}"
        for attempt in range(2):  # once more if other work took a large share of the machine
            t0, cpu0 = time.monotonic(), cpu_seconds()
            summary = launch_training(self.train_config, spec.overrides(self.sweep, self.data_dir),
                                      run_dir, nproc=spec.nproc)
            wall = time.monotonic() - t0
            others = others_cores(cpu0, cpu_seconds(), wall)
            if attempt == 0 and others is not None and others >= RERUN_OTHERS_CORES:
                self.reruns.append(spec.name)
                self.log(f"  {spec.label}: other work used {others:.2f} cores during the run, "
                         "running it again")
                continue
            break
        cfg = spec.model_config(self.sweep, self.vocab_size)
        expected = hardware_flops_per_token(cfg, spec.seq_len, spec.recompute)
        hw = summary.hardware_flops_per_token
        if abs(hw / expected - 1) > 1e-9:
            self.log(f"  note: the run counts {hw:.6g} FLOPs/token, model/flops.py {expected:.6g}: "
                     "using the run's")
        x = self.measured.setdefault(spec.name, Measured(
            spec, summary.params, summary.model_flops_per_token, hw,
            [], 0.0, 0.0, [], [], [], [], 0.0))
        x.add(summary, run_dir, wall, others)
        busy = f", others used {others:.2f} cores" if others is not None and others >= 0.1 else ""
        self.log(f"[{self.done}/{self.total}] {spec.label:<34} "
                 f"{summary.step_s['median'] * 1e3:8.1f} ms/step "
                 f"{summary.tokens_per_s_median:9,.0f} tok/s  ({wall:.0f} s{busy})")
        return x


def run_calibration(measure: Callable[[Path], Any], out: str | None, prefix: str,
                    write: Callable[[Any, Path], str],
                    publish: Callable[[Any], Path] | None = None) -> int:
    """What both calibrate commands do around their measurement: run `measure(runs_dir)` with
    the run directories in OUT/runs (or a temporary directory, removed after), print its
    `text()`, with `out` write its report files (`write(cal, out)` says which), with `publish`
    publish its table. A failed run (RuntimeError) is one line on stderr and exit status 1."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        runs_dir = Path(out) / "runs" if out else Path(tmp)
        try:
            cal = measure(runs_dir)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print()
        print(cal.text())
        if out:
            print(f"\nwrote {write(cal, Path(out))}; run directories in {runs_dir}")
        if publish:
            print(f"published {publish(cal)}")
    return 0
