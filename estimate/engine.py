"""The one code path from a model shape to training time: `project` and `validate` both call
`estimate_run`, with the same defaults.

    plan  = the fastest layout that fits (estimate.planner), or the given one completed
    step  = perf.step_time(plan) in the best, central and worst cases
    time  = tokens / tokens-per-step x step / goodput(accelerators used)

Defaults (the same for a preset, a shape YAML, a size, and a published run):
- recomputation: as given, else the planner's (none where it fits, full where it must);
- global batch: as given, else the planner's (defaults.yaml `default_global_batch_tokens`,
  larger up to the critical batch where that is faster);
- layout: as given (a published layout applies at its published count only; `project` drops
  it at any other count), else the planner's;
- goodput: `compute_hours` are training time (the basis of published figures derived from
  throughput); `project` divides them by the wall-clock factor fitted on published runs
  (`published.fit`) for wall-clock hours. `wallclock_hours` divides by the failure model
  (perf.goodput) instead: only the count rule below uses it.
- accelerator count: as given, else the fewest power of two that trains within
  defaults.yaml `default_run_days` (`choose_count`).
"""

from __future__ import annotations

from dataclasses import dataclass

from estimate.hardware import Accelerator
from estimate.perf import Factor, StepTime, goodput, step_time
from estimate.planner import Plan, plan
from estimate.units import SECONDS_PER_HOUR
from model.config import ModelConfig

CASES = ("best", "central", "worst")
_PLANS: dict = {}


@dataclass
class Estimate:
    """A run through the performance model: its plan, step times and goodput by case."""

    cfg: ModelConfig
    acc: Accelerator
    count: int  # accelerators held (hours are counted on them)
    tokens: float
    plan: Plan
    steps: dict[str, StepTime]
    goodput: dict[str, float]

    @property
    def layout(self):
        return self.plan.best.layout

    @property
    def recompute(self) -> str:
        return self.plan.best.recompute

    @property
    def steps_taken(self) -> float:
        return self.tokens / self.layout.global_batch_tokens

    def compute_seconds(self, case: str = "central") -> float:
        """Wall-clock seconds of training time, no failures."""
        return self.steps_taken * self.steps[case].total

    def compute_hours(self, case: str = "central") -> float:
        """Accelerator-hours of training time, no failures (the basis of hours derived from
        throughput)."""
        return self.compute_seconds(case) * self.count / SECONDS_PER_HOUR

    def wallclock_hours(self, case: str = "central") -> float:
        """Accelerator-hours of elapsed time: failures and restarts included."""
        return self.compute_hours(case) / self.goodput[case]


def cached_plan(cfg: ModelConfig, seq_len: int, acc: Accelerator, n: int, precision: str,
                factors: dict[str, Factor], given: dict, recompute: str | None,
                batch: float | None, default_batch: float, tokens: float | None,
                peak_flops: float | None, trust_given: bool = False) -> Plan:
    """`planner.plan`, remembered: the choice depends on the central factors but not on the
    stack efficiency (it scales every layout's step alike), so validation's leave-one-out
    fits reuse it."""
    central = tuple(sorted((k, v.central) for k, v in factors.items() if k != "stack_efficiency"))
    key = (tuple(vars(cfg).values()), seq_len, acc.name, n, precision, central,
           tuple(sorted(given.items())), recompute, batch, default_batch, tokens, peak_flops,
           trust_given)
    if key not in _PLANS:
        _PLANS[key] = plan(cfg, seq_len, acc, n, precision, factors, given=given,
                           recompute=recompute, batch=batch, default_batch=default_batch,
                           tokens=tokens, peak_flops=peak_flops, trust_given=trust_given)
    return _PLANS[key]


def estimate_run(cfg: ModelConfig, seq_len: int, tokens: float, acc: Accelerator, n: int,
                 precision: str, factors: dict[str, Factor], defaults: dict, *,
                 given: dict | None = None, recompute: str | None = None,
                 peak_flops: float | None = None, published: bool = False) -> Estimate:
    """`cfg` trained on `tokens` at `seq_len` on n x `acc`: plan, then time every case. What
    fits nowhere is refused; but a `published` layout that splits the model (tp, pp, dp or ep:
    it ran) is kept where the memory model finds it too large, with a note."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    recompute = given.pop("recompute", None) or recompute
    batch = given.pop("global_batch_tokens", None)
    default_batch = float(defaults["performance"]["default_global_batch_tokens"]["value"])
    trust = published and any(k in given for k in ("tp", "pp", "dp", "ep"))
    p = cached_plan(cfg, seq_len, acc, n, precision, factors, given, recompute,
                    batch, default_batch, tokens, peak_flops, trust)
    lay = p.best.layout
    steps = {case: step_time(cfg, seq_len, acc, n, lay, precision, p.best.recompute, factors,
                             case, peak_flops) for case in CASES}
    g = {case: goodput(lay.devices, factors, case) for case in CASES}
    return Estimate(cfg, acc, n, tokens, p, steps, g)


def choose_count(cfg: ModelConfig, seq_len: int, tokens: float, acc: Accelerator,
                 precision: str, factors: dict[str, Factor], defaults: dict, *,
                 given: dict | None = None, recompute: str | None = None,
                 peak_flops: float | None = None, wallclock: bool = True,
                 published: bool = False) -> Estimate:
    """No count given: the fewest accelerators, a power of two from 1 to 65,536, that train the
    run within `default_run_days` (defaults.yaml); the largest when none does. Wall-clock time
    never rises with the count (the planner may leave accelerators idle; what fits on n fits on
    2n), so the fewest is found by bisection on the exponent."""
    days = float(defaults["performance"]["default_run_days"]["value"])
    if peak_flops is None:
        acc.peak_flops(precision)  # no such peak: say so, not "fits nowhere"
    found: dict[int, Estimate | None] = {}
    errors: dict[int, ValueError] = {}

    def at(i: int) -> Estimate | None:
        if i not in found:
            try:
                found[i] = estimate_run(cfg, seq_len, tokens, acc, 2 ** i, precision, factors,
                                        defaults, given=given, recompute=recompute,
                                        peak_flops=peak_flops, published=published)
            except ValueError as e:  # does not fit, or the given layout needs more
                found[i], errors[i] = None, e
        return found[i]

    def done(i: int) -> bool:
        e = at(i)
        if e is None:
            return False
        hours = e.wallclock_hours() if wallclock else e.compute_hours()
        return hours / e.count / 24 <= days

    top = 16
    if at(top) is None:
        raise ValueError(f"no count from 1 to 65536 accelerators: at 65536, {errors[top]}")
    if not done(top):
        return at(top)
    lo, hi = -1, top  # done(hi); not done(lo) (or lo below the range): bisect on the exponent
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if done(mid):
            hi = mid
        else:
            lo = mid
    return at(hi)
