"""The throughput model `calibrate` fits, and the arithmetic of its assumption checks.

Pure functions of measured numbers (no runs, no files), so that each can be tested on
synthetic data.

**The model.** A training step that executes F FLOPs (hardware FLOPs: what actually runs,
recomputation included, `model.flops.hardware_flops_per_token` x tokens per step) takes

    step_s = a + b * F

seconds: `b` is the time per FLOP of the matmul-dominated work (1/b the FLOP/s it reaches on
large enough matrices) and `a` the part of a step that does not grow with F at this batch
size: per-op dispatch, the optimizer's launches, data loading, elementwise work that scales
with tokens x width rather than with FLOPs. The achieved FLOP/s, F / (a + b F), then rises with
model size and saturates at 1/b, which is how small models behave (small matmuls use a core
less well). We chose this over a power law in size (log FLOP/s vs log N) because it extrapolates
to a bounded FLOP/s and its two numbers mean something; its weakness is that `a` in truth
grows slowly with size (more layers, more ops), so it tends to over-predict throughput far
beyond the fitted sizes, which the held-out run measures.

The fit minimises *relative* squared error, sum(((a + b F_i) / t_i - 1)^2), because what we
report and extrapolate is a relative error; with two points it is exact. Residuals and errors
are reported on throughput: (predicted - measured) / measured tokens/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class StepTimeFit:
    """step_s = a_s + b_s_per_flop * flops_per_step, with the fit points' relative residuals."""

    a_s: float
    b_s_per_flop: float
    flops: list[float]
    step_s: list[float]

    def predict(self, flops_per_step: float) -> float:
        return self.a_s + self.b_s_per_flop * flops_per_step

    @property
    def asymptotic_flops_per_s(self) -> float:
        """FLOP/s the fit tends to for very large steps (1/b)."""
        return 1.0 / self.b_s_per_flop

    @property
    def residuals(self) -> list[float]:
        """Relative throughput error of each fit point, (predicted - measured) / measured
        tokens/s, which is measured / predicted step time - 1."""
        return [t / self.predict(f) - 1.0 for f, t in zip(self.flops, self.step_s, strict=True)]

    @property
    def rms_residual(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.residuals))))

    def to_dict(self) -> dict:
        return {"a_s": self.a_s, "b_s_per_flop": self.b_s_per_flop,
                "asymptotic_flops_per_s": self.asymptotic_flops_per_s,
                "points": [{"flops_per_step": f, "step_s": t, "residual": r}
                           for f, t, r in zip(self.flops, self.step_s, self.residuals, strict=True)],
                "rms_residual": self.rms_residual}


def fit_step_time(flops_per_step: Sequence[float], step_s: Sequence[float]) -> StepTimeFit:
    """Least-squares fit (relative error) of step_s = a + b * flops_per_step.

    Raises ValueError with fewer than two distinct FLOP counts, non-positive times, or a fit
    in which time does not grow with FLOPs (b <= 0: the measurements are noise).
    """
    F = np.asarray(flops_per_step, dtype=float)
    t = np.asarray(step_s, dtype=float)
    if F.shape != t.shape or F.ndim != 1:
        raise ValueError(f"need matching 1-D sequences, got {F.shape} FLOPs and {t.shape} times")
    if len(np.unique(F)) < 2:
        raise ValueError(f"the fit needs at least two different FLOP counts, got {F.tolist()}")
    if np.any(t <= 0) or np.any(F <= 0):
        raise ValueError("FLOPs and step times must be positive")
    scale = F.max()  # columns of similar size: lstsq on [1/t, F/t] would be ill-conditioned
    A = np.stack([1.0 / t, (F / scale) / t], axis=1)
    (a, b_scaled), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    b = b_scaled / scale
    if b <= 0:
        raise ValueError(
            f"step time does not grow with FLOPs in these runs (fitted b = {b:.3g} s/FLOP): "
            "the sizes are too close together or the machine was too busy; rerun with more "
            "steps or more distinct sizes"
        )
    return StepTimeFit(float(a), float(b), F.tolist(), t.tolist())


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Slope of log y against log x (least squares): 1 when y is proportional to x."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError("a log-log slope needs at least two different x values")
    return float(np.polyfit(lx, ly, 1)[0])


def attention_share_from_times(t_short: float, t_long: float, seq_short: int,
                               seq_long: int) -> float:
    """Share of the step time at `seq_long` that grows with the sequence length.

    At a fixed number of tokens per step, the attention core costs time proportional to T per
    token and everything else stays put: t(T) = t0 + c T. Two runs give c, and the share at
    the long length is c * T_long / t_long (the measured counterpart of 12LdT / (6N + 12LdT)).
    """
    if seq_long <= seq_short:
        raise ValueError(f"seq_long={seq_long} must exceed seq_short={seq_short}")
    c = (t_long - t_short) / (seq_long - seq_short)
    return c * seq_long / t_long


def within(measured: float, expected: float, rel_tol: float) -> bool:
    """|measured - expected| <= rel_tol * |expected|."""
    return abs(measured - expected) <= rel_tol * abs(expected)
