"""Back-testing the projection on published training runs (`published_runs.yaml`).

For each run the estimator predicts accelerator-hours from the run's model, tokens, accelerator
and precision under its DEFAULT assumptions - it is not told the run's own MFU - and compares
them with what was reported. It also works backwards from the reported hours to the run's
implied (effective) MFU, downtime included:

    implied MFU = model FLOPs / (reported accelerator-hours x 3600 x peak)

so implied MFU = MFU x scaling x goodput of the default model, which is what to compare with
the default central product (0.40 x 1.0 x 0.9 = 0.36 for bf16).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from estimate.assumptions import build_assumptions, load_defaults
from estimate.hardware import Accelerator, get_accelerator
from estimate.project import Projection, project
from estimate.report import md_table
from estimate.target import Target, resolve_target
from estimate.units import SECONDS_PER_HOUR, human, parse_count

RUNS_PATH = Path(__file__).with_name("published_runs.yaml")
_RUN_KEYS = ("name", "model", "params", "active_params", "tokens", "accelerator", "precision",
             "count", "reported", "citations", "uncertain")
_REPORTED_KEYS = ("accelerator_hours", "days", "flops", "mfu")


def load_runs(path: str | Path = RUNS_PATH) -> list[dict]:
    """The published runs, checked for required keys and at least one citation each."""
    with open(path) as f:
        data = yaml.safe_load(f)
    runs = data["runs"]
    for run in runs:
        missing = [k for k in _RUN_KEYS if k not in run]
        if missing:
            raise ValueError(f"{path}: run {run.get('name', '?')!r} lacks {', '.join(missing)}")
        missing = [k for k in _REPORTED_KEYS if k not in run["reported"]]
        if missing:
            raise ValueError(f"{path}: run {run['name']!r} reported lacks {', '.join(missing)} "
                             "(use null for unknown)")
        if not run["citations"] or not all(c.get("what") and c.get("source") for c in run["citations"]):
            raise ValueError(f"{path}: run {run['name']!r} needs citations with 'what' and 'source'")
        # YAML 1.1 reads 30.84e6 (no sign in the exponent) as a string: normalise the numbers.
        where = f"{path}: run {run['name']!r}"
        for key in ("params", "active_params", "tokens"):
            run[key] = parse_count(run[key], f"{where} {key}")
        run["count"] = None if run["count"] is None else int(parse_count(run["count"], f"{where} count"))
        for key in _REPORTED_KEYS:
            if run["reported"][key] is not None:
                run["reported"][key] = parse_count(run["reported"][key], f"{where} reported.{key}")
    return runs


@dataclass
class RunCheck:
    """The estimator's default prediction for one published run, next to what was reported."""

    run: dict
    target: Target
    accelerator: Accelerator
    projection: Projection
    reported_hours: float | None
    hours_derived: bool  # reported hours computed as count x days x 24

    @property
    def name(self) -> str:
        return self.run["name"]

    @property
    def peak(self) -> float:
        return self.projection.peak_flops

    @property
    def predicted_hours(self) -> float:
        return self.projection.outcomes["central"].accelerator_hours

    @property
    def predicted_range(self) -> tuple[float, float]:
        o = self.projection.outcomes
        return o["best"].accelerator_hours, o["worst"].accelerator_hours

    @property
    def error(self) -> float | None:
        """(predicted - reported) / reported accelerator-hours."""
        if self.reported_hours is None:
            return None
        return self.predicted_hours / self.reported_hours - 1.0

    @property
    def within_range(self) -> bool | None:
        if self.reported_hours is None:
            return None
        lo, hi = self.predicted_range
        return lo <= self.reported_hours <= hi

    @property
    def predicted_days(self) -> float | None:
        return self.projection.central.days if self.run["count"] else None

    @property
    def days_error(self) -> float | None:
        days = self.run["reported"]["days"]
        if days is None or self.predicted_days is None:
            return None
        return self.predicted_days / days - 1.0

    @property
    def implied_mfu(self) -> float | None:
        """Model FLOPs over (reported hours x peak): the run's effective MFU, downtime included."""
        if self.reported_hours is None:
            return None
        return self.projection.total_model_flops / (self.reported_hours * SECONDS_PER_HOUR * self.peak)

    @property
    def flops_ratio(self) -> float | None:
        """Our model FLOPs over the FLOPs the authors reported."""
        flops = self.run["reported"]["flops"]
        return None if flops is None else self.projection.total_model_flops / float(flops)


def check_run(run: dict, defaults: dict | None = None) -> RunCheck:
    """Predict one published run under the default assumptions."""
    d = defaults if defaults is not None else load_defaults()
    model = run["model"]
    if isinstance(model, dict):
        from model.config import ModelConfig

        model = ModelConfig(**model)
    target = resolve_target(model, params=float(run["params"]),
                            active_params=float(run["active_params"]), name=run["name"])
    acc = get_accelerator(run["accelerator"])
    count = int(run["count"]) if run["count"] else 1  # hours do not depend on the count
    assumptions = build_assumptions(target, acc, count, run["precision"], defaults=d)
    p = project(target, parse_count(run["tokens"], "tokens"), acc, count, assumptions,
                run["precision"])
    rep = run["reported"]
    hours, derived = rep["accelerator_hours"], False
    if hours is None and rep["days"] is not None and run["count"]:
        hours, derived = float(run["count"]) * float(rep["days"]) * 24.0, True
    return RunCheck(run, target, acc, p, None if hours is None else float(hours), derived)


def summarize(checks: list[RunCheck]) -> dict:
    """Error statistics over the runs with reported (or derived) accelerator-hours."""
    scored = [c for c in checks if c.error is not None]
    errors = [c.error for c in scored]
    if not errors:
        return {"n": 0}
    abs_pct = [100 * abs(e) for e in errors]
    log_ratios = [math.log(1 + e) for e in errors]
    implied = [c.implied_mfu for c in scored]
    return {
        "n": len(errors),
        "n_derived_hours": sum(c.hours_derived for c in scored),
        "median_abs_pct_error": statistics.median(abs_pct),
        "mean_abs_pct_error": statistics.fmean(abs_pct),
        "max_abs_pct_error": max(abs_pct),
        "median_pct_error": 100 * statistics.median(errors),
        "geometric_mean_ratio": math.exp(statistics.fmean(log_ratios)),
        "within_predicted_range": sum(bool(c.within_range) for c in scored),
        "within_factor_1_5": sum(1 / 1.5 <= 1 + e <= 1.5 for e in errors),
        "median_implied_mfu": statistics.median(implied),
        "min_implied_mfu": min(implied),
        "max_implied_mfu": max(implied),
    }


def validate(path: str | Path = RUNS_PATH) -> tuple[list[RunCheck], dict]:
    runs = load_runs(path)
    defaults = load_defaults()
    checks = [check_run(r, defaults) for r in runs]
    return checks, summarize(checks)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.0f}%"


def validation_table(checks: list[RunCheck]) -> str:
    rows = []
    for c in checks:
        lo, hi = c.predicted_range
        rep = "n/a" if c.reported_hours is None else human(c.reported_hours) + (" (derived)" if c.hours_derived else "")
        a = c.projection.assumptions
        rows.append([
            c.name,
            f"{c.run['count'] or '?'} x {c.accelerator.name} ({c.run['precision']})",
            human(parse_count(c.run["tokens"])),
            f"{c.projection.total_model_flops:.3g}",
            f"{c.flops_ratio:.2f}" if c.flops_ratio else "n/a",
            rep,
            f"{human(c.predicted_hours)} ({human(lo)}–{human(hi)})",
            _pct(c.error),
            {True: "yes", False: "no", None: "n/a"}[c.within_range],
            f"{c.predicted_days:.3g}" if c.predicted_days else "n/a",
            "n/a" if c.run["reported"]["days"] is None else f"{c.run['reported']['days']:g}",
            f"{c.implied_mfu:.2f}" if c.implied_mfu else "n/a",
            f"{c.run['reported']['mfu']:.3g}" if c.run["reported"]["mfu"] else "n/a",
            f"{a.mfu.central:.2f}x{a.scaling.central:.2f}x{a.goodput.central:.2f}",
        ])
    return md_table(["run", "hardware", "tokens", "model FLOPs", "FLOPs / reported",
                     "reported acc-hours", "predicted acc-hours (range)", "error",
                     "in range", "pred. days", "rep. days", "implied MFU", "rep. MFU",
                     "MFU x scaling x goodput"], rows)


def validation_markdown(checks: list[RunCheck], stats: dict, plot_name: str | None = None) -> str:
    """report.md of `python -m estimate validate`."""
    s = stats
    parts = [
        "# Validation against published training runs",
        "",
        "Each prediction uses the run's model, tokens, accelerator and precision with the "
        "estimator's DEFAULT assumptions (estimate/defaults.yaml), not the run's own MFU. "
        "error = predicted / reported accelerator-hours - 1. implied MFU = model FLOPs / "
        "(reported accelerator-hours x peak): the run's effective MFU with downtime included, to "
        "compare with MFU x scaling x goodput. 'FLOPs / reported' compares our FLOP count "
        "(6N + 12LdT) with the authors' own.",
        "",
        validation_table(checks),
        "",
    ]
    if s.get("n"):
        parts += [
            f"**Summary over {s['n']} runs with reported accelerator-hours** "
            f"({s['n_derived_hours']} derived from days x count): median absolute error "
            f"{s['median_abs_pct_error']:.0f}%, mean {s['mean_abs_pct_error']:.0f}%, max "
            f"{s['max_abs_pct_error']:.0f}%; median signed error {s['median_pct_error']:+.0f}%; "
            f"geometric-mean predicted/reported {s['geometric_mean_ratio']:.2f}; "
            f"{s['within_factor_1_5']}/{s['n']} within a factor 1.5; "
            f"{s['within_predicted_range']}/{s['n']} inside the predicted best-worst range. "
            f"Implied MFU: median {s['median_implied_mfu']:.2f} "
            f"(range {s['min_implied_mfu']:.2f}-{s['max_implied_mfu']:.2f}).",
            "",
        ]
    if plot_name:
        parts += [f"![predicted vs reported accelerator-hours]({plot_name})", ""]
    parts += ["## Sources and caveats", ""]
    for c in checks:
        parts.append(f"### {c.name}")
        parts += [f"- {cit['what']} — {cit['source']}" for cit in c.run["citations"]]
        parts += [f"- *uncertain:* {u}" for u in c.run["uncertain"]]
        parts += [f"- *model:* {n}" for n in c.target.notes]
        parts.append("")
    return "\n".join(parts)


def validation_record(checks: list[RunCheck], stats: dict) -> dict:
    """validation.json: one entry per run plus the summary."""
    return {
        "kind": "validation",
        "format": 1,
        "summary": stats,
        "runs": [
            {
                "name": c.name,
                "accelerator": c.accelerator.name,
                "count": c.run["count"],
                "precision": c.run["precision"],
                "tokens": parse_count(c.run["tokens"]),
                "model_flops": c.projection.total_model_flops,
                "reported": c.run["reported"],
                "reported_hours_used": c.reported_hours,
                "hours_derived": c.hours_derived,
                "predicted_hours": {k: o.accelerator_hours for k, o in c.projection.outcomes.items()},
                "error": c.error,
                "within_range": c.within_range,
                "predicted_days": c.predicted_days,
                "days_error": c.days_error,
                "implied_mfu": c.implied_mfu,
                "flops_ratio": c.flops_ratio,
                "citations": c.run["citations"],
                "uncertain": c.run["uncertain"],
            }
            for c in checks
        ],
    }
