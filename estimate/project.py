"""Training duration from FLOPs, hardware and named assumptions.

    total FLOPs = model FLOPs/token x tokens
    time        = total FLOPs / (n_acc x peak x MFU x scaling efficiency x goodput)

MFU is on model FLOPs, so recomputation enters only through the MFU assumption (see
`estimate.assumptions`). Accelerator-hours are n_acc x wall-clock, downtime included (the
accelerators are held while the job restarts), which is how published GPU-hours are counted.
The best case takes every assumption at its favourable end, the worst case at its unfavourable
end: a deliberately wide envelope, not a confidence interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from estimate.assumptions import AssumptionSet
from estimate.hardware import Accelerator
from estimate.target import Target
from estimate.units import SECONDS_PER_DAY, SECONDS_PER_HOUR

CASES = ("best", "central", "worst")
# Mixed-precision Adam keeps bf16 weights and gradients plus fp32 master weights and two fp32
# moments: 2 + 2 + 4 + 4 + 4 = 16 bytes per parameter (Rajbhandari et al. 2020, ZeRO, sec. 3.1).
TRAINING_STATE_BYTES_PER_PARAM = 16
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal ~20 tokens/parameter


def training_seconds(total_flops: float, n_acc: float, peak_flops: float, mfu: float,
                     scaling: float = 1.0, goodput: float = 1.0) -> float:
    """Wall-clock seconds to do `total_flops` of model FLOPs on `n_acc` accelerators."""
    for name, v in (("total_flops", total_flops), ("n_acc", n_acc), ("peak_flops", peak_flops),
                    ("mfu", mfu), ("scaling", scaling), ("goodput", goodput)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return total_flops / (n_acc * peak_flops * mfu * scaling * goodput)


@dataclass
class Outcome:
    """One case of a projection."""

    case: str
    mfu: float
    scaling: float
    goodput: float
    seconds: float
    accelerator_hours: float
    energy_mwh: float | None
    cost_usd: float | None

    @property
    def days(self) -> float:
        return self.seconds / SECONDS_PER_DAY


@dataclass
class Check:
    """A sanity check on the inputs: 'ok', 'info' or 'warn', with what it found."""

    name: str
    status: str
    message: str


@dataclass
class Projection:
    target: Target
    tokens: float
    accelerator: Accelerator
    n_acc: int
    precision: str
    recompute: str
    assumptions: AssumptionSet
    peak_flops: float
    total_model_flops: float
    total_hardware_flops: float
    outcomes: dict[str, Outcome]
    checks: list[Check] = field(default_factory=list)

    @property
    def central(self) -> Outcome:
        return self.outcomes["central"]

    def to_dict(self) -> dict:
        """A JSON-ready record: inputs, every assumption with its source, the three cases."""
        a = self.assumptions
        return {
            "kind": "projection",
            "format": 1,
            "target": {
                "name": self.target.name,
                "params": self.target.params,
                "active_params": self.target.active_params,
                "seq_len": self.target.seq_len,
                "is_moe": self.target.is_moe,
                "model_flops_per_token": self.target.model_flops_per_token,
                "attention_flops_per_token": self.target.attention_flops_per_token,
                "notes": self.target.notes,
            },
            "tokens": self.tokens,
            "accelerator": {"name": self.accelerator.name, "count": self.n_acc,
                            "peak_flops": self.peak_flops, "source": self.accelerator.source},
            "precision": self.precision,
            "recompute": self.recompute,
            "total_model_flops": self.total_model_flops,
            "total_hardware_flops": self.total_hardware_flops,
            "assumptions": {x.key: asdict(x) for x in a.numeric()},
            "settings": [asdict(s) for s in a.settings],
            "outcomes": {k: asdict(o) | {"days": o.days} for k, o in self.outcomes.items()},
            "checks": [asdict(c) for c in self.checks],
        } | ({"calibration_prior": a.calibration_prior.to_dict()}
             if a.calibration_prior is not None else {}) | (
            {"layout_plan": {"layout": asdict(a.performance.layout),
                             "recompute": a.performance.recompute,
                             "lines": a.performance.plan.lines()}}
            if a.performance is not None and a.performance.plan is not None else {})


def project(target: Target, tokens: float, acc: Accelerator, n_acc: int,
            assumptions: AssumptionSet, precision: str = "bf16",
            recompute: str = "none", peak_flops: float | None = None) -> Projection:
    """Project the training time, accelerator-hours, energy and cost in the three cases."""
    if n_acc < 1 or int(n_acc) != n_acc:
        raise ValueError(f"accelerator count must be a positive integer, got {n_acc!r}")
    peak = peak_flops or acc.peak_flops(precision)
    total = target.model_flops_per_token * tokens
    a = assumptions
    outcomes = {}
    for case in CASES:
        mfu, scaling, goodput = a.mfu.at(case), a.scaling.at(case), a.goodput.at(case)
        seconds = training_seconds(total, n_acc, peak, mfu, scaling, goodput)
        hours = n_acc * seconds / SECONDS_PER_HOUR
        energy = None
        if a.power_w is not None:
            energy = hours * a.power_w.at(case) * a.pue.at(case) / 1e6  # Wh -> MWh
        cost = hours * a.price.at(case) if a.price is not None else None
        outcomes[case] = Outcome(case, mfu, scaling, goodput, seconds, hours, energy, cost)
    p = Projection(target, tokens, acc, n_acc, precision, recompute, a, peak, total,
                   total * target.recompute_ratio[recompute], outcomes)
    p.checks = run_checks(p)
    return p


def run_checks(p: Projection) -> list[Check]:
    """Checks of the inputs against each other: memory, HFU, data size, assumption warnings."""
    checks = []
    state = TRAINING_STATE_BYTES_PER_PARAM * p.target.params
    mem = p.accelerator.get("memory_gb")
    perf = p.assumptions.performance
    if mem and perf is not None and perf.plan is not None:
        from estimate.memory import usable_bytes

        used, cap = perf.plan.best.memory, usable_bytes(mem)
        status = "ok" if used.total <= cap else "warn"
        checks.append(Check("memory", status, f"per device, the chosen layout: {used.describe()} "
                            f"of {cap / 1e9:.3g} GB usable ({mem:g} GB); estimate/memory.py"))
    elif mem:
        per_acc = state / p.n_acc
        need = math.ceil(state / (mem * 1e9))
        frac = per_acc / (mem * 1e9)
        msg = (f"weights + gradients + Adam state = {TRAINING_STATE_BYTES_PER_PARAM} B/param x "
               f"{p.target.params:.4g} = {state / 1e12:.3g} TB; fully sharded over {p.n_acc} "
               f"accelerators that is {per_acc / 1e9:.3g} GB of {mem:g} GB each ({frac:.0%}), "
               f"activations not counted; at least {need} accelerators needed")
        status = "warn" if frac > 0.5 else "ok"
        if frac > 1:
            msg = "does not fit: " + msg
        checks.append(Check("memory", status, msg))
    hfu = p.assumptions.mfu.central * p.target.recompute_ratio[p.recompute]
    checks.append(Check("hfu", "warn" if hfu > 1 else "ok",
                        f"implied HFU (hardware FLOPs / peak) at the central MFU: {hfu:.2f}"))
    tpp = p.tokens / p.target.active_params
    checks.append(Check("tokens_per_param", "info",
                        f"{tpp:.3g} tokens per (active) parameter; compute-optimal is about "
                        f"{CHINCHILLA_TOKENS_PER_PARAM} (Hoffmann et al. 2022)"))
    for w in p.assumptions.warnings:
        checks.append(Check("assumption", "warn", w))
    return checks
