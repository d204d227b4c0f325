"""Cross-validation of the performance model on published runs (`published_runs.yaml`).

Three splits, each a set of folds; a fold fits on its training runs only and predicts the
runs it holds out:

- leave-one-out (`loo`): one run held out at a time;
- leave-one-family-out (`lofo`): every run of a model family (`family` in the YAML, e.g. all
  of Llama 3) held out together, so no sibling's figure helps predict it;
- time split (`time`): fit on runs published before 2024, predict those of 2024 and later.

What a fold fits, from its training runs only (everything else is the performance model of
`estimate.perf` with the factors of defaults.yaml, which no fold changes):

- by median polish (`_central_fit`; Tukey 1977), ln(modelled at efficiency 1 / reported) as
  a sum of effects, each the median of what the others leave over its runs:
  - stack efficiency: over training runs whose hours count training time (`hours_basis`
    compute);
  - one factor per other hours basis: wall-clock (`wallclock`: count x elapsed days, failures,
    restarts and idle time included) and `unknown` (model cards' "total GPU time"); 1 when the
    fold has fewer than 2 such runs;
  - a planned-layout factor: over training runs that publish no tp, pp, dp or ep, whose
    layout the planner chose (the fastest that fits, which may be faster than what the run
    did); 1 when the fold has fewer than 2;
- the range: a nominal 80% split-conformal interval (`_quantiles`) of ln(reported /
  predicted) of the training runs, each predicted by a nested fit inside the fold that holds
  it out the way the split does (alone for leave-one-out; with its whole family for the other
  two), so the width is learnt from held-out errors, not from the fit's own residuals;
- the best constant MFU under the same split: the constant minimising the median |ln error| of
  the training runs, for comparison.

The modelled hours at efficiency 1 are computed once per run (their count, where unpublished,
chosen by `published.model_run`'s rule at efficiency 1, so no fitted figure enters it); a
fold's fit is then a few medians, which keeps `python -m estimate validate` fast.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from estimate.assumptions import load_defaults
from estimate.perf import load_factors
from estimate.published import (
    RUNS_PATH,
    UNIT,
    is_fast,
    is_planned,
    load_runs,
    model_run,
    reported_hours,
)
from estimate.report import md_table
from estimate.units import SECONDS_PER_HOUR, human
from model.flops import model_flops_per_token
from model.precision import precision as precision_of

SPLITS = ("loo", "lofo", "time")
SPLIT_TITLES = {"loo": "leave-one-out", "lofo": "leave-one-family-out",
                "time": "time split (fit on runs published before 2024, predict 2024 and later)"}
TIME_SPLIT_YEAR = 2024
RANGE_COVERAGE = 0.80  # the best-worst range is a nominal 80% interval
MIN_BASIS_RUNS = 2  # a basis factor needs at least this many training runs, else 1


@dataclass(frozen=True)
class Point:
    """One published run with reported hours, through the model once at efficiency 1."""

    name: str
    family: str
    year: int
    basis: str  # compute | wallclock | unknown
    reported: float  # accelerator-hours, reported or count x days x 24
    unit_hours: float  # modelled at stack efficiency 1 and goodput 1
    implied_mfu: float  # model FLOPs / (reported hours x peak)
    planned: bool = False  # no published tp/pp/dp/ep: the layout planner chose it
    fast: bool = False  # a fast accelerator (published.is_fast: bf16 peak >= 500 TFLOP/s)


@cache
def points(path: str = str(RUNS_PATH)) -> tuple[Point, ...]:
    """Every run of `path` that has reported (or derivable) accelerator-hours."""
    base = load_factors(load_defaults(), UNIT)
    out = []
    for run in load_runs(path):
        hours, _ = reported_hours(run)
        if hours is None:
            continue
        m = model_run(run, {**base, "stack_efficiency": UNIT})
        flops = model_flops_per_token(m.cfg, m.cfg.seq_len) * run["tokens"]
        peak = m.acc.peak_flops(precision_of(run["precision"]).catalog)
        out.append(Point(run["name"], run["family"], int(run["year"]), run["hours_basis"],
                         hours, m.hours, flops / (hours * SECONDS_PER_HOUR * peak),
                         is_planned(run), is_fast(m.acc)))
    return tuple(out)


@dataclass
class FoldFit:
    """What one fold learns from its training runs."""

    stack: float
    basis_factor: dict[str, float]  # modelled / reported hours per basis (compute: 1)
    range_log: tuple[float, float]  # conformal 80% interval of nested ln(reported / predicted)
    constant_mfu: float
    n_train: int
    planned_factor: float = 1.0  # modelled / reported hours of runs with a planned layout
    fast_factor: float = 1.0  # modelled / reported hours of runs on fast accelerators

    def factor(self, p: Point) -> float:
        """All the fitted factors the modelled hours of `p` at efficiency 1 are divided by."""
        return (self.stack * self.basis_factor.get(p.basis, 1.0)
                * (self.planned_factor if p.planned else 1.0)
                * (self.fast_factor if p.fast else 1.0))

    def predict(self, p: Point) -> float:
        return p.unit_hours / self.factor(p)

    def range(self, p: Point) -> tuple[float, float]:
        c = self.predict(p)
        return c * math.exp(self.range_log[0]), c * math.exp(self.range_log[1])


POLISH_ROUNDS = 50  # at most; the polish usually settles in a few


def _central_fit(train: list[Point]) -> tuple[float, dict[str, float], float, float]:
    """Stack efficiency, basis factors, planned-layout factor and fast-accelerator factor by
    median polish (Tukey 1977, Exploratory Data Analysis, ch. 11): ln(modelled at efficiency 1
    / reported) of a run is ln stack + ln basis factor (compute: 0) + ln planned factor
    (published layout: 0) + ln fast factor (bf16 peak under 500 TFLOP/s: 0); the effects are
    fitted in turn, each as the median of what the others leave, until they settle. A basis,
    the planned group or the fast group with fewer than MIN_BASIS_RUNS runs keeps factor 1."""
    compute = [p for p in train if p.basis == "compute"]
    if len(compute) < 3:
        raise ValueError(f"a fold needs at least 3 runs whose hours basis is compute, got {len(compute)}")
    r = {p: math.log(p.unit_hours / p.reported) for p in train}
    b = {"compute": 0.0, "wallclock": 0.0, "unknown": 0.0}
    c = h = s = 0.0
    planned = [p for p in train if p.planned]
    fast = [p for p in train if p.fast]

    def rest(p: Point, *, stack: bool = True, basis: bool = True, plan: bool = True,
             speed: bool = True) -> float:  # what the effects not named False leave of r
        return (r[p] - (s if stack else 0.0) - (b[p.basis] if basis else 0.0)
                - (c if plan and p.planned else 0.0) - (h if speed and p.fast else 0.0))

    for _ in range(POLISH_ROUNDS):
        before = (s, dict(b), c, h)
        s = statistics.median(rest(p, stack=False) for p in compute)
        for basis in ("wallclock", "unknown"):
            group = [rest(p, basis=False) for p in train if p.basis == basis]
            b[basis] = statistics.median(group) if len(group) >= MIN_BASIS_RUNS else 0.0
        c = statistics.median(rest(p, plan=False) for p in planned) if len(planned) >= MIN_BASIS_RUNS else 0.0
        h = statistics.median(rest(p, speed=False) for p in fast) if len(fast) >= MIN_BASIS_RUNS else 0.0
        if (s, b, c, h) == before:  # settled: each effect is the median of what the others leave
            break
    return math.exp(s), {k: math.exp(v) for k, v in b.items()}, math.exp(c), math.exp(h)


def factor_ranges(train: list[Point]) -> dict[str, tuple[float, float]]:
    """Each fitted factor's own range: the 25th-75th percentiles of the ratios it is the median
    of, the other fitted factors applied (stack efficiency: compute runs; a basis factor: that
    basis' runs; `planned`: the runs whose layout was planned)."""
    stack, basis, planned, fast = _central_fit(train)
    fold = FoldFit(stack, basis, (0.0, 0.0), 0.0, len(train), planned, fast)

    def ratio(p: Point, leave: float) -> float:  # modelled / reported, one factor left out
        return p.unit_hours / (fold.factor(p) / leave) / p.reported

    groups = {"stack_efficiency": [ratio(p, stack) for p in train if p.basis == "compute"],
              "planned": [ratio(p, planned) for p in train if p.planned],
              "fast": [ratio(p, fast) for p in train if p.fast]}
    for b in ("wallclock", "unknown"):
        groups[b] = [ratio(p, basis[b]) for p in train if p.basis == b]
    out = {}
    for key, ratios in groups.items():
        if len(ratios) >= MIN_BASIS_RUNS:
            q = statistics.quantiles(ratios, n=4, method="inclusive")
            out[key] = (q[0], q[2])
    return out


def fitted(path: str | Path = RUNS_PATH) -> FoldFit:
    """The fit on every published run (what a projection would use): stack efficiency, the
    wall-clock and unknown-basis factors, and the range calibrated on leave-one-family-out
    held-out errors."""
    return fit_fold(list(points(str(path))), by_family=True)


def best_constant_mfu(implied: list[float]) -> tuple[float, float]:
    """The constant MFU minimising the median |ln(implied / MFU)|, and that median. The
    optimum sits at a run's log implied MFU or midway between two: all are tried."""
    logs = [math.log(m) for m in implied]
    candidates = {(a + b) / 2 for a in logs for b in logs}

    def median_error(c: float) -> float:
        return statistics.median(abs(x - c) for x in logs)

    best = min(sorted(candidates), key=median_error)
    return math.exp(best), median_error(best)


def nested_errors(train: list[Point], by_family: bool) -> list[tuple[Point, float]]:
    """ln(reported / predicted) of each training run, predicted by a fit on the other training
    runs (its whole family left out too when `by_family`): the held-out errors the range is
    calibrated on, learnt inside the fold."""
    out = []
    groups = ({p.family for p in train} if by_family else {p.name for p in train})
    for g in sorted(groups):
        held = [p for p in train if (p.family if by_family else p.name) == g]
        rest = [p for p in train if p not in held]
        try:
            s, f, planned, fast = _central_fit(rest)
        except ValueError:  # too few compute runs left: these runs cannot be held out
            continue
        fold = FoldFit(s, f, (0.0, 0.0), 0.0, len(rest), planned, fast)
        out += [(p, math.log(p.reported / fold.predict(p))) for p in held]
    return out


def _quantiles(errors: list[float]) -> tuple[float, float]:
    """The split-conformal interval of the held-out errors (Vovk et al. 2005; Lei et al. 2018,
    arXiv:1604.04173): the k-th smallest and k-th largest of n errors with
    k = floor((n + 1) * alpha / 2), alpha = 1 - RANGE_COVERAGE, which covers a new error from
    the same distribution with probability >= RANGE_COVERAGE; a plain percentile of a few
    dozen errors is narrower than that. Widened to include 0 (the central prediction)."""
    e = sorted(errors)
    n = len(e)
    alpha = 1.0 - RANGE_COVERAGE
    k = max(1, math.floor((n + 1) * alpha / 2 + 1e-9))  # 1e-9: 1 - 0.8 is not exactly 0.2
    lo, hi = e[k - 1], e[n - k]
    return min(lo, 0.0), max(hi, 0.0)


def fit_fold(train: list[Point], by_family: bool = False) -> FoldFit:
    """Fit the stack efficiency, the basis factors, the range and the best constant MFU on
    `train` only; the range on nested held-out errors (whole families held out when
    `by_family`, as the split itself does)."""
    stack, factors, planned, fast = _central_fit(train)
    return FoldFit(stack, factors, _quantiles([e for _, e in nested_errors(train, by_family)]),
                   best_constant_mfu([p.implied_mfu for p in train])[0], len(train), planned, fast)


def folds(split: str, pts: tuple[Point, ...]) -> list[tuple[str, list[Point], list[Point]]]:
    """(fold label, training runs, held-out runs) of a split."""
    if split == "loo":
        return [(p.name, [q for q in pts if q is not p], [p]) for p in pts]
    if split == "lofo":
        families = sorted({p.family for p in pts})
        return [(f, [q for q in pts if q.family != f], [q for q in pts if q.family == f])
                for f in families]
    if split == "time":
        train = [p for p in pts if p.year < TIME_SPLIT_YEAR]
        test = [p for p in pts if p.year >= TIME_SPLIT_YEAR]
        return [(f"before {TIME_SPLIT_YEAR}", train, test)]
    raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


@dataclass
class Prediction:
    point: Point
    fold: str
    predicted: float
    best: float
    worst: float
    constant_predicted: float
    stack: float
    basis_factor: float

    @property
    def log_error(self) -> float:
        return math.log(self.predicted / self.point.reported)

    @property
    def constant_log_error(self) -> float:
        return math.log(self.constant_predicted / self.point.reported)

    @property
    def in_range(self) -> bool:
        return self.best <= self.point.reported <= self.worst

    @property
    def width(self) -> float:
        return self.worst / self.best


def cross_validate(split: str, path: str | Path = RUNS_PATH,
                   fitter: Callable[[list[Point], bool], FoldFit] = fit_fold) -> list[Prediction]:
    """Every held-out run of `split`, predicted by a fit on its fold's training runs only."""
    out = []
    for label, train, test in folds(split, points(str(path))):
        f = fitter(train, split != "loo")
        for p in test:
            best, worst = f.range(p)
            out.append(Prediction(p, label, f.predict(p), best, worst,
                                  p.reported * p.implied_mfu / f.constant_mfu, f.stack,
                                  f.basis_factor.get(p.basis, 1.0)))
    return out


def summary(preds: list[Prediction]) -> dict:
    errs = [abs(p.log_error) for p in preds]
    const = [abs(p.constant_log_error) for p in preds]
    return {
        "n": len(preds),
        "median_abs_log_error": statistics.median(errs),
        "best_constant_median_abs_log_error": statistics.median(const),
        "ratio_to_constant": statistics.median(errs) / statistics.median(const),
        "in_range": sum(p.in_range for p in preds),
        "fraction_in_range": sum(p.in_range for p in preds) / len(preds),
        "median_range_width": statistics.median(p.width for p in preds),
        "worst_abs_log_error": max(errs),
        "worst_run": preds[errs.index(max(errs))].point.name,
    }


GOALS = {"lofo": {"median_abs_log_error": 0.20, "ratio_to_constant": 0.75,
                  "fraction_in_range": 0.80, "median_range_width": 2.5},
         "time": {"median_abs_log_error": 0.25}}


def goal_line(split: str, s: dict) -> str:
    """The issue's goals for this split, each with met / not met."""
    goals = GOALS.get(split)
    if not goals:
        return ""
    parts = []
    for key, bound in goals.items():
        ok = s[key] >= bound if key == "fraction_in_range" else s[key] <= bound
        sign = ">=" if key == "fraction_in_range" else "<="
        parts.append(f"{key} {s[key]:.3f} {sign} {bound}: {'met' if ok else 'NOT met'}")
    return "goals: " + "; ".join(parts)


def summary_text(split: str, s: dict) -> str:
    return (f"{SPLIT_TITLES[split]}: median |ln error| {s['median_abs_log_error']:.3f} over "
            f"{s['n']} runs (best constant MFU under the same split: "
            f"{s['best_constant_median_abs_log_error']:.3f}, ratio "
            f"{s['ratio_to_constant']:.2f}); {s['in_range']}/{s['n']} "
            f"({s['fraction_in_range']:.0%}) inside the best-worst range, median width "
            f"{s['median_range_width']:.2f}x; worst {s['worst_abs_log_error']:.2f} "
            f"({s['worst_run']})")


def table(preds: list[Prediction]) -> str:
    rows = [[p.point.name, p.fold if p.fold != p.point.name else "-", p.point.basis,
             human(p.point.reported), human(p.predicted), f"{p.log_error:+.2f}",
             f"{human(p.best)}–{human(p.worst)}", "yes" if p.in_range else "NO",
             f"{p.constant_log_error:+.2f}"] for p in preds]
    return md_table(["run", "held out with", "hours basis", "reported acc-hours", "predicted",
                     "ln error", "best–worst", "in range", "best-constant ln error"], rows)


def all_splits(path: str | Path = RUNS_PATH) -> dict[str, tuple[list[Prediction], dict]]:
    out = {}
    for split in SPLITS:
        preds = cross_validate(split, path)
        out[split] = (preds, summary(preds))
    return out


def markdown(results: dict[str, tuple[list[Prediction], dict]], path: str | Path = RUNS_PATH) -> str:
    parts = ["## Cross-validation", "",
             "Each fold fits the stack efficiency, one factor per hours basis (wall-clock, "
             "unknown), a factor for planned layouts and one for fast accelerators, the best-worst range (a nominal 80% split-conformal interval of the "
             "fold's own nested held-out errors) and the best constant MFU on its training runs only; ln "
             "error = ln(predicted / reported accelerator-hours). See estimate/crossval.py.",
             ""]
    f = fitted(path)
    ranges = factor_ranges(list(points(str(path))))
    lines = [f"- stack efficiency {f.stack:.3f} (25th-75th percentile "
             f"{ranges['stack_efficiency'][0]:.3f}-{ranges['stack_efficiency'][1]:.3f})"]
    for basis in ("wallclock", "unknown"):
        lo, hi = ranges.get(basis, (float("nan"),) * 2)
        lines.append(f"- {basis} hours: modelled / reported {f.basis_factor[basis]:.3f} "
                     f"({lo:.3f}-{hi:.3f})")
    lo, hi = ranges.get("planned", (float("nan"),) * 2)
    lines.append(f"- planned layout (none published): modelled / reported {f.planned_factor:.3f} "
                 f"({lo:.3f}-{hi:.3f})")
    lo, hi = ranges.get("fast", (float("nan"),) * 2)
    lines.append(f"- fast accelerator (bf16 peak >= 500 TFLOP/s): modelled / reported "
                 f"{f.fast_factor:.3f} ({lo:.3f}-{hi:.3f})")
    lines.append(f"- best-worst range: x{math.exp(f.range_log[0]):.2f} to "
                 f"x{math.exp(f.range_log[1]):.2f} of the central prediction")
    parts += ["Fitted on all runs (what a projection would use; estimate.crossval.fitted):", "",
              *lines, ""]
    for split, (preds, s) in results.items():
        parts += [f"### {SPLIT_TITLES[split]}", "", table(preds), "",
                  f"**Summary:** {summary_text(split, s)}.", ""]
        goals = goal_line(split, s)
        if goals:
            parts += [goals, ""]
    return "\n".join(parts)


def record(results: dict[str, tuple[list[Prediction], dict]]) -> dict:
    return {split: {"summary": s, "runs": [
        {"name": p.point.name, "family": p.point.family, "year": p.point.year,
         "fold": p.fold, "hours_basis": p.point.basis, "reported_hours": p.point.reported,
         "predicted_hours": p.predicted, "best_hours": p.best, "worst_hours": p.worst,
         "log_error": p.log_error, "in_range": p.in_range, "stack_efficiency": p.stack,
         "basis_factor": p.basis_factor, "planned_layout": p.point.planned,
         "best_constant_log_error": p.constant_log_error}
        for p in preds]} for split, (preds, s) in results.items()}
