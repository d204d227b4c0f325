"""Back-testing the performance model on published training runs (`published_runs.yaml`).

For each run the model predicts accelerator-hours from the run's model, tokens, accelerator,
precision and (where published) parallel layout, with the default factors of defaults.yaml and
a stack efficiency fitted on the OTHER runs (leave-one-out, `estimate.published`): no run's
own reported figure helps predict it. The error is |ln(predicted / reported)|.

Beside it stands the rule of thumb the model must beat: a constant MFU, hours = model FLOPs /
(MFU x peak). The best constant is chosen on all runs (in-sample, the most favourable case for
the constant) and, fairly, leave-one-out too. The implied MFU of a run, model FLOPs /
(reported hours x peak), is the constant that would have predicted it exactly.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from estimate.assumptions import load_defaults
from estimate.crossval import best_constant_mfu
from estimate.hardware import Accelerator
from estimate.perf import Factor, load_factors
from estimate.published import (
    RUNS_PATH,
    Modelled,
    fit,
    is_planned,
    load_runs,
    model_run,
    reported_hours,
)
from estimate.report import md_table
from estimate.units import SECONDS_PER_HOUR, human
from model.flops import model_flops_per_token
from model.precision import precision as precision_of

RULE_OF_THUMB_MFU = 0.40  # the flat MFU the issue measured the old projection against
CASES = ("best", "central", "worst")


@dataclass
class RunCheck:
    """The model's leave-one-out prediction for one published run, next to what was reported."""

    run: dict
    predicted: dict[str, Modelled]  # by case
    stack: Factor  # fitted without this run
    reported_hours: float | None
    hours_how: str
    model_flops: float
    peak: float

    @property
    def name(self) -> str:
        return self.run["name"]

    @property
    def accelerator(self) -> Accelerator:
        return self.predicted["central"].acc

    @property
    def predicted_hours(self) -> float:
        return self.predicted["central"].hours

    @property
    def predicted_range(self) -> tuple[float, float]:
        return self.predicted["best"].hours, self.predicted["worst"].hours

    @property
    def log_error(self) -> float | None:
        """ln(predicted / reported) accelerator-hours."""
        if self.reported_hours is None:
            return None
        return math.log(self.predicted_hours / self.reported_hours)

    @property
    def implied_mfu(self) -> float | None:
        """Model FLOPs / (reported hours x peak): the constant MFU that predicts this run."""
        if self.reported_hours is None:
            return None
        return self.model_flops / (self.reported_hours * SECONDS_PER_HOUR * self.peak)

    @property
    def predicted_mfu(self) -> float:
        return self.model_flops / (self.predicted_hours * SECONDS_PER_HOUR * self.peak)

    @property
    def within_range(self) -> bool | None:
        if self.reported_hours is None:
            return None
        lo, hi = self.predicted_range
        return lo <= self.reported_hours <= hi


def check_run(run: dict, path: str | Path = RUNS_PATH, leave_out: bool = True) -> RunCheck:
    """Predict one published run, the factors fitted without it (`leave_out`), or with every
    run of `path` (the fit `project` uses: its prediction of the run)."""
    fitted = fit(exclude=run["name"] if leave_out else None, path=path)
    factors = load_factors(load_defaults(), fitted.stack)
    c = model_run(run, factors, fit=fitted)
    predicted = {case: model_run(run, factors, case, c.count, fitted) for case in CASES}
    stack = fitted.stack_for(is_planned(run), c.acc)
    hours, how = reported_hours(run)
    flops = model_flops_per_token(c.cfg, c.cfg.seq_len) * run["tokens"]
    peak = c.acc.peak_flops(precision_of(run["precision"]).catalog)
    return RunCheck(run, predicted, stack, hours, how, flops, peak)


def summarize(checks: list[RunCheck]) -> dict:
    """Error statistics over the runs with reported (or derived) accelerator-hours."""
    scored = [c for c in checks if c.log_error is not None]
    if not scored:
        return {"n": 0}
    errors = [abs(c.log_error) for c in scored]
    implied = [c.implied_mfu for c in scored]
    best_c, best_med = best_constant_mfu(implied)
    loo_const = []
    for i, c in enumerate(scored):
        others = implied[:i] + implied[i + 1:]
        loo_const.append(abs(math.log(c.implied_mfu / best_constant_mfu(others)[0])))
    flat = [abs(math.log(m / RULE_OF_THUMB_MFU)) for m in implied]
    return {
        "n": len(scored),
        "n_derived_hours": sum(c.hours_how != "reported" for c in scored),
        "median_abs_log_error": statistics.median(errors),
        "mean_abs_log_error": statistics.fmean(errors),
        "worst_abs_log_error": max(errors),
        "worst_run": scored[errors.index(max(errors))].name,
        "median_log_error": statistics.median(c.log_error for c in scored),
        "within_predicted_range": sum(bool(c.within_range) for c in scored),
        "within_20_percent": sum(abs(e) <= math.log(1.2) for e in errors),
        "best_constant_mfu": best_c,
        "best_constant_median_abs_log_error": best_med,
        "best_constant_loo_median_abs_log_error": statistics.median(loo_const),
        "flat_mfu": RULE_OF_THUMB_MFU,
        "flat_mfu_median_abs_log_error": statistics.median(flat),
        "median_implied_mfu": statistics.median(implied),
        "min_implied_mfu": min(implied),
        "max_implied_mfu": max(implied),
    }


def run_lines(name: str, path: str | Path = RUNS_PATH) -> list[str]:
    """One run's prediction by the leave-one-out fit (validate's row) and by the fit on every
    run (what `project --hours-basis <the run's basis>` gives for the run's published set-up):
    `validate --run NAME`."""
    runs = {r["name"]: r for r in load_runs(path)}
    if name not in runs:
        raise ValueError(f"no run {name!r} in {path}; runs: {', '.join(runs)}")
    run = runs[name]
    out = [f"{name}: {run['hours_basis']}-basis hours"
           + ("" if (rep := reported_hours(run)[0]) is None else f", reported {rep:,.0f}")]
    for leave_out, what in ((True, "leave-one-out fit (validate's row)"),
                            (False, "fit on all runs (what project uses)")):
        c = check_run(run, path, leave_out)
        lo, hi = c.predicted_range
        err = "" if c.log_error is None else f", ln error {c.log_error:+.2f}"
        out.append(f"  {what}: predicted {c.predicted_hours:,.0f} accelerator-hours "
                   f"(range {lo:,.0f}-{hi:,.0f}){err}; stack efficiency {c.stack.central:.3f}, "
                   f"{run['hours_basis']} factor {c.predicted['central'].goodput:.3f}")
    return out


def validate(path: str | Path = RUNS_PATH) -> tuple[list[RunCheck], dict]:
    checks = [check_run(r, path) for r in load_runs(path)]
    return checks, summarize(checks)


def _layout(m: Modelled) -> str:
    lay = m.layout
    parts = [f"tp{lay.tp} pp{lay.pp} dp{lay.dp}"] + ([f"ep{lay.ep}"] if lay.ep > 1 else [])
    return " ".join(parts) + (" (planned)" if lay.source == "planned" else "")


def validation_table(checks: list[RunCheck]) -> str:
    rows = []
    for c in checks:
        m = c.predicted["central"]
        lo, hi = c.predicted_range
        rep = "n/a" if c.reported_hours is None else human(c.reported_hours) + (
            "" if c.hours_how == "reported" else " (derived)")
        rows.append([
            c.name,
            f"{m.count}{'*' if m.count_rule else ''} x {m.acc.name} ({c.run['precision']})",
            _layout(m),
            c.run["hours_basis"],
            rep,
            f"{human(c.predicted_hours)} ({human(lo)}–{human(hi)})",
            "n/a" if c.log_error is None else f"{c.log_error:+.2f}",
            f"{c.predicted_mfu:.2f}",
            "n/a" if c.implied_mfu is None else f"{c.implied_mfu:.2f}",
            f"{c.stack.central:.2f}",
        ])
    return md_table(["run", "accelerators", "layout", "hours basis", "reported acc-hours",
                     "predicted (range)", "ln error", "pred. MFU", "implied MFU",
                     "stack eff. (LOO)"], rows)


def summary_line(s: dict) -> str:
    return (f"median |ln error| {s['median_abs_log_error']:.3f} over {s['n']} runs (worst "
            f"{s['worst_abs_log_error']:.2f}, {s['worst_run']}); {s['within_20_percent']}/{s['n']} "
            f"within 20%; best constant MFU {s['best_constant_mfu']:.3f}: "
            f"{s['best_constant_median_abs_log_error']:.3f} in-sample, "
            f"{s['best_constant_loo_median_abs_log_error']:.3f} leave-one-out; flat MFU "
            f"{s['flat_mfu']:.2f}: {s['flat_mfu_median_abs_log_error']:.3f}")


def validation_markdown(checks: list[RunCheck], stats: dict, plot_name: str | None = None,
                        cv: dict | None = None, path: str | Path = RUNS_PATH) -> str:
    """report.md of `python -m estimate validate`."""
    parts = [
        "# Validation against published training runs",
        "",
        "Each prediction runs the performance model (estimate/perf.py) on the run's model, "
        "tokens, accelerator, precision and published layout, completed by the layout planner "
        "(`(planned)`: none published; `*`: count not published, chosen to finish in about "
        "30 days), "
        "with the default factors and a stack efficiency fitted on the other runs "
        "(leave-one-out). ln error = ln(predicted / reported accelerator-hours). Hours whose "
        "basis is `compute` count training time only and are predicted without failures.",
        "",
        validation_table(checks),
        "",
    ]
    if stats.get("n"):
        parts += [f"**Summary:** {summary_line(stats)}.", ""]
    if plot_name:
        parts += [f"![predicted vs reported accelerator-hours]({plot_name})", ""]
    if cv:
        from estimate.crossval import markdown

        parts += [markdown(cv, path), ""]
    parts += ["## Sources and caveats", ""]
    for c in checks:
        parts.append(f"### {c.name}")
        parts += [f"- {cit['what']} — {cit['source']}" for cit in c.run["citations"]]
        parts += [f"- *uncertain:* {u}" for u in c.run["uncertain"]]
        parts.append("")
    return "\n".join(parts)


def validation_record(checks: list[RunCheck], stats: dict, cv: dict | None = None) -> dict:
    """validation.json: one entry per run plus the summary; with `cv`, the three
    cross-validations (format 3)."""
    from estimate.crossval import record

    return {
        "kind": "validation",
        "format": 3,
        "summary": stats,
        "cross_validation": record(cv) if cv else None,
        "runs": [
            {
                "name": c.name,
                "accelerator": c.accelerator.name,
                "count": c.predicted["central"].count,
                "count_from_rule": c.predicted["central"].count_rule,
                "layout": vars(c.predicted["central"].layout),
                "precision": c.run["precision"],
                "tokens": c.run["tokens"],
                "model_flops": c.model_flops,
                "hours_basis": c.run["hours_basis"],
                "reported": c.run["reported"],
                "reported_hours_used": c.reported_hours,
                "hours_how": c.hours_how,
                "predicted_hours": {k: m.hours for k, m in c.predicted.items()},
                "log_error": c.log_error,
                "within_range": c.within_range,
                "predicted_mfu": c.predicted_mfu,
                "implied_mfu": c.implied_mfu,
                "stack_efficiency_loo": c.stack.central,
                "citations": c.run["citations"],
                "uncertain": c.run["uncertain"],
            }
            for c in checks
        ],
    }
