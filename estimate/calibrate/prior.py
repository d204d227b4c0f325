"""`project --from-calibration DIR`: calibrate's fitted throughput model as a prior on how the
target's efficiency differs from the calibrated sizes.

**The file.** `calibrate --out DIR` writes DIR/calibration.json (`"kind": "calibration"`,
`"format"` 1 or 2, written by `estimate.calibrate.report.Calibration.record`; the fields are
listed in docs/formats.md). `read_calibration` is its reader: the only place it is parsed.

**The prior.** calibrate fits step_s = a + b F over model sizes at fixed tokens per step t
(F = hardware FLOPs per token x t, `estimate.throughput_fit`). The fraction of its asymptotic
FLOP/s that a model of x hardware FLOPs per token reaches there is

    eff(x) = b x t / (a + b x t)

which rises with size: the part of a step that does not grow with FLOPs (per-op dispatch,
launches, optimizer, elementwise work) weighs less on a larger model. That overhead is part of
what the performance model's stack efficiency stands for (`estimate.perf`). The stack
efficiency is fitted on the published runs, so the prior scales it by

    factor = eff(x_target) / eff(x_fitted)

with x_fitted the published runs' median hardware FLOPs per token (where the stack efficiency
holds; `project` passes it; without it, the sweep's reference shape) and both sizes clipped to
the sizes the fit supports: from its smallest fit size to its largest, or to the
held-out run when the fit predicted that within HELD_OUT_TOLERANCE. Beyond them the factor is
held at the edge, never extrapolated, and the output says by how far the target lies outside.
The factor's range runs from 1 (nothing transfers) to the fitted factor, widened on both sides
by the fit's rms residual.

What transfers from a CPU calibration: the FLOP model (the same FLOPs are counted on any
device) and the shape of efficiency against size. What does not: kernels, memory bandwidth,
communication, and the absolute FLOP/s or MFU, which the performance model takes from the
accelerator catalog instead.

Why not with --mfu/--mfu-from: both replace the performance model's MFU (a --mfu-from run's
MFU is already size-corrected by the performance model, in which the stack efficiency cancels),
so a prior on the stack efficiency would have nothing to act on, and a second size correction
on top of the first would count the size effect twice. `project` refuses the combination.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from estimate.perf import Factor

FILE = "calibration.json"
FORMATS = (1, 2)
HELD_OUT_TOLERANCE = 0.2  # |held-out error| up to which the held-out size counts as supported


@dataclass(frozen=True)
class Size:
    """A calibrated model size: its label and hardware FLOPs per token."""

    label: str
    flops_per_token: float


@dataclass(frozen=True)
class CalibrationRecord:
    """What `project` needs from a calibration.json."""

    path: Path
    format: int
    device: str  # 'cpu', 'cuda', ..., or 'unknown'
    machine: str
    a_s: float
    b_s_per_flop: float
    rms_residual: float
    tokens_per_step: float  # per process, of the fit runs
    fit: tuple[Size, ...]
    reference: Size
    held_out: Size | None
    held_out_error: float | None

    def efficiency(self, flops_per_token: float) -> float:
        """Fraction of the fit's asymptotic FLOP/s reached at this size: bF / (a + bF)."""
        bf = self.b_s_per_flop * flops_per_token * self.tokens_per_step
        return bf / (self.a_s + bf)

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def supported(self) -> tuple[Size, Size]:
        """The smallest and the largest size the fit is trusted at."""
        lo = min(self.fit, key=lambda s: s.flops_per_token)
        hi = max(self.fit, key=lambda s: s.flops_per_token)
        if (self.held_out is not None and self.held_out_error is not None
                and abs(self.held_out_error) <= HELD_OUT_TOLERANCE
                and self.held_out.flops_per_token > hi.flops_per_token):
            hi = self.held_out
        return lo, hi

    def describe(self) -> str:
        """Where it comes from, in words: the directory, device and sizes."""
        sizes = ", ".join(f"{s.label} ({s.flops_per_token:.3g})" for s in self.fit)
        held = ""
        if self.held_out is not None and self.held_out_error is not None:
            held = (f"; held out {self.held_out.label} ({self.held_out.flops_per_token:.3g}), "
                    f"predicted within {self.held_out_error:+.1%}")
        return (f"{self.path.parent} (calibrated on {self.device}, {self.machine}): fit sizes "
                f"{sizes} hardware FLOPs per token at {self.tokens_per_step:g} tokens per "
                f"step, reference {self.reference.label}{held}; step_s = "
                f"{self.a_s * 1e3:.3g} ms + F / {1 / self.b_s_per_flop / 1e9:.3g} GFLOP/s, "
                f"rms residual {self.rms_residual:.1%}")


def _label(shape: dict) -> str:
    return f"L{shape['n_layer']} d{shape['d_model']}"


def _device(record: dict, path: Path) -> str:
    """The record's device; a format-1 record has none, so its run directories' summaries
    are asked, and without them 'unknown'."""
    if record.get("device"):
        return str(record["device"])
    for run in record.get("runs", []):
        for d in run.get("run_dirs", []):
            summary = Path(d) / "summary.json"
            if not summary.is_absolute():
                summary = path.parent / summary
            try:
                return str(json.loads(summary.read_text())["device"]).split(":")[0]
            except (OSError, ValueError, KeyError):
                continue
    return "unknown"


def read_calibration(directory: str | Path) -> CalibrationRecord:
    """Read DIR/calibration.json (or that file itself); a one-line error names what is wrong."""
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"--from-calibration: no such directory: {d}")
    path = d if d.is_file() else d / FILE
    if not path.is_file():
        raise FileNotFoundError(f"--from-calibration: {d} has no {FILE}; write one with "
                                f"`python -m estimate calibrate --out {d}`")
    try:
        r = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"--from-calibration: {path} is not JSON ({e})") from None
    if not isinstance(r, dict) or r.get("kind") != "calibration":
        raise ValueError(f"--from-calibration: {path} is no calibration record "
                         f"(kind {r.get('kind') if isinstance(r, dict) else None!r})")
    if r.get("format") not in FORMATS:
        raise ValueError(f"--from-calibration: {path} has format {r.get('format')!r}; this "
                         f"version reads {', '.join(map(str, FORMATS))}")
    fit = r.get("fit") or {}
    try:
        a, b = float(fit["a_s"]), float(fit["b_s_per_flop"])
        rms = float(fit.get("rms_residual", 0.0))
        fit_runs = [x for x in r["runs"] if x["role"] == "fit"]
        tokens = {float(x["tokens_per_step"]) for x in fit_runs}
        sizes = tuple(Size(_label(x["spec"]["shape"]), float(x["hardware_flops_per_token"]))
                      for x in fit_runs)
        ref_label = _label(r["sweep"]["reference"])
        held = next((x for x in r["runs"] if x["role"] == "held_out"), None)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--from-calibration: {path} has no usable fit (missing {e})") from None
    if not (b > 0 and a >= 0) or len({s.flops_per_token for s in sizes}) < 2:
        raise ValueError(f"--from-calibration: {path} has no usable fit (a = {a}, b = {b} over "
                         f"{len(sizes)} fit runs; need b > 0, a >= 0 and two sizes)")
    if len(tokens) != 1:
        raise ValueError(f"--from-calibration: {path}'s fit runs differ in tokens per step "
                         f"({sorted(tokens)}): the fit assumes one")
    reference = next((s for s in sizes if s.label == ref_label), None)
    if reference is None:
        raise ValueError(f"--from-calibration: {path}'s reference {ref_label} is none of its "
                         f"fit sizes ({', '.join(s.label for s in sizes)})")
    held_size = held_err = None
    if held is not None:
        held_size = Size(_label(held["spec"]["shape"]), float(held["hardware_flops_per_token"]))
        held_err = float(r["held_out"]["error"]) if r.get("held_out") else None
    machine = (r.get("machine") or {}).get("cpu", "unknown machine")
    return CalibrationRecord(path, int(r["format"]), _device(r, path), str(machine), a, b, rms,
                             tokens.pop(), sizes, reference, held_size, held_err)


@dataclass
class SizePrior:
    """The factor --from-calibration applies to the stack efficiency, with its range and why."""

    record: CalibrationRecord
    target_flops_per_token: float
    clipped_flops_per_token: float
    factor: float
    low: float
    high: float
    outside: str | None  # how far outside the supported sizes the target lies, in words
    transfer: list[str] = field(default_factory=list)  # what carries over to the accelerator
    reference_flops_per_token: float = 0.0  # the denominator's size, clipped
    fitted_at: float | None = None  # the published runs' size (None: the sweep's reference)

    def apply(self, stack: Factor) -> Factor:
        """The stack efficiency times the factor (its range times the factor's), at most 1."""
        return Factor(stack.key, min(1.0, stack.central * self.factor),
                      min(1.0, stack.low * self.low), min(1.0, stack.high * self.high),
                      stack.better, f"{stack.source} Times the calibration prior "
                      f"x{self.factor:.3f} ({self.low:.3f} - {self.high:.3f}), from "
                      f"{self.record.path.parent} (--from-calibration).")

    def summary(self) -> str:
        """One line: the factor, its value and range, and what it is."""
        r = self.record
        return (f"stack efficiency x{self.factor:.3f} (range {self.low:.3f} - {self.high:.3f}) = "
                f"eff({self.clipped_flops_per_token:.3g}) / eff({self._denominator()}) of the fit "
                f"eff = bF/(a + bF), F = hardware FLOPs per token x {r.tokens_per_step:g} tokens; "
                f"target {self.target_flops_per_token:.3g} hardware FLOPs per token")

    def _denominator(self) -> str:
        r = self.record
        if self.fitted_at is None:
            return f"{r.reference.label}: {r.reference.flops_per_token:.3g}"
        return (f"{self.reference_flops_per_token:.3g}: the published runs' median "
                f"{self.fitted_at:.3g} hardware FLOPs per token, where the stack efficiency is "
                "fitted, clipped to the calibrated sizes")

    def lines(self) -> list[str]:
        """The summary, its source, the extrapolation and what transfers, line by line."""
        out = [self.summary(), "source: " + self.record.describe()]
        if self.outside:
            out.append(self.outside)
        return out + self.transfer

    def to_dict(self) -> dict:
        lo, hi = self.record.supported()
        return {"factor": self.factor, "low": self.low, "high": self.high,
                "applies_to": "stack_efficiency", "source": str(self.record.path),
                "device": self.record.device,
                "target_hardware_flops_per_token": self.target_flops_per_token,
                "clipped_to": self.clipped_flops_per_token,
                "reference": {"label": self.record.reference.label,
                              "hardware_flops_per_token": self.record.reference.flops_per_token},
                "fitted_at": self.fitted_at, "denominator_clipped_to": self.reference_flops_per_token,
                "supported": [lo.flops_per_token, hi.flops_per_token],
                "outside": self.outside, "transfer": self.transfer}


def size_prior(record: CalibrationRecord, target_flops_per_token: float,
               accelerator: str, fitted_at: float | None = None) -> SizePrior:
    """The prior for a target of `target_flops_per_token` hardware FLOPs per token (its model
    FLOPs x its recomputation ratio), projected onto `accelerator`, relative to `fitted_at`,
    the size at which the scaled efficiency holds (the sweep's reference shape if None)."""
    if not target_flops_per_token > 0:
        raise ValueError(f"target hardware FLOPs per token must be > 0, got {target_flops_per_token}")
    lo, hi = record.supported()

    def clip(v: float) -> float:
        return min(max(v, lo.flops_per_token), hi.flops_per_token)

    x = clip(target_flops_per_token)
    ref = clip(fitted_at) if fitted_at else record.reference.flops_per_token
    factor = record.efficiency(x) / record.efficiency(ref)
    low = min(1.0, factor) * (1 - record.rms_residual)
    high = max(1.0, factor) * (1 + record.rms_residual)
    outside = None
    if target_flops_per_token > hi.flops_per_token:
        outside = (f"extrapolation: the target's {target_flops_per_token:.3g} hardware FLOPs per "
                   f"token are {target_flops_per_token / hi.flops_per_token:.3g}x the largest "
                   f"size the calibration supports ({hi.label}, {hi.flops_per_token:.3g}); the "
                   "factor is held at that size, not extrapolated beyond it")
    elif target_flops_per_token < lo.flops_per_token:
        outside = (f"extrapolation: the target's {target_flops_per_token:.3g} hardware FLOPs per "
                   f"token are {lo.flops_per_token / target_flops_per_token:.3g}x below the "
                   f"smallest calibrated size ({lo.label}, {lo.flops_per_token:.3g}); the factor "
                   "is held at that size")
    transfer = []
    if record.device != "cpu" and record.device != "unknown":
        transfer.append(f"calibrated on {record.device}: the factor carries the shape of "
                        f"efficiency against size; the absolute rate on {accelerator} still "
                        "comes from the catalog")
    else:
        where = "a CPU" if record.on_cpu else "an unrecorded device (a format-1 record)"
        transfer.append(
            f"calibrated on {where} ({record.machine}). Transfers to {accelerator}: the FLOP "
            "model (the same FLOPs per token on any device) and the shape of efficiency against "
            "size (this factor). Does not transfer: kernels, memory bandwidth, communication and "
            f"the absolute rate (the fit's {1 / record.b_s_per_flop / 1e9:.3g} GFLOP/s, its "
            f"MFU): those come from {accelerator}'s catalog entry and the performance model")
    return SizePrior(record, target_flops_per_token, x, factor, low, high, outside, transfer,
                     ref, fitted_at)
