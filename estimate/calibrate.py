"""`python -m estimate calibrate`: measure how training throughput depends on the model and the
techniques on *this* machine, check the projection's assumptions against it, and test the
throughput model on a run it has not seen.

A sweep of short real training runs (`python -m train` for one process, `launch/cpu.sh` for
N; never an import of `train`), described by a YAML file (`configs/estimate/calibrate.yaml`):

- **fit**: model sizes at a fixed sequence length and tokens per step, fp32, one process;
  `estimate.throughput_fit` fits step time = a + b x FLOPs per step to them;
- **checks** on one reference shape, each a pair of runs that differ in one thing:
  full recomputation, bf16, a longer sequence at the same tokens per step, N processes of one
  thread (and optionally 1 process of N threads);
- **held out**: a larger shape than any in the fit, predicted from the fit, then run.

Every figure comes from `summary.json` step-time medians (the steps after warm-up), not from
MFU, whose CPU peak is itself a noisy measurement. See the README, "Calibrating on your
hardware".
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from estimate.report import md_table
from estimate.throughput_fit import (
    StepTimeFit,
    attention_share_from_times,
    fit_step_time,
    loglog_slope,
    within,
)
from model.config import ModelConfig, get_preset
from model.flops import hardware_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = ROOT / "configs" / "estimate" / "calibrate.yaml"
QUICK_SWEEP = ROOT / "configs" / "estimate" / "calibrate_quick.yaml"
FORMAT = 1
REL_TOL = 0.25  # relative tolerance of the checks that compare a ratio or share
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
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Sweep), OmegaConf.load(path))
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise ValueError(f"unknown key {e.full_key!r} in sweep {path}") from e
    except ValidationError as e:
        raise ValueError(f"bad value for {e.full_key!r} in sweep {path}: {e.msg.splitlines()[0]}") from e
    sweep: Sweep = OmegaConf.to_object(merged)
    for name, value in (("steps", steps), ("nproc", nproc), ("repeats", repeats)):
        if value is not None:
            setattr(sweep, name, value)
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

    role: str  # fit | held_out | long_seq | recompute | bf16 | dp | threads
    shape: Shape
    seq_len: int
    micro_batch_size: int
    precision: str = "no"  # train's mixed_precision
    recompute: str = "none"  # train's activation_checkpointing
    nproc: int = 1
    threads: int = 1

    @property
    def name(self) -> str:
        prec = "fp32" if self.precision == "no" else self.precision
        ckpt = "" if self.recompute == "none" else f"_ckpt-{self.recompute}"
        return (f"L{self.shape.n_layer}_d{self.shape.d_model}_T{self.seq_len}_{prec}{ckpt}"
                f"_{self.nproc}x{self.threads}")

    @property
    def label(self) -> str:
        parts = [self.shape.label, f"T{self.seq_len}"]
        if self.precision != "no":
            parts.append(self.precision)
        if self.recompute != "none":
            parts.append(f"recompute {self.recompute}")
        if self.nproc > 1 or self.threads > 1:
            parts.append(f"{self.nproc} proc x {self.threads} thr")
        return " ".join(parts)

    @property
    def fp32_single_core(self) -> bool:
        """Runs the FLOPs model describes: fp32, one process of the sweep's thread count."""
        return self.precision == "no" and self.nproc == 1 and self.role != "threads"

    def model_config(self, sweep: Sweep, vocab_size: int) -> ModelConfig:
        extra = {k: v for k, v in sweep.model.items() if k != "preset"}
        return get_preset(str(sweep.model["preset"]), **extra, n_layer=self.shape.n_layer,
                          d_model=self.shape.d_model, seq_len=self.seq_len, vocab_size=vocab_size)

    def tokens_per_step(self) -> int:
        """Tokens of all processes per optimizer step (one micro-batch per process)."""
        return self.nproc * self.micro_batch_size * self.seq_len

    def hardware_flops_per_step(self, sweep: Sweep, vocab_size: int) -> float:
        """FLOPs one process executes per step, by arithmetic (before running)."""
        cfg = self.model_config(sweep, vocab_size)
        return (hardware_flops_per_token(cfg, self.seq_len, self.recompute)
                * self.micro_batch_size * self.seq_len)

    def overrides(self, sweep: Sweep, data_dir: Path, out_dir: Path) -> list[str]:
        model = {k: v for k, v in sweep.model.items()}
        return [
            f"data_dir={data_dir}", f"out_dir={out_dir}",
            *[f"model.{k}={v}" for k, v in model.items()],
            f"model.n_layer={self.shape.n_layer}", f"model.d_model={self.shape.d_model}",
            f"model.seq_len={self.seq_len}", "seq_len=0",
            f"micro_batch_size={self.micro_batch_size}",
            f"batch_size={self.micro_batch_size * self.nproc}",
            f"steps={sweep.steps}", f"eval_every={sweep.steps}",
            f"warmup_steps_excluded={sweep.warmup_steps_excluded}",
            f"threads_per_process={self.threads}", f"mixed_precision='{self.precision}'",
            f"activation_checkpointing={self.recompute}", "compile=false", "fsdp=false",
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

    def add(self, summary: dict, run_dir: Path, wall_s: float,
            others_cores: float | None = None) -> None:
        self.step_s_rounds.append(float(summary["step_s"]["median"]))
        self.step_s_p10, self.step_s_p90 = summary["step_s"]["p10"], summary["step_s"]["p90"]
        self.tokens_per_s_rounds.append(float(summary["tokens_per_s"]["median"]))
        self.mfu_rounds.append(float(summary["mfu"]["median"]))
        self.peak_flops_rounds.append(float(summary["peak_flops_per_process"]["median"]))
        self.run_dirs.append(str(run_dir))
        self.wall_s += wall_s
        if others_cores is not None:
            self.others_cores_rounds.append(others_cores)

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
                "others_cores_rounds": self.others_cores_rounds}


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


def run_training(spec: RunSpec, sweep: Sweep, data_dir: Path, run_dir: Path) -> dict:
    """Start one training run as a command and return its summary.json."""
    config = Path(sweep.train_config)
    config = config if config.is_absolute() else ROOT / config
    args = [str(config), *spec.overrides(sweep, data_dir, run_dir)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if spec.nproc == 1:
        cmd = [sys.executable, "-m", "train", *args]
    else:
        launcher = ROOT / "launch" / "cpu.sh"
        if not launcher.is_file():
            raise RuntimeError(f"{launcher} not found: calibrate runs from a checkout of tokenclock")
        cmd = [str(launcher), *args]
        env |= {"NPROC": str(spec.nproc), "PY": sys.executable,
                "MASTER_PORT": str(29500 + (os.getpid() + time.monotonic_ns() // 1000) % 1000)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    summary_path = run_dir / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        tail = (result.stderr or result.stdout)[-3000:]
        raise RuntimeError(f"training run {spec.name} failed (exit {result.returncode}):\n"
                           f"  {' '.join(cmd)}\n{tail}")
    return json.loads(summary_path.read_text())


@dataclass
class Check:
    """One assumption as measured: the verdict is 'holds' within the stated tolerance."""

    assumption: str
    expectation: str
    measured: str
    holds: bool
    tolerance: str
    note: str = ""
    values: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return ("holds" if self.holds else "does not hold here") + f" ({self.tolerance})"


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


def per_round(f: Callable[..., float], *runs: Measured) -> list[float]:
    """f of the runs' step times, round by round: the runs of a round ran next to each other,
    so a ratio within a round sees one state of a shared machine."""
    return [f(*(x.step_s_rounds[r] for x in runs)) for r in range(len(runs[0].step_s_rounds))]


def _spread(values: list[float], fmt: str) -> str:
    """' (rounds LOW..HIGH)' when there is more than one round."""
    if len(values) < 2:
        return ""
    return f" (rounds {format(min(values), fmt)}..{format(max(values), fmt)})"


def assumption_checks(m: dict[str, Measured], sweep: Sweep, machine: dict) -> list[Check]:
    """The five assumptions of a projection, each measured from a series or from pairs of runs
    (ratios round by round, then their median)."""
    med = statistics.median
    fit_runs = sorted((x for x in m.values() if x.spec.role == "fit"), key=lambda x: x.n_6n)
    ref_key = RunSpec("fit", sweep.reference, sweep.seq_len, sweep.micro_batch_size,
                      threads=sweep.threads).name
    ref = m[ref_key]
    by_role = {x.spec.role: x for x in m.values() if x.spec.role not in ("fit", "held_out")}
    checks = []

    # 1. compute (and so time, at fixed tokens) proportional to N
    slope = loglog_slope([x.n_6n for x in fit_runs], [x.step_s for x in fit_runs])
    small, big = fit_runs[0], fit_runs[-1]
    checks.append(Check(
        "time per token proportional to N (compute = 6N per token)",
        "C ~ 6N per token (Kaplan et al. 2020): at fixed tokens, step time grows like N, "
        "log-log slope 1",
        f"slope {slope:.2f} over {len(fit_runs)} sizes; N x{big.n_6n / small.n_6n:.1f} "
        f"({small.spec.shape.label} to {big.spec.shape.label}) gave step time "
        f"x{big.step_s / small.step_s:.2f} (model FLOPs x"
        f"{big.model_flops_per_token / small.model_flops_per_token:.2f})",
        abs(slope - 1) <= 0.15, "slope 1 +- 0.15",
        "slope below 1: small models reach a lower FLOP/s (small matmuls, per-op overhead), so "
        "time grows more slowly than N; the fit's a + b F describes exactly that"
        if slope < 0.85 else "",
        {"slope": slope, "n_ratio": big.n_6n / small.n_6n, "time_ratio": big.step_s / small.step_s}))

    # 2. full recomputation: against the textbook +33% and against our own FLOP count
    rc = by_role["recompute"]
    overheads = per_round(lambda t_rc, t_ref: t_rc / t_ref - 1, rc, ref)
    over = med(overheads)
    flops_over = rc.hardware_flops_per_token / rc.model_flops_per_token - 1
    measured = f"step time +{over:.0%}{_spread(overheads, '+.0%')} at {ref.spec.shape.label}"
    checks.append(Check(
        "full recomputation costs one more forward pass",
        "+33% compute (Chen et al. 2016; Korthikanti et al. 2022 sec. 4)",
        measured, within(over, 1 / 3, REL_TOL), f"+33% +- {REL_TOL:.0%} of it", "",
        {"time_overhead": over, "time_overhead_rounds": overheads, "expected_overhead": 1 / 3}))
    checks.append(Check(
        "recomputation time = recomputed FLOPs",
        f"+{flops_over:.0%} executed FLOPs (model/flops.py: non-reentrant checkpoint skips "
        "each block's last matmul)",
        measured, within(over, flops_over, REL_TOL), f"+{flops_over:.0%} +- {REL_TOL:.0%} of it",
        "time above the FLOP count: the recomputed forward also re-runs the memory-bound "
        "elementwise work (RMSNorm, RoPE, SiLU, softmax, residual adds) that FLOPs do not count, "
        "a larger share of a step on a CPU than on a GPU" if over > flops_over * (1 + REL_TOL)
        else "",
        {"time_overhead": over, "hardware_flops_overhead": flops_over}))

    # 3. attention share, from the time a longer sequence adds at fixed tokens per step (the
    # linear layers then multiply matrices of the same shape: micro-batch x T is unchanged)
    ls = by_role["long_seq"]
    T0, T1 = ref.spec.seq_len, ls.spec.seq_len
    d = sweep.reference.d_model
    attention = ls.model_flops_per_token - 6 * ls.n_6n
    expected = attention / ls.model_flops_per_token
    causal = (attention / 2) / (6 * ls.n_6n + attention / 2)
    shares = per_round(lambda t0, t1: attention_share_from_times(t0, t1, T0, T1), ref, ls)
    share = med(shares)
    checks.append(Check(
        f"attention share of compute at T={T1}",
        f"12LdT/(6N+12LdT); about T/(T+6d) = {T1 / (T1 + 6 * d):.0%} for a large model "
        f"(N ~ 12Ld^2), {expected:.0%} for this one (its embedding and LM head are a large "
        "part of N)",
        f"{share:.0%}{_spread(shares, '.0%')} of step time (T {T0} -> {T1} at fixed tokens: "
        f"step time x{ls.step_s / ref.step_s:.2f}, model FLOPs "
        f"x{ls.model_flops_per_token / ref.model_flops_per_token:.2f})",
        within(share, expected, REL_TOL), f"{expected:.0%} +- {REL_TOL:.0%} of it",
        "12LdT counts the full score matrix (PaLM's convention); PyTorch's causal flash "
        "attention kernel skips the key blocks above the diagonal, up to about half of it, "
        f"which would give a share of {causal:.0%}",
        {"share": share, "share_rounds": shares, "expected_share": expected,
         "causal_half_share": causal, "large_model_share": T1 / (T1 + 6 * d)}))

    # 4. bf16 speed-up
    bf = by_role["bf16"]
    speedups = per_round(lambda t_ref, t_bf: t_ref / t_bf, ref, bf)
    speedup = med(speedups)
    peak_ratio = med(bf.peak_flops_rounds) / med(ref.peak_flops_rounds)
    units = ", ".join(machine["bf16_units"]) or "none"
    checks.append(Check(
        "bf16 mixed precision speeds training up",
        "~2x matmul throughput where bf16 units exist (tensor cores, AMX; Kalamkar et al. 2019)",
        f"x{speedup:.2f}{_spread(speedups, '.2f')} throughput vs fp32 (1024^3 matmul peak "
        f"x{peak_ratio:.2f})",
        speedup >= 2 * (1 - REL_TOL), f">= {2 * (1 - REL_TOL):.1f}x",
        f"this CPU's bf16 units: {units}" + (
            "; without AMX or avx512_bf16, bf16 matmuls are emulated (converted to fp32 and "
            "back), so bf16 is slower here; on an A100/H100 or a CPU with AMX the published "
            "speed-up applies" if not machine["bf16_units"] else ""),
        {"speedup": speedup, "speedup_rounds": speedups, "peak_ratio": peak_ratio,
         "bf16_units": machine["bf16_units"]}))

    # 5. data-parallel efficiency: N processes of one micro-batch each vs one process
    dp = by_role["dp"]
    n = dp.spec.nproc
    effs = per_round(lambda t_ref, t_dp: t_ref / t_dp, ref, dp)  # N x the tokens in t_dp
    eff = med(effs)
    note = (f"{n} processes x {dp.spec.threads} thread, each with the reference's micro-batch, "
            f"vs 1 process x {ref.spec.threads} thread")
    values = {"efficiency": eff, "efficiency_rounds": effs}
    if "threads" in by_role:
        th = by_role["threads"]
        thread_eff = med(per_round(lambda t_ref, t_th: t_ref / (n * t_th), ref, th))
        dp_vs = med(per_round(lambda t_dp, t_th: n * t_th / t_dp, dp, th))
        note += (f"; the same {n} cores as 1 process x {th.spec.threads} threads (intra-op "
                 f"parallelism) give {thread_eff:.0%}, so data parallelism runs at x{dp_vs:.2f} "
                 "the tokens/s of threading here")
        values |= {"thread_efficiency": thread_eff, "dp_over_threads": dp_vs}
    cores = machine["logical_cores"] or 0
    if n * dp.spec.threads > cores:
        note += f"; WARNING: {n * dp.spec.threads} threads on {cores} cores"
    checks.append(Check(
        f"data-parallel efficiency, 1 -> {n} processes",
        "near-linear, >= 90%: DDP overlaps the gradient all-reduce with backward (Li et al. "
        "2020); Llama 3 lost 7% per GPU from 8K to 16K GPUs (Llama Team 2024, table 4)",
        f"{eff:.0%}{_spread(effs, '.0%')} (tokens/s x{n * eff:.2f} with {n} processes)",
        eff >= 0.80, ">= 80%", note, values))
    return checks


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.0f}" if s >= 0.01 else f"{s * 1e3:.1f}"


def runs_table(measured: list[Measured], fit: StepTimeFit) -> str:
    rows = []
    for x in measured:
        if x.spec.fp32_single_core:
            pred = fit.predict(x.hardware_flops_per_step)
            pred_s, err = f"{x.spec.tokens_per_step() / pred:,.0f}", f"{x.step_s / pred - 1:+.1%}"
        else:
            pred_s, err = "—", "—"
        role = {"fit": "fit", "held_out": "**held out**"}.get(x.spec.role, f"check: {x.spec.role}")
        others = f"{max(x.others_cores_rounds):.2f}" if x.others_cores_rounds else "?"
        rows.append([x.spec.label, role, f"{x.params / 1e6:.2f}M", _fmt_ms(x.step_s),
                     f"{x.tokens_per_s:,.0f}",
                     f"{x.hardware_flops_per_step / x.step_s / 1e9:.1f}",
                     f"{statistics.median(x.mfu_rounds):.0%}", pred_s, err, others])
    return md_table(["run", "role", "params", "step ms (median)", "tokens/s",
                     "achieved GFLOP/s per process", "MFU", "fit: tokens/s", "fit error",
                     "others' CPU (cores, max)"], rows)


def interference_note(measured: list[Measured], threshold: float = 0.25) -> str:
    """A line naming the runs that shared the machine with other work, if any did."""
    busy = [x for x in measured if x.others_cores_rounds and max(x.others_cores_rounds) >= threshold]
    if not busy:
        return ""
    worst = max(max(x.others_cores_rounds) for x in busy)
    return (f"{len(busy)} of {len(measured)} configurations ran while other work used "
            f">= {threshold:.2f} cores (up to {worst:.2f}): their times, and the checks built on "
            "them, are less reliable; rerun on a quieter machine or with more --repeats")


def checks_table(checks: list[Check]) -> str:
    return md_table(["assumption", "published expectation", "measured", "verdict (tolerance)"],
                    [[c.assumption, c.expectation, c.measured, c.verdict] for c in checks])


@dataclass
class Calibration:
    """What calibrate measured, fitted, checked and predicted."""

    sweep: Sweep
    machine: dict
    measured: list[Measured]
    fit: StepTimeFit
    checks: list[Check]
    held_out: Measured
    held_out_predicted_step_s: float
    wall_s: float
    load_avg: tuple[list[float], list[float]]
    reruns: list[str] = field(default_factory=list)  # runs repeated because others were busy

    @property
    def held_out_error(self) -> float:
        """(predicted - measured) / measured tokens/s of the held-out run."""
        return self.held_out.step_s / self.held_out_predicted_step_s - 1

    @property
    def held_out_predicted_tokens_per_s(self) -> float:
        return self.held_out.spec.tokens_per_step() / self.held_out_predicted_step_s

    def fit_text(self) -> str:
        f = self.fit
        res = ", ".join(f"{r:+.1%}" for r in f.residuals)
        return (f"step_s = {f.a_s * 1e3:.1f} ms + F / ({f.asymptotic_flops_per_s / 1e9:.1f} GFLOP/s)"
                f" over {len(f.flops)} fp32 sizes; residuals {res} (rms {f.rms_residual:.1%})")

    def held_out_text(self) -> str:
        h = self.held_out
        worst = max(abs(r) for r in self.fit.residuals)
        return (f"held out {h.spec.label} ({h.params / 1e6:.1f}M params, "
                f"{h.hardware_flops_per_step / max(self.fit.flops):.1f}x the FLOPs of the largest fit run): "
                f"predicted {self.held_out_predicted_tokens_per_s:,.0f} tokens/s "
                f"({self.held_out_predicted_step_s * 1e3:,.0f} ms/step; fit residuals up to "
                f"{worst:.0%}), measured {h.tokens_per_s:,.0f} tokens/s "
                f"({h.step_s * 1e3:,.0f} ms/step): error {self.held_out_error:+.1%}")

    def record(self) -> dict:
        return {
            "kind": "calibration", "format": FORMAT, "machine": self.machine,
            "sweep": dataclasses.asdict(self.sweep), "wall_s": self.wall_s,
            "load_avg_start_end": self.load_avg, "reruns": self.reruns,
            "fit": {"model": "step_s = a_s + b_s_per_flop * hardware_flops_per_step (fp32, "
                             "1 process), least squares on relative error", **self.fit.to_dict()},
            "checks": [{"assumption": c.assumption, "expectation": c.expectation,
                        "measured": c.measured, "holds": c.holds, "tolerance": c.tolerance,
                        "note": c.note, **c.values} for c in self.checks],
            "held_out": {"run": self.held_out.to_dict(),
                         "predicted_step_s": self.held_out_predicted_step_s,
                         "predicted_tokens_per_s": self.held_out_predicted_tokens_per_s,
                         "measured_tokens_per_s": self.held_out.tokens_per_s,
                         "error": self.held_out_error},
            "runs": [x.to_dict() for x in self.measured],
        }

    def text(self) -> str:
        m = self.machine
        return "\n".join([
            f"calibration on {m['cpu']} ({m['logical_cores']} logical cores, torch {m['torch']}), "
            f"{len(self.measured)} configurations x {self.sweep.repeats} round(s), "
            f"{self.sweep.steps} steps each, {self.wall_s / 60:.1f} min"
            + (f"; {len(self.reruns)} run(s) repeated because other work used >= "
               f"{RERUN_OTHERS_CORES} cores during them" if self.reruns else ""),
            "", runs_table(self.measured, self.fit), "",
            *([interference_note(self.measured), ""] if interference_note(self.measured) else []),
            "fit: " + self.fit_text(), "", checks_table(self.checks), "",
            *[f"- {c.assumption}: {c.note}" for c in self.checks if c.note], "",
            self.held_out_text(),
        ])

    def markdown(self, plots: dict[str, str]) -> str:
        m, s = self.machine, self.sweep
        load = f"{self.load_avg[0][0]:.1f} at the start, {self.load_avg[1][0]:.1f} at the end"
        parts = [
            "# Throughput calibration", "",
            f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']}; "
            f"bf16 units: {', '.join(m['bf16_units']) or 'none'}; 1-minute load average {load}. "
            f"{len(self.measured)} configurations x {s.repeats} round(s) of {s.steps} steps "
            f"(median step time over the last {s.steps - s.warmup_steps_excluded}), "
            f"{self.wall_s / 60:.1f} min in all"
            + (f" ({len(self.reruns)} run(s) repeated because other work used >= "
               f"{RERUN_OTHERS_CORES} cores during them)" if self.reruns else "")
            + f". Model preset `{s.model['preset']}`, "
            f"{s.micro_batch_size} x {s.seq_len} tokens per step and process, {s.threads} "
            "thread(s) per process unless the run says otherwise.", "",
            "## Throughput model", "",
            "Time per step = a + b x F, F the FLOPs one process executes per step (model FLOPs "
            "6N + 12LdT per token, plus recomputation; `model/flops.py`), fitted to the fp32 "
            "single-process runs of different sizes (least squares on relative error, "
            "`estimate/throughput_fit.py`). 1/b is the FLOP/s large matmuls reach, a the part "
            "of a step that does not grow with FLOPs.", "",
            "**Fit:** " + self.fit_text() + ".", "",
            "**Held-out run:** " + self.held_out_text() + ".", "",
        ]
        if "size" in plots:
            parts += [f"![throughput vs size]({plots['size']})", ""]
        if "pred" in plots:
            parts += [f"![measured vs predicted]({plots['pred']})", ""]
        parts += ["## Runs", "",
                  "Fit error = (predicted - measured) / measured tokens/s; runs outside the fit "
                  "are predicted from their own FLOPs (recomputation and longer sequences "
                  "included), which is how the projection treats them. bf16 and multi-process "
                  "runs are checks, not predictions.", "",
                  runs_table(self.measured, self.fit), "",
                  "Others' CPU: busy CPU time of the whole machine during the run (hypervisor "
                  "steal included) minus the run's own, per second of the run. "
                  + interference_note(self.measured), "",
                  "## Assumptions, as measured", "",
                  checks_table(self.checks), ""]
        parts += [f"- **{c.assumption}**: {c.note}" for c in self.checks if c.note]
        return "\n".join(parts) + "\n"


def calibrate(sweep: Sweep, data_dir: str | Path, runs_dir: str | Path,
              log: Callable[[str], None] = print) -> Calibration:
    """Run the sweep, fit, check, predict the held-out run, run it; return everything."""
    data_dir = Path(data_dir).resolve()
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise ValueError(
            f"no prepared dataset at {data_dir} (no meta.json); prepare one first, e.g.\n"
            f"  {sys.executable} -m data_prep configs/prep/demo.yaml out_dir={data_dir}")
    vocab = int(json.loads(meta_path.read_text())["vocab_size"])
    runs_dir = Path(runs_dir).resolve()
    machine = cpu_info()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else [float("nan")] * 3
    if load_start[0] > (machine["logical_cores"] or 1):
        log(f"note: load average {load_start[0]:.1f} on {machine['logical_cores']} cores: other "
            "jobs share this machine, timings will be noisy")
    runs, held_spec = plan(sweep)
    measured: dict[str, Measured] = {}
    total = len(runs) * sweep.repeats + sweep.repeats
    started = time.monotonic()
    done = 0
    reruns: list[str] = []

    def execute(spec: RunSpec, r: int) -> None:
        nonlocal done
        done += 1
        run_dir = runs_dir / f"{spec.role}_{spec.name}_r{r}"
        for attempt in range(2):  # once more if other work took a large share of the machine
            t0, cpu0 = time.monotonic(), cpu_seconds()
            summary = run_training(spec, sweep, data_dir, run_dir)
            wall, cpu1 = time.monotonic() - t0, cpu_seconds()
            others = None
            if cpu0 and cpu1:  # busy machine CPU minus this run's own, in cores
                others = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / wall
            if attempt == 0 and others is not None and others >= RERUN_OTHERS_CORES:
                reruns.append(spec.name)
                log(f"  {spec.label}: other work used {others:.2f} cores during the run, "
                    "running it again")
                continue
            break
        cfg = spec.model_config(sweep, vocab)
        expected = hardware_flops_per_token(cfg, spec.seq_len, spec.recompute)
        if abs(summary["hardware_flops_per_token"] / expected - 1) > 1e-9:
            log(f"  note: the run counts {summary['hardware_flops_per_token']:.6g} FLOPs/token, "
                f"model/flops.py {expected:.6g}: using the run's")
        x = measured.setdefault(spec.name, Measured(
            spec, int(summary["model"]["params"]), float(summary["model_flops_per_token"]),
            float(summary["hardware_flops_per_token"]), [], 0.0, 0.0, [], [], [], [], 0.0))
        x.add(summary, run_dir, wall, others)
        busy = f", others used {others:.2f} cores" if others is not None and others >= 0.1 else ""
        log(f"[{done}/{total}] {spec.label:<34} {summary['step_s']['median'] * 1e3:8.1f} ms/step "
            f"{summary['tokens_per_s']['median']:9,.0f} tok/s  ({wall:.0f} s{busy})")

    for r in range(sweep.repeats):
        for spec in runs if r % 2 == 0 else runs[::-1]:
            execute(spec, r)
    fit_runs = [x for x in measured.values() if x.spec.role == "fit"]
    fit = fit_step_time([x.hardware_flops_per_step for x in fit_runs], [x.step_s for x in fit_runs])
    held_flops = held_spec.hardware_flops_per_step(sweep, vocab)
    predicted = fit.predict(held_flops)
    log(f"fit: step_s = {fit.a_s * 1e3:.1f} ms + F / {fit.asymptotic_flops_per_s / 1e9:.1f} GFLOP/s; "
        f"predicting {held_spec.label}: {held_spec.tokens_per_step() / predicted:,.0f} tokens/s "
        f"({predicted * 1e3:,.0f} ms/step), now running it")
    for r in range(sweep.repeats):
        execute(held_spec, r)
    held = measured[held_spec.name]
    checks = assumption_checks(measured, sweep, machine)
    load_end = list(os.getloadavg()) if hasattr(os, "getloadavg") else [float("nan")] * 3
    order = [s.name for s in runs] + [held_spec.name]
    return Calibration(sweep, machine, [measured[k] for k in order], fit, checks, held, predicted,
                       time.monotonic() - started, (load_start, load_end), reruns)


def write_plots(cal: Calibration, out: Path) -> dict[str, str]:
    """throughput_vs_size.png (fit sizes and the held-out run, measured and fitted) and
    measured_vs_predicted.png (every run the FLOPs model describes)."""
    from estimate.plots import Point, predicted_vs_reported, series_vs_size

    sized = sorted([x for x in cal.measured if x.spec.role in ("fit", "held_out")],
                   key=lambda x: x.params)
    size_png = series_vs_size(
        [x.params / 1e6 for x in sized],
        {"measured": [x.tokens_per_s for x in sized],
         "fit: tokens / (a + b F)": [x.spec.tokens_per_step() / cal.fit.predict(x.hardware_flops_per_step)
                                     for x in sized]},
        out / "throughput_vs_size.png", xlabel="parameters (millions); largest = held out",
        ylabel="tokens/s (one process, fp32)",
        title=f"Throughput vs model size ({cal.machine['cpu']})")
    points = []
    for x in cal.measured:
        if not x.spec.fp32_single_core:
            continue
        tag = {"fit": "", "held_out": " (held out)"}.get(x.spec.role, " (not fitted)")
        points.append(Point(x.spec.label + tag, x.tokens_per_s,
                            x.spec.tokens_per_step() / cal.fit.predict(x.hardware_flops_per_step)))
    pred_png = predicted_vs_reported(
        points, out / "measured_vs_predicted.png", xlabel="measured tokens/s",
        ylabel="predicted tokens/s (a + b F fit)", band=1.25,
        title="Throughput: fit prediction vs measurement")
    return {"size": size_png.name, "pred": pred_png.name}


def run_cli(sweep_path: str | Path, data: str, out: str | None, steps: int | None,
            nproc: int | None, repeats: int | None) -> int:
    """The `calibrate` subcommand: run, print, and with `out` write the report files."""
    from estimate.report import write_outputs

    sweep = load_sweep(sweep_path, steps=steps, nproc=nproc, repeats=repeats)
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        runs_dir = Path(out) / "runs" if out else Path(tmp)
        try:
            cal = calibrate(sweep, data, runs_dir)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print()
        print(cal.text())
        if out:
            plots = write_plots(cal, Path(out))
            md, js = write_outputs(out, cal.markdown(plots), cal.record())
            print(f"\nwrote {md}, {js}, " + ", ".join(str(Path(out) / p) for p in plots.values())
                  + f"; run directories in {runs_dir}")
    return 0
