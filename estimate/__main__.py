"""`python -m estimate` (or `tokenclock-estimate`): project training time, validate against published runs, list hardware.

    python -m estimate project --model llama3-405b --tokens 15.6T --accelerator H100-SXM5-80GB \\
        --count 16384 [--mfu 0.4:0.35:0.55 | --mfu-from runs/my_run |
        --from-calibration reports/calibrate] [--goodput 0.9] \\
        [--precision bf16] [--recompute none] [--price 2.5] [--out reports/llama3]
    python -m estimate validate [--out reports/validate]
    python -m estimate catalog
    python -m estimate calibrate [--data data/demo] [--out reports/calibrate] [--quick] [--steps 20]
        [--nproc 2] [--repeats 1] [--sweep configs/estimate/calibrate.yaml] [--publish]
    python -m estimate calibrate --parallel [--data data/demo] [--out reports/calibrate] [--quick]
        [--publish]

Assumption options take one number (a point) or CENTRAL:LOW:HIGH; omitted ones use the sourced
defaults in estimate/defaults.yaml.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from contracts.cli import run_main
from estimate.hardware import PRECISIONS, get_accelerator, load_catalog
from estimate.perf import SCHEDULES
from estimate.units import parse_count, parse_value_range
from model.flops import RECOMPUTE_MODES
from model.precision import precision

# every recomputation mode of model.flops but every_k, whose k the projection does not take
RECOMPUTE = tuple(m for m in RECOMPUTE_MODES if m != "every_k")


def _count(what: str):
    def parse(text: str) -> float:
        try:
            return parse_count(text, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _precision(text: str) -> str:
    """Any spelling of a precision (bf16, no, float32, ...) as its catalog key."""
    try:
        return precision(text).catalog
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _range(text: str):
    try:
        return parse_value_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m estimate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("project", help="project training time, accelerator-hours, energy and cost")
    p.add_argument("--model", "-m", help="model preset (model.config.PRESETS) or YAML model config")
    p.add_argument("--params", type=_count("--params"), help="total parameters, e.g. 70B (dense: also N in 6N)")
    p.add_argument("--active-params", type=_count("--active-params"), help="N in 6N: parameters per token (MoE)")
    p.add_argument("--experts", type=int, help="with --params/--active-params: routed experts of "
                   "the assumed shape (default: estimate.shapes' rule)")
    p.add_argument("--seq-len", type=int, help="context length (default: the model's; 4096 for "
                   "a model given by size)")
    p.add_argument("--tokens", "-t", type=_count("--tokens"), help="training tokens: 15.6T, 300B, 1e12")
    p.add_argument("--accelerator", "-a", help="catalog key, case-insensitive (see `catalog`)")
    p.add_argument("--stages", help="a stages YAML (configs/estimate/deepseek-r1.yaml): project "
                   "every stage of a training recipe beside its published figure")
    p.add_argument("--count", "-n", type=int, help="number of accelerators (default: the published "
                   "run's for a preset that has one, else the fewest power of two that trains "
                   "in ~30 days, estimate.engine.choose_count)")
    p.add_argument("--precision", type=_precision, choices=PRECISIONS,
                   help="selects the peak (default: the published run's for a preset that has one, else bf16)")
    p.add_argument("--peak-tflops", type=float, help="dense peak per accelerator in TFLOP/s, in place of the catalog's")
    lay = p.add_argument_group("parallel layout (default: the published run's for a preset that "
                               "has one, at its published count; else estimate.planner's "
                               "search, which fills in whatever is not given)")
    for name in ("tp", "pp", "dp", "cp", "ep", "micro-batch", "virtual-stages"):
        lay.add_argument(f"--{name}", type=int)
    lay.add_argument("--global-batch", type=_count("--global-batch"), help="tokens per optimizer step")
    lay.add_argument("--schedule", choices=SCHEDULES)
    lay.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (3: FSDP)")
    p.add_argument("--recompute", choices=RECOMPUTE, help="activation recomputation of the target "
                   "run (default: the published run's for a preset that has one, else the "
                   "planner's: none where it fits, else full)")
    mfu = p.add_mutually_exclusive_group()
    mfu.add_argument("--mfu", type=_range, help="MFU, e.g. 0.45 or 0.45:0.35:0.55")
    mfu.add_argument("--mfu-from", metavar="RUN_DIR", help="take MFU from RUN_DIR/summary.json")
    p.add_argument("--from-calibration", metavar="DIR", help="scale the performance model's "
                   "stack efficiency by calibrate's fitted efficiency at the target's size over "
                   "its reference size (DIR: `calibrate --out DIR`)")
    p.add_argument("--mfu-recompute", choices=RECOMPUTE, help="recomputation under which --mfu was measured")
    p.add_argument("--scaling", type=_range, help="scaling efficiency to the target count")
    p.add_argument("--goodput", type=_range, help="useful fraction of wall-clock time")
    p.add_argument("--hours-basis", choices=("compute", "wallclock", "unknown"),
                   help="what the accelerator-hours count, as in published_runs.yaml: the "
                   "modelled training time divided by the factor fitted on published runs of "
                   "that basis (compute: 1; default wallclock), as `validate` divides a run's")
    p.add_argument("--power-w", type=_range, help="average watts per accelerator (default: TDP-based)")
    p.add_argument("--pue", type=_range, help="data-centre power usage effectiveness")
    p.add_argument("--price", type=_range, help="USD per accelerator-hour (enables cost)")
    p.add_argument("--out", "-o", help="write report.md, projection.json and projection.png here")
    p.add_argument("--publish", action="store_true",
                   help="with a stages file: also write its table as docs/measured/NAME-DATE.md")

    v = sub.add_parser("validate", help="compare default predictions with published training runs")
    v.add_argument("--runs", help="published runs YAML (default: estimate/published_runs.yaml)")
    v.add_argument("--out", "-o", help="write report.md, validation.json and validation.png here")
    v.add_argument("--publish", action="store_true",
                   help="also write the table as docs/measured/estimate-validate-DATE.md")
    v.add_argument("--run", metavar="NAME", help="only this run: its prediction by the "
                   "leave-one-out fit and by the fit on all runs (what `project "
                   "--hours-basis` gives for its published set-up)")

    sub.add_parser("catalog", help="list the accelerator catalog")
    sub.add_parser("probe", help="print the engine's goals: days against count, hours against "
                   "context, runs given by size against by shape (issue 19)")

    c = sub.add_parser("calibrate", help="measure throughput on this machine (a sweep of short "
                       "real runs), fit it, check the assumptions, predict a held-out run")
    c.add_argument("--data", default="data/demo", help="prepared dataset dir (default data/demo)")
    c.add_argument("--out", "-o", help="write report.md, calibration.json, PNGs and the run dirs here")
    c.add_argument("--quick", action="store_true",
                   help="tiny models and few steps (configs/estimate/calibrate_quick.yaml): tests")
    c.add_argument("--sweep", help="sweep YAML (default configs/estimate/calibrate.yaml)")
    c.add_argument("--steps", type=int, help="steps per run (overrides the sweep's)")
    c.add_argument("--nproc", type=int, help="processes of the data-parallel check (default 2)")
    c.add_argument("--repeats", type=int, help="rounds of the sweep (medians over rounds)")
    c.add_argument("--publish", action="store_true",
                   help="also write the report as docs/measured/calibration-DATE.md "
                   "(with --parallel: calibration-parallel-DATE.md)")
    c.add_argument("--parallel", action="store_true",
                   help="check the performance model's parallel terms and step time here "
                   "instead (configs/estimate/calibrate_parallel.yaml; with --quick its quick "
                   "version): rates, gloo collectives, DP/FSDP/TP/CP/PP terms, 5 layouts")
    return parser


def cmd_project(args: argparse.Namespace) -> int:
    from contracts.run import read_summary
    from estimate.assumptions import build_assumptions
    from estimate.project import project
    from estimate.published import published_setup
    from estimate.report import projection_markdown, projection_text, write_outputs
    from estimate.stages import run_stages, stages_file, stages_markdown
    from estimate.target import resolve_target

    stages = args.stages or (stages_file(args.model) if args.model else None)
    if stages and args.from_calibration:
        raise ValueError("--from-calibration applies to a single projection, not to a stages "
                         f"file ({stages}); project one stage's model with --model instead")
    if stages:
        spec, results = run_stages(stages)
        text = stages_markdown(spec, results)
        print(text)
        if args.publish:
            print(f"published {_publish(Path(stages).stem, spec.get('question') or spec['name'], text, args)}")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "report.md").write_text(text)
            print(f"wrote {Path(args.out) / 'report.md'}")
        return 0
    if args.tokens is None or args.accelerator is None:
        raise ValueError("project needs --tokens and --accelerator (or a stages file: "
                         "--stages FILE, or --model NAME for configs/estimate/NAME.yaml)")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.experts is not None and args.model is not None:
        raise ValueError("--experts shapes a model given by size (--params); with --model the "
                         "shape has its own experts")
    target = resolve_target(args.model, params=args.params, active_params=args.active_params,
                            seq_len=args.seq_len, experts=args.experts)
    calibration = checked = None
    if args.from_calibration:
        from estimate.assumptions import refuse_calibration
        from estimate.calibrate.parallel import read_checked_terms
        from estimate.calibrate.prior import FILE, read_calibration

        checked = read_checked_terms(args.from_calibration)
        if checked is None or (Path(args.from_calibration) / FILE).is_file():
            refuse_calibration(args.mfu is not None, args.mfu_from is not None)
            calibration = read_calibration(args.from_calibration)
    acc = get_accelerator(args.accelerator)
    setup = published_setup(args.model) if args.model else None
    # A preset's published layout holds at its published count only; its batch always.
    at_published = setup and args.count in (None, setup["count"])
    layout = dict(setup["layout"]) if at_published else (
        {k: v for k, v in setup["layout"].items() if k == "global_batch_tokens"} if setup else {})
    given = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "cp": args.cp, "ep": args.ep,
             "micro_batch": args.micro_batch, "virtual_stages": args.virtual_stages,
             "global_batch_tokens": args.global_batch, "schedule": args.schedule,
             "zero": args.zero}
    published = bool(at_published)
    if any(v is not None for v in given.values()):
        published = False  # a layout of the command line: refused where it fits nowhere
        layout = {k: v for k, v in layout.items() if k in ("global_batch_tokens", "schedule",
                                                           "max_nodes_per_token")}
    layout |= {k: v for k, v in given.items() if v is not None}
    recompute = args.recompute or layout.pop("recompute", None)
    layout.pop("recompute", None)
    precision = args.precision or (setup["precision"] if setup else "bf16")
    count = args.count or (setup["count"] if setup else None)
    count_note = None
    if count is None:
        count, count_note = _count_for(target, acc, precision, recompute, layout, args, calibration)
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    if setup:
        print(f"(defaults from the published run {setup['name']!r}: precision {precision}, "
              f"recompute {recompute or 'planned'}, layout "
              f"{layout or 'planned'}{'' if at_published else ' (published layout not used: not its published count)'}"
              "; options override them)")
    if count_note:
        print(f"({count_note})")
    run = read_summary(args.mfu_from) if args.mfu_from else None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    assumptions = build_assumptions(
        target, acc, count, precision, recompute, mfu=args.mfu,
        mfu_recompute=args.mfu_recompute, mfu_run=run, scaling=args.scaling,
        goodput=args.goodput, power_w=args.power_w, pue=args.pue, price=args.price,
        layout=layout, peak_flops=peak, calibration=calibration, tokens=args.tokens,
        layout_published=published, hours_basis=args.hours_basis)
    recompute = next(s.value for s in assumptions.settings if s.key == "recompute")
    p = project(target, args.tokens, acc, count, assumptions, precision, recompute, peak)
    print(projection_text(p))
    if checked:
        print("\n" + "\n".join(checked.lines()))
    if args.out:
        plots = _projection_plots(p, Path(args.out), setup, count)
        md = projection_markdown(p, *[x.name for x in plots])
        record = p.to_dict()
        if checked:
            md += ("\n## Parallel terms checked (--from-calibration)\n\n```\n"
                   + "\n".join(checked.lines()) + "\n```\n")
            record["parallel_terms_checked"] = {"source": str(checked.path),
                                                "hardware": checked.hardware,
                                                "terms": [list(t) for t in checked.terms]}
        md, js = write_outputs(args.out, md, record)
        print(f"wrote {md}, {js}, " + ", ".join(str(x) for x in plots))
    return 0


def _projection_plots(p, out: Path, setup: dict | None, count: int) -> list[Path]:
    """projection.png: where the wall-clock time goes, with the published figure of the same
    run marked when there is one (same tokens and count); projection-range.png: the best /
    central / worst days and accelerator-hours."""
    from estimate.plots import Interval, projection_range, time_breakdown
    from estimate.report import time_parts

    o = p.outcomes
    label = f"{p.target.name}, {count} x {p.accelerator.name}"
    paths = []
    parts = time_parts(p)
    if parts:
        published = None
        if setup and setup["hours"] and setup["count"] == count and setup["tokens"] == p.tokens:
            published = setup["hours"] / count / 24
        paths.append(time_breakdown(
            parts, out / "projection.png", unit="wall-clock days (central case)",
            title=f"Where the time goes: {label}", published=published,
            published_label=f"published ({setup['name']}, {setup['hours_basis']} hours)"
            if setup else "published"))
    paths.append(projection_range(
        {"wall-clock days": [Interval(label, o["best"].days, o["central"].days, o["worst"].days)],
         "accelerator-hours (millions)": [Interval(label, o["best"].accelerator_hours / 1e6,
                                                   o["central"].accelerator_hours / 1e6,
                                                   o["worst"].accelerator_hours / 1e6)]},
        out / ("projection-range.png" if parts else "projection.png"),
        title=f"Projection: {p.target.name}"))
    return paths


def _count_for(target, acc, precision: str, recompute: str | None, layout: dict, args,
               calibration=None) -> tuple[int, str]:
    """No --count: the fewest accelerators, a power of two up to 65,536, that train the run in
    about 30 days under the performance model (estimate.engine.choose_count, what validate
    uses for runs that publish no count); and a line saying so."""
    from estimate.assumptions import load_defaults
    from estimate.engine import choose_count
    from estimate.perf import load_factors
    from estimate.published import fit

    d = load_defaults()
    e = choose_count(target.cfg, target.seq_len, args.tokens, acc, precision,
                     load_factors(d, fit().stack), d, given=layout, recompute=recompute,
                     peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)
    days = d["performance"]["default_run_days"]["value"]
    return e.count, (f"no --count: {e.count} accelerators, the fewest power of two that trains "
                     f"in about {days} days by the performance model (estimate.engine."
                     "choose_count); give --count to change it")


def cmd_validate(args: argparse.Namespace) -> int:
    from estimate import crossval
    from estimate.plots import Point, predicted_vs_reported
    from estimate.report import write_outputs
    from estimate.validate import (
        RUNS_PATH,
        summary_line,
        validate,
        validation_markdown,
        validation_record,
        validation_table,
    )

    if args.run:
        if args.publish or args.out:
            raise ValueError("--run prints one run; --publish and --out write the whole table")
        from estimate.validate import run_lines

        print("\n".join(run_lines(args.run, args.runs or RUNS_PATH)))
        return 0
    checks, stats = validate(args.runs or RUNS_PATH)
    print(validation_table(checks))
    if stats.get("n"):
        print("\nper-run detail above (stack efficiency refitted leave-one-out, count re-chosen): "
              + summary_line(stats))
    cv = crossval.all_splits(args.runs or RUNS_PATH)
    print("\n" + crossval.markdown(cv, args.runs or RUNS_PATH))
    if args.publish:
        body = (validation_table(checks) + "\n\n" + summary_line(stats) + "\n\n"
                + crossval.markdown(cv, args.runs or RUNS_PATH) + "\n")
        print(f"published {_publish('estimate-validate', 'Validation against published training runs', body, args)}")
    if args.out:
        points = [Point(c.name, c.reported_hours, c.predicted_hours, *c.predicted_range)
                  for c in checks if c.reported_hours is not None]
        plot = predicted_vs_reported(
            points, Path(args.out) / "validation.png", xlabel="reported accelerator-hours",
            ylabel="predicted accelerator-hours (leave-one-out)", band=1.2,
            title="Predicted vs reported accelerator-hours (band: within 20%)")
        md, js = write_outputs(args.out, validation_markdown(checks, stats, plot.name, cv, args.runs or RUNS_PATH),
                               validation_record(checks, stats, cv))
        print(f"wrote {md}, {js}, {plot}")
    return 0


def _publish(name: str, title: str, body: str, args: argparse.Namespace) -> Path:
    """docs/measured/NAME-DATE.md: the measured header, then `body` (its own title dropped)."""
    from contracts.measured import header, publish

    command = shlex.join(["python", "-m", "estimate", *args.argv])
    text = body.split("\n", 1)[1].lstrip("\n") if body.startswith("# ") else body
    return publish(name, header(title, command) + "\nArithmetic only: the machine does not "
                   "change the figures.\n\n" + text)


def cmd_catalog(args: argparse.Namespace) -> int:
    from estimate.report import md_table

    rows = []
    for name, e in load_catalog().items():
        peaks = ", ".join(f"{p} {e[p + '_tflops']:g}" for p in PRECISIONS if e.get(p + "_tflops"))
        rows.append([name, peaks, e.get("memory_gb"), e.get("memory_bw_gbs"),
                     e.get("interconnect_gbs"), e.get("tdp_w") or "n/a"])
    print(md_table(["accelerator", "dense TFLOP/s", "memory GB", "HBM GB/s", "link GB/s", "TDP W"], rows))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from estimate.probe import main as probe

    return probe()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from estimate.calibrate import DEFAULT_SWEEP, QUICK_SWEEP, run_cli

    if args.quick and args.sweep:
        raise ValueError("--quick and --sweep both choose the sweep; give one")
    command = shlex.join(["python", "-m", "estimate", *args.argv])
    if args.parallel:
        from estimate.calibrate.parallel import PARALLEL_QUICK, PARALLEL_SWEEP, run_parallel_cli

        if args.nproc not in (None, 2):
            raise ValueError(f"--parallel runs 2 processes; --nproc {args.nproc} is not supported")
        sweep = args.sweep or (PARALLEL_QUICK if args.quick else PARALLEL_SWEEP)
        return run_parallel_cli(sweep, args.data, args.out, args.steps, args.repeats,
                                args.publish, command)
    sweep = args.sweep or (QUICK_SWEEP if args.quick else DEFAULT_SWEEP)
    return run_cli(sweep, args.data, args.out, args.steps, args.nproc, args.repeats,
                   args.publish, command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for the header of measured tables
    commands = {"project": cmd_project, "validate": cmd_validate, "catalog": cmd_catalog,
                "calibrate": cmd_calibrate, "probe": cmd_probe}
    return run_main(commands[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
