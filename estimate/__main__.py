"""`python -m estimate`: project training time, validate against published runs, list hardware.

    python -m estimate project --model llama3-405b --tokens 15.6T --accelerator H100-SXM5-80GB \\
        --count 16384 [--mfu 0.4:0.35:0.55 | --mfu-from runs/my_run] [--goodput 0.9] \\
        [--precision bf16] [--recompute none] [--price 2.5] [--out reports/llama3]
    python -m estimate validate [--out reports/validate]
    python -m estimate catalog
    python -m estimate calibrate [--data data/demo] [--out reports/calibrate] [--quick] [--steps 20]
        [--nproc 2] [--repeats 1] [--sweep configs/estimate/calibrate.yaml] [--publish]

Assumption options take one number (a point) or CENTRAL:LOW:HIGH; omitted ones use the sourced
defaults in estimate/defaults.yaml.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from estimate.hardware import PRECISIONS, get_accelerator, load_catalog
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
    p.add_argument("--seq-len", type=int, help="context length for the attention FLOPs (default: the model's)")
    p.add_argument("--tokens", "-t", required=True, type=_count("--tokens"), help="training tokens: 15.6T, 300B, 1e12")
    p.add_argument("--accelerator", "-a", required=True, help="catalog key, case-insensitive (see `catalog`)")
    p.add_argument("--count", "-n", required=True, type=int, help="number of accelerators")
    p.add_argument("--precision", default="bf16", type=_precision, choices=PRECISIONS, help="selects the peak (default bf16)")
    p.add_argument("--recompute", default="none", choices=RECOMPUTE, help="activation recomputation of the target run")
    mfu = p.add_mutually_exclusive_group()
    mfu.add_argument("--mfu", type=_range, help="MFU, e.g. 0.45 or 0.45:0.35:0.55")
    mfu.add_argument("--mfu-from", metavar="RUN_DIR", help="take MFU from RUN_DIR/summary.json")
    p.add_argument("--mfu-recompute", choices=RECOMPUTE, help="recomputation under which --mfu was measured")
    p.add_argument("--scaling", type=_range, help="scaling efficiency to the target count")
    p.add_argument("--goodput", type=_range, help="useful fraction of wall-clock time")
    p.add_argument("--power-w", type=_range, help="average watts per accelerator (default: TDP-based)")
    p.add_argument("--pue", type=_range, help="data-centre power usage effectiveness")
    p.add_argument("--price", type=_range, help="USD per accelerator-hour (enables cost)")
    p.add_argument("--out", "-o", help="write report.md, projection.json and projection.png here")

    v = sub.add_parser("validate", help="compare default predictions with published training runs")
    v.add_argument("--runs", help="published runs YAML (default: estimate/published_runs.yaml)")
    v.add_argument("--out", "-o", help="write report.md, validation.json and validation.png here")

    sub.add_parser("catalog", help="list the accelerator catalog")

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
                   help="also write the report as docs/measured/calibration-DATE.md")
    return parser


def cmd_project(args: argparse.Namespace) -> int:
    from contracts.run import read_summary
    from estimate.assumptions import build_assumptions
    from estimate.plots import Interval, projection_range
    from estimate.project import project
    from estimate.report import projection_markdown, projection_text, write_outputs
    from estimate.target import resolve_target

    target = resolve_target(args.model, params=args.params, active_params=args.active_params,
                            seq_len=args.seq_len)
    acc = get_accelerator(args.accelerator)
    run = read_summary(args.mfu_from) if args.mfu_from else None
    assumptions = build_assumptions(
        target, acc, args.count, args.precision, args.recompute, mfu=args.mfu,
        mfu_recompute=args.mfu_recompute, mfu_run=run, scaling=args.scaling,
        goodput=args.goodput, power_w=args.power_w, pue=args.pue, price=args.price)
    p = project(target, args.tokens, acc, args.count, assumptions, args.precision, args.recompute)
    print(projection_text(p))
    if args.out:
        o = p.outcomes
        label = f"{target.name}, {args.count} x {acc.name}"
        plot = projection_range(
            {"wall-clock days": [Interval(label, o["best"].days, o["central"].days, o["worst"].days)],
             "accelerator-hours (millions)": [Interval(label, o["best"].accelerator_hours / 1e6,
                                                       o["central"].accelerator_hours / 1e6,
                                                       o["worst"].accelerator_hours / 1e6)]},
            Path(args.out) / "projection.png", title=f"Projection: {target.name}")
        md, js = write_outputs(args.out, projection_markdown(p, plot.name), p.to_dict())
        print(f"wrote {md}, {js}, {plot}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from estimate.plots import Point, predicted_vs_reported
    from estimate.report import write_outputs
    from estimate.validate import (
        RUNS_PATH,
        validate,
        validation_markdown,
        validation_record,
        validation_table,
    )

    checks, stats = validate(args.runs or RUNS_PATH)
    print(validation_table(checks))
    if stats.get("n"):
        print(f"\nmedian absolute error {stats['median_abs_pct_error']:.0f}% over {stats['n']} runs "
              f"(mean {stats['mean_abs_pct_error']:.0f}%, max {stats['max_abs_pct_error']:.0f}%); "
              f"{stats['within_predicted_range']}/{stats['n']} inside the predicted range; "
              f"median implied MFU {stats['median_implied_mfu']:.2f}")
    if args.out:
        points = [Point(c.name, c.reported_hours, c.predicted_hours, *c.predicted_range)
                  for c in checks if c.reported_hours is not None]
        plot = predicted_vs_reported(
            points, Path(args.out) / "validation.png", xlabel="reported accelerator-hours",
            ylabel="predicted accelerator-hours (default assumptions)",
            title="Predicted vs reported accelerator-hours")
        md, js = write_outputs(args.out, validation_markdown(checks, stats, plot.name),
                               validation_record(checks, stats))
        print(f"wrote {md}, {js}, {plot}")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from estimate.report import md_table

    rows = []
    for name, e in load_catalog().items():
        peaks = ", ".join(f"{p} {e[p + '_tflops']:g}" for p in PRECISIONS if e.get(p + "_tflops"))
        rows.append([name, peaks, e.get("memory_gb"), e.get("memory_bw_gbs"),
                     e.get("interconnect_gbs"), e.get("tdp_w") or "n/a"])
    print(md_table(["accelerator", "dense TFLOP/s", "memory GB", "HBM GB/s", "link GB/s", "TDP W"], rows))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from estimate.calibrate import DEFAULT_SWEEP, QUICK_SWEEP, run_cli

    if args.quick and args.sweep:
        raise ValueError("--quick and --sweep both choose the sweep; give one")
    sweep = args.sweep or (QUICK_SWEEP if args.quick else DEFAULT_SWEEP)
    command = shlex.join(["python", "-m", "estimate", *args.argv])
    return run_cli(sweep, args.data, args.out, args.steps, args.nproc, args.repeats,
                   args.publish, command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for the header of measured tables
    commands = {"project": cmd_project, "validate": cmd_validate, "catalog": cmd_catalog,
                "calibrate": cmd_calibrate}
    try:
        return commands[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
