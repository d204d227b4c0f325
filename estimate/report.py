"""Markdown and text renderings of projections and validations; calibrate reuses md_table and
write_outputs."""

from __future__ import annotations

import json
from pathlib import Path

from estimate.assumptions import AssumptionSet
from estimate.project import CASES, Projection
from estimate.units import fmt, human, sig


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; pipes inside cells are escaped."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _value(x: float, unit: str) -> str:
    if unit == "W":
        return f"{x:.4g} W"
    if unit == "USD":
        return f"${x:.4g}"
    return f"{x:.3g}"


def assumption_table(a: AssumptionSet) -> str:
    """Every assumption: value, range, which end is favourable, source and notes."""
    rows = []
    for x in a.numeric():
        rng = "(point)" if x.low == x.high else f"{_value(x.low, x.unit)} – {_value(x.high, x.unit)}"
        better = "higher" if x.better == "high" else "lower"
        notes = "; ".join(x.notes)
        rows.append([x.label, _value(x.central, x.unit), rng, better, x.source + (f" *Notes:* {notes}" if notes else "")])
    for s in a.settings:
        rows.append([s.label, s.value, "(setting)", "", s.source])
    return md_table(["assumption", "central", "low – high", "better when", "source / notes"], rows)


def _outcome_rows(p: Projection) -> list[list[str]]:
    o = p.outcomes
    rows = [
        ["wall-clock days"] + [sig(o[c].days) for c in CASES],
        ["accelerator-hours"] + [human(o[c].accelerator_hours) for c in CASES],
    ]
    if o["central"].energy_mwh is not None:
        rows.append(["energy (MWh)"] + [sig(o[c].energy_mwh) for c in CASES])
    if o["central"].cost_usd is not None:
        rows.append(["cost (USD)"] + [f"${human(o[c].cost_usd)}" for c in CASES])
    rows.append(["effective MFU x scaling x goodput"]
                + [f"{o[c].mfu * o[c].scaling * o[c].goodput:.3f}" for c in CASES])
    return rows


def _headline(p: Projection) -> str:
    t = p.target
    moe = f", {human(t.active_params)} active" if t.is_moe or t.active_params != t.params else ""
    return (f"{t.name} ({human(t.params)} parameters{moe}) on {human(p.tokens)} tokens, "
            f"{p.n_acc} x {p.accelerator.name} ({p.precision}, "
            f"{p.peak_flops / 1e12:.4g} TFLOP/s dense peak each)")


def time_parts(p: Projection, case: str = "central") -> dict[str, float]:
    """Where the wall-clock days of a modelled projection go: the step's parts scaled to the
    run, plus the time failures cost (1 - goodput). Empty without the performance model."""
    perf = p.assumptions.performance
    if perf is None:
        return {}
    o = p.outcomes[case]
    step = perf.steps[case]
    trained = o.days * o.goodput
    parts = {k: trained * v / step.total for k, v in step.parts().items()}
    parts["failures and restarts"] = o.days - trained
    return {k: v for k, v in parts.items() if v > 0}


def performance_markdown(p: Projection) -> list[str]:
    """The performance model's layout, where the time goes and its factors."""
    perf = p.assumptions.performance
    if perf is None:
        return []
    lay = perf.layout
    parts = time_parts(p)
    total = sum(parts.values())
    rows = [[k, f"{v:.3g}", f"{v / total:.0%}"] for k, v in parts.items()]
    frows = [[f.key, f"{f.central:.3g}", f"{f.low:.3g} – {f.high:.3g}",
              "higher" if f.better == "high" else "lower", f.source]
             for f in perf.factors.values()]
    return [
        "## Performance model", "",
        f"Layout: tensor {lay.tp} x pipeline {lay.pp} (interleaved {lay.virtual_stages}, "
        f"{lay.schedule}) x context {lay.cp} x data {lay.dp}"
        + (f", experts over {lay.ep} ranks" if lay.ep > 1 else "")
        + f"; {lay.global_batch_tokens:.4g} tokens per step, micro-batches of {lay.micro_batch} "
        f"sequence(s); {lay.source}.", "",
        "Layout planner (estimate/planner.py):", "",
        *[f"- {line}" for line in perf.plan.lines()], "",
        "Where the central case's wall-clock time goes:", "",
        md_table(["part", "days", "share"], rows), "",
        "Factors (defaults.yaml `performance:`; the stack efficiency is fitted on "
        f"{perf.fitted_runs} published runs, see `python -m estimate validate`):", "",
        md_table(["factor", "central", "low – high", "better when", "source"], frows), "",
    ]


def projection_text(p: Projection) -> str:
    """The stdout summary."""
    c, b, w = (p.outcomes[k] for k in ("central", "best", "worst"))
    lines = [
        "projection: " + _headline(p),
        f"  total model FLOPs  {p.total_model_flops:.3g}  ({p.target.model_flops_per_token:.3g} per token)",
        f"  wall-clock         {sig(c.days)} days   (range {sig(b.days)} - {sig(w.days)})",
        f"  accelerator-hours  {human(c.accelerator_hours)}   (range {human(b.accelerator_hours)} - "
        f"{human(w.accelerator_hours)}); training time only (goodput 1): "
        f"{human(c.accelerator_hours * c.goodput)}",
    ]
    if p.target.cfg is not None and p.target.name == "model given by size":
        lines.append(f"  assumed shape      {p.target.notes[0]}")
    if c.energy_mwh is not None:
        lines.append(f"  energy             {sig(c.energy_mwh)} MWh   (range {sig(b.energy_mwh)} - "
                     f"{sig(w.energy_mwh)})")
    if c.cost_usd is not None:
        lines.append(f"  cost               ${human(c.cost_usd)}   (range ${human(b.cost_usd)} - ${human(w.cost_usd)})")
    a = p.assumptions
    lines.append(f"  assumptions        MFU {a.mfu.central:.3g} ({a.mfu.low:.3g}-{a.mfu.high:.3g}), "
                 f"scaling {a.scaling.central:.3g} ({a.scaling.low:.3g}-{a.scaling.high:.3g}), "
                 f"goodput {a.goodput.central:.3g} ({a.goodput.low:.3g}-{a.goodput.high:.3g})")
    parts = time_parts(p)
    if parts:
        total = sum(parts.values())
        lines.append("  where time goes    " + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items()))
        perf = p.assumptions.performance
        plan = perf.plan
        lines += [f"  layout             {x}" if i == 0 else f"                     {x}"
                  for i, x in enumerate(plan.lines())]
    prior = p.assumptions.calibration_prior
    if prior is not None:
        first, *rest = prior.lines()
        lines.append("  calibration prior  " + first)
        lines += ["                     " + x for x in rest]
    for ch in p.checks:
        if ch.status == "warn":
            lines.append(f"  WARNING [{ch.name}] {ch.message}")
    return "\n".join(lines)


def calibration_markdown(p: Projection) -> list[str]:
    """The --from-calibration prior: the factor, its range, its source, what transfers."""
    prior = p.assumptions.calibration_prior
    if prior is None:
        return []
    return ["## Calibration prior (--from-calibration)", "",
            *[f"- {line}" for line in prior.lines()], ""]


def projection_markdown(p: Projection, *plot_names: str) -> str:
    """report.md of `python -m estimate project`."""
    parts = [
        "# Training-time projection",
        "",
        _headline(p) + ".",
        "",
        "time = total model FLOPs / (accelerators x peak x MFU x scaling efficiency x goodput); "
        "best = every assumption at its favourable end, worst = every one at its unfavourable "
        "end (an envelope, not a confidence interval). Pre-training only, unless the stages "
        "say otherwise.",
        "",
        md_table(["", "best", "central", "worst"], _outcome_rows(p)),
        "",
        f"Total model FLOPs: {p.total_model_flops:.4g} ({p.target.model_flops_per_token:.4g} "
        f"per token x {p.tokens:.4g} tokens); hardware FLOPs with recompute={p.recompute}: "
        f"{p.total_hardware_flops:.4g}.",
        "",
    ]
    parts += [f"![projection]({name})\n" for name in plot_names]
    parts += performance_markdown(p)
    parts += calibration_markdown(p)
    parts += ["## Assumptions", "", assumption_table(p.assumptions), "",
              "## Target", ""] + [f"- {n}" for n in p.target.notes] + ["", "## Checks", ""]
    parts += [f"- **{c.status}** ({c.name}): {c.message}" for c in p.checks]
    return "\n".join(parts) + "\n"


def write_outputs(out_dir: str | Path, markdown: str, record: dict) -> tuple[Path, Path]:
    """Write report.md and a JSON record (projection.json / validation.json) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "report.md"
    md_path.write_text(markdown)
    name = record.get("kind", "projection") + ".json"
    json_path = out / name
    json_path.write_text(json.dumps(record, indent=2, default=str))
    return md_path, json_path


__all__ = ["md_table", "assumption_table", "projection_text", "projection_markdown",
           "write_outputs", "fmt", "human"]
