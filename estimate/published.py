"""Published training runs (`published_runs.yaml`) as inputs of the performance model, and the
fit on them that `project`, the stages files and `validate` share (`fit`).

Each run's model, tokens, accelerator, precision and (where published) parallel layout go
through `estimate.engine.estimate_run`, the function `project` calls; where a run publishes no
accelerator count, layout or batch, the layout planner (`estimate.planner`) and
`engine.choose_count` fill them in, with the defaults `project` uses.

`fit` is `estimate.crossval`'s fit (median polish over the runs used): the stack efficiency,
what the modelled terms leave out, from the runs whose hours count training time; a factor per
hours basis (wall-clock, unknown) the modelled hours are divided by; and a factor for runs whose
layout the planner chose (`is_planned`). Predicting a published run fits it on the other runs
only (leave-one-out), so no run's own figure helps predict it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from estimate.assumptions import load_defaults
from estimate.engine import choose_count, estimate_run
from estimate.hardware import Accelerator, get_accelerator
from estimate.perf import Factor, Layout, load_factors
from estimate.planner import plan
from estimate.units import SECONDS_PER_HOUR, parse_count
from model.config import PRESETS, ModelConfig, get_preset
from model.precision import precision as precision_of

RUNS_PATH = Path(__file__).with_name("published_runs.yaml")
_RUN_KEYS = ("name", "family", "year", "model", "params", "active_params", "tokens", "accelerator", "precision",
             "count", "reported", "citations", "uncertain")
_REPORTED_KEYS = ("accelerator_hours", "days", "flops", "mfu")
LAYOUT_KEYS = ("tp", "pp", "dp", "cp", "ep", "micro_batch", "global_batch_tokens",
               "virtual_stages", "schedule", "recompute", "max_nodes_per_token", "zero")
BASES = ("compute", "wallclock", "unknown")
FORMATS = (3,)  # format 3 added `family` and `year`, which the cross-validation needs
UNIT = Factor("stack_efficiency", 1.0, 1.0, 1.0, "high", "1: nothing left out")


def load_runs(path: str | Path = RUNS_PATH) -> list[dict]:
    """The published runs, checked for required keys and at least one citation each."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if data.get("format") not in FORMATS:
        raise ValueError(f"{path}: format {data.get('format')!r}; this reader knows {FORMATS}")
    runs = data["runs"]
    for run in runs:
        where = f"{path}: run {run.get('name', '?')!r}"
        missing = [k for k in _RUN_KEYS if k not in run]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        missing = [k for k in _REPORTED_KEYS if k not in run["reported"]]
        if missing:
            raise ValueError(f"{where}: reported lacks {', '.join(missing)} (use null for unknown)")
        if not run["citations"] or not all(c.get("what") and c.get("source") for c in run["citations"]):
            raise ValueError(f"{where} needs citations with 'what' and 'source'")
        if not isinstance(run["year"], int) or not 1990 <= run["year"] <= 2100:
            raise ValueError(f"{where}: year {run['year']!r} is not a publication year")
        if not isinstance(run["family"], str) or not run["family"]:
            raise ValueError(f"{where}: family {run['family']!r} must be a non-empty name")
        run.setdefault("hours_basis", "unknown")
        if run["hours_basis"] not in BASES:
            raise ValueError(f"{where}: hours_basis {run['hours_basis']!r}; valid: {', '.join(BASES)}")
        unknown = set(run.get("layout") or {}) - set(LAYOUT_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown layout key(s) {sorted(unknown)}")
        # YAML 1.1 reads 30.84e6 (no sign in the exponent) as a string: normalise the numbers.
        for key in ("params", "active_params", "tokens"):
            run[key] = parse_count(run[key], f"{where} {key}")
        run["count"] = None if run["count"] is None else int(parse_count(run["count"], f"{where} count"))
        for key in _REPORTED_KEYS:
            if run["reported"][key] is not None:
                run["reported"][key] = parse_count(run["reported"][key], f"{where} reported.{key}")
        layout = run.get("layout") or {}
        if layout.get("global_batch_tokens") is not None:
            layout["global_batch_tokens"] = parse_count(layout["global_batch_tokens"], where)
    return runs


def is_planned(run: dict) -> bool:
    """The run publishes no tp, pp, dp or ep: its layout is the planner's, which picks the
    fastest that fits, and so may be faster than what the run did."""
    layout = run.get("layout") or {}
    return not any(layout.get(k) is not None for k in ("tp", "pp", "dp", "ep"))


FAST_PEAK_FLOPS = 500e12  # bf16 dense peak from which an accelerator counts as fast (H100, H800, B200)


def is_fast(acc: Accelerator) -> bool:
    """A fast accelerator (dense bf16 peak >= 500 TFLOP/s: Hopper and later): the runs fitted
    on show these reaching less of what the performance model predicts than A100, V100 or TPU
    runs (kernels, memory and networks that grew slower than the matmul peak); the fit gives
    them their own factor (estimate.crossval)."""
    return "bf16" in acc.precisions() and acc.peak_flops("bf16") >= FAST_PEAK_FLOPS


def published_setup(preset: str, path: str | Path = RUNS_PATH) -> dict | None:
    """The published training set-up of a preset's run (the first run in published_runs.yaml
    whose model is the preset): name, precision, count, layout and tokens; None if none."""
    for run in load_runs(path):
        if run["model"] == preset:
            layout = {k: v for k, v in (run.get("layout") or {}).items() if v is not None}
            return {"name": run["name"], "precision": run["precision"], "count": run["count"],
                    "layout": layout, "tokens": run["tokens"], "hours": reported_hours(run)[0],
                    "hours_basis": run["hours_basis"]}
    return None


def run_config(run: dict) -> ModelConfig:
    model = run["model"]
    if isinstance(model, dict):
        return ModelConfig(**model)
    if model not in PRESETS:
        raise ValueError(f"run {run['name']!r}: unknown preset {model!r}")
    return get_preset(model)


def reported_hours(run: dict) -> tuple[float | None, str]:
    """Accelerator-hours as published, or count x days x 24; and how they were obtained."""
    rep = run["reported"]
    if rep["accelerator_hours"] is not None:
        return float(rep["accelerator_hours"]), "reported"
    if rep["days"] is not None and run["count"]:
        return float(run["count"]) * float(rep["days"]) * 24.0, "count x days x 24"
    return None, "none"


@dataclass
class Modelled:
    """A published run through the performance model."""

    run: dict
    cfg: ModelConfig
    acc: Accelerator
    count: int
    count_rule: bool  # the count was not published: chosen by the default_run_days rule
    layout: Layout
    recompute: str
    seconds_per_step: float
    steps: float
    goodput: float  # the fitted factor of the run's hours basis (1: compute hours)

    @property
    def hours(self) -> float:
        return self.steps * self.seconds_per_step * self.count / SECONDS_PER_HOUR / self.goodput


def model_run(run: dict, factors: dict[str, Factor], case: str = "central",
              count: int | None = None, fit: Fit | None = None) -> Modelled:
    """The run's accelerator-hours as the performance model predicts them, through the same
    function as `project` (`estimate.engine.estimate_run`, same defaults). `count` overrides
    the published (or rule-chosen) number of accelerators. With a `fit` (`fit()`), its stack
    efficiency (x its planned-layout factor where the run publishes no layout) replaces the one
    in `factors`, and the hours are divided by the fitted factor of the run's hours basis, as
    `project` divides its wall-clock figure by the wall-clock factor; without one, they are the
    modelled hours with the given factors and nothing else (what the fit itself needs)."""
    d = load_defaults()
    cfg = run_config(run)
    acc = get_accelerator(run["accelerator"])
    given = {k: v for k, v in (run.get("layout") or {}).items() if v is not None}
    precision = precision_of(run["precision"]).catalog
    if fit is not None:
        factors = {**factors, "stack_efficiency": fit.stack_for(is_planned(run), acc)}
    args = (cfg, cfg.seq_len, run["tokens"], acc)
    n = count or run["count"]
    if n:
        e = estimate_run(*args, int(n), precision, factors, d, given=given, published=True)
    else:
        e = choose_count(*args, precision, factors, d, given=given,
                         wallclock=run["hours_basis"] == "wallclock", published=True)
    g = 1.0 if fit is None else fit.basis[run["hours_basis"]].at(case)
    return Modelled(run, cfg, acc, e.count, run["count"] is None, e.layout, e.recompute,
                    e.steps[case].total, e.steps_taken, g)


def complete_layout(cfg: ModelConfig, n: int, acc: Accelerator, seq_len: int, batch: float,
                    given: dict, recompute: str | None = None) -> Layout:
    """The given layout, completed by the planner (estimate.planner) where parts are missing."""
    factors = load_factors(load_defaults(), UNIT)
    given = {k: v for k, v in given.items() if v is not None and k != "global_batch_tokens"}
    trust = any(k in given for k in ("tp", "pp", "dp", "ep"))  # stage layouts are published
    return plan(cfg, seq_len, acc, n, precision_of("bf16").catalog, factors, given=given,
                recompute=recompute, batch=batch, trust_given=trust).best.layout


@dataclass
class Fit:
    """The factors fitted on published runs (estimate.crossval, all runs): what `project`, the
    stages and `validate` divide the modelled hours by."""

    stack: Factor  # stack efficiency, on the runs whose hours count training time
    basis: dict[str, Factor]  # modelled / reported hours by hours basis (compute: 1)
    planned: Factor  # modelled / reported hours of runs whose layout the planner chose
    runs: int
    range_log: tuple[float, float]  # the best-worst range of a prediction (ln, conformal)
    fast: Factor = UNIT  # modelled / reported hours of runs on fast accelerators (is_fast)

    @property
    def wallclock_goodput(self) -> float:
        return self.basis["wallclock"].central

    def stack_for(self, planned: bool, acc: Accelerator | None = None) -> Factor:
        """The stack efficiency of a run whose layout is planned (x the planned factor) or
        published, on `acc` (x the fast-accelerator factor where `is_fast(acc)`)."""
        out = self.stack
        for applies, f, what in ((planned, self.planned, "a planned layout"),
                                 (acc is not None and is_fast(acc), self.fast, "a fast accelerator")):
            if applies:
                out = Factor("stack_efficiency", out.central * f.central, out.low * f.low,
                             out.high * f.high, "high",
                             f"{out.source}; x{f.central:.3f} for {what} ({f.source})")
        return out


def fit(exclude: str | None = None, path: str | Path = RUNS_PATH) -> Fit:
    """The fit of `estimate.crossval` (stack efficiency, a factor per hours basis, a factor for
    planned layouts, by median polish) on the published runs, leaving out `exclude`; each
    factor's range: the 25th-75th percentiles of the ratios it is the median of."""
    from estimate import crossval  # crossval builds on model_run, below

    train = [p for p in crossval.points(str(path)) if p.name != exclude]
    f = crossval.fit_fold(train, by_family=exclude is None)
    ranges = crossval.factor_ranges(train)
    left_out = f", {exclude} left out" if exclude else ""

    def factor(key: str, central: float, what: str) -> Factor:
        lo, hi = ranges.get(key, (central, central))
        return Factor(key, central, min(lo, central), max(hi, central), "high",
                      f"fitted (estimate.crossval, {len(train)} published runs{left_out}): "
                      f"{what}; range: 25th-75th percentiles ({lo:.2f}-{hi:.2f})")

    stack = factor("stack_efficiency", f.stack,
                   "median modelled hours at efficiency 1 / reported, compute-hour runs")
    basis = {"compute": Factor("compute", 1.0, 1.0, 1.0, "high", "the reference basis")}
    for b in ("wallclock", "unknown"):
        basis[b] = factor(b, f.basis_factor[b], f"modelled / reported hours, {b}-basis runs")
    planned = factor("planned", f.planned_factor,
                     "modelled / reported hours, runs with no published layout")
    fast = factor("fast", f.fast_factor,
                  f"modelled / reported hours, runs on accelerators of >= {FAST_PEAK_FLOPS / 1e12:.0f} "
                  "bf16 TFLOP/s peak")
    return Fit(stack, basis, planned, len(train), f.range_log, fast)


@cache
def fitted_flops_per_token(path: str | Path = RUNS_PATH) -> float:
    """The median hardware FLOPs per token (recomputation included) of the runs the stack
    efficiency is fitted on: the size at which that efficiency holds."""
    from model.flops import hardware_flops_per_token

    sizes = []
    for run in load_runs(path):
        if run["hours_basis"] == "wallclock" or reported_hours(run)[0] is None:
            continue
        cfg = run_config(run)
        recompute = (run.get("layout") or {}).get("recompute") or "selective"
        sizes.append(hardware_flops_per_token(cfg, cfg.seq_len, recompute))
    return statistics.median(sizes)
