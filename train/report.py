"""The run told in pictures: `python -m train.report RUN_DIR` writes RUN_DIR/report.md and
RUN_DIR/plots/*.png from the run's files (metrics.jsonl, summary.json, samples.txt).

Plots: train and validation loss, tokens/s and MFU, peak memory, the step-time breakdown
(data wait, forward+backward, optimizer, stacked), and learning rate with gradient norm, all
against the step. A run that lacks a field (an older format, a run stopped early) gets a note
in place of the plot instead of an error. Reads files only, so it works on any run directory,
finished or not, copied from a cluster or not.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from contracts.run import RunDir, read_metrics, read_summary  # noqa: E402

PHASES = ("data_wait_s", "fwd_bwd_s", "optim_s")


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a finite `key`."""
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), int | float) and math.isfinite(r[key]) and "step" in r]
    return [s for s, _ in pts], [v for _, v in pts]


def _figure(title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(records: list[dict], path: Path) -> Path | str:
    """Train loss per step and validation loss at evaluation steps."""
    steps, loss = series(records, "loss")
    vsteps, val = series(records, "val_loss")
    if not steps and not vsteps:
        return "no `loss` or `val_loss` in metrics.jsonl"
    fig, ax = _figure("Loss", "cross-entropy per token (nats)")
    if steps:
        ax.plot(steps, loss, lw=1, label="train loss")
    if vsteps:
        ax.plot(vsteps, val, "o-", ms=4, label="validation loss")
    ax.legend()
    return _save(fig, path)


def plot_throughput(records: list[dict], path: Path) -> Path | str:
    """tokens/s (all processes) on the left axis, MFU in percent on the right, with a line at
    100% and every step above it marked (no hardware reaches it: the FLOP count or the peak is
    wrong there)."""
    steps, tok = series(records, "tokens_per_s")
    msteps, mfu = series(records, "mfu")
    if not steps:
        return "no `tokens_per_s` in metrics.jsonl"
    fig, ax = _figure("Throughput", "tokens/s (all processes)")
    ax.plot(steps, tok, lw=1, color="tab:blue", label="tokens/s")
    if msteps:
        right = ax.twinx()
        right.plot(msteps, [100 * m for m in mfu], lw=1, color="tab:orange", label="MFU")
        right.axhline(100, color="tab:red", lw=0.8, ls="--", label="100% of peak")
        above = [(s, 100 * m) for s, m in zip(msteps, mfu, strict=True) if m > 1.0]
        if above:
            right.plot([s for s, _ in above], [m for _, m in above], "x", color="tab:red", ms=6,
                       label=f"MFU > 100% ({len(above)} steps)")
        right.set_ylabel("MFU (%)")
        right.set_ylim(0, 1.1 * max([100.0, *(100 * m for m in mfu)]))
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    ax.set_ylim(bottom=0)
    return _save(fig, path)


def plot_memory(records: list[dict], path: Path) -> Path | str:
    """Peak memory per process: the allocator's peak on GPU, peak resident set size on CPU."""
    steps, mem = series(records, "peak_mem_bytes")
    if not steps:
        return "no `peak_mem_bytes` in metrics.jsonl"
    fig, ax = _figure("Peak memory (main process)", "MiB")
    ax.plot(steps, [m / 2**20 for m in mem], lw=1.5)
    ax.set_ylim(bottom=0)
    return _save(fig, path)


def plot_step_time(records: list[dict], path: Path) -> Path | str:
    """Stacked phases of every step, in milliseconds, with the measured step time on top."""
    rows = [r for r in records if all(isinstance(r.get(k), int | float) for k in PHASES)]
    if not rows:
        return f"no step phases ({', '.join(PHASES)}) in metrics.jsonl"
    steps = [r["step"] for r in rows]
    fig, ax = _figure("Step time breakdown", "ms per step")
    ax.stackplot(steps, *[[1e3 * r[k] for r in rows] for k in PHASES],
                 labels=["data wait", "forward + backward (+ DDP all-reduce)", "optimizer"],
                 alpha=0.8)
    ssteps, step_s = series(rows, "step_s")
    if ssteps:
        ax.plot(ssteps, [1e3 * s for s in step_s], color="black", lw=0.8, label="step_s")
    top = max([1e3 * sum(r[k] for k in PHASES) for r in rows] + [1e3 * s for s in step_s])
    ax.set_ylim(0, 1.4 * top if top > 0 else 1)  # headroom for the legend
    ax.legend(loc="upper center", fontsize=8, ncol=2)
    return _save(fig, path)


def plot_optim(records: list[dict], path: Path) -> Path | str:
    """Learning rate (left) and global gradient norm before clipping (right)."""
    steps, lr = series(records, "lr")
    gsteps, gn = series(records, "grad_norm")
    if not steps and not gsteps:
        return "no `lr` or `grad_norm` in metrics.jsonl"
    fig, ax = _figure("Learning rate and gradient norm", "learning rate")
    if steps:
        ax.plot(steps, lr, lw=1, color="tab:green", label="lr")
    if gsteps:
        right = ax.twinx()
        right.plot(gsteps, gn, lw=0.8, color="tab:red", label="grad norm")
        right.set_ylabel("gradient norm")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    return _save(fig, path)


PLOTS: dict[str, tuple[str, Callable[[list[dict], Path], Path | str]]] = {
    "loss": ("Loss", plot_loss),
    "throughput": ("Throughput and MFU", plot_throughput),
    "memory": ("Memory", plot_memory),
    "step_time": ("Step time breakdown", plot_step_time),
    "optim": ("Learning rate and gradient norm", plot_optim),
}


CAPTIONS = {
    "throughput": "Tokens of all processes per second of step time; MFU = model FLOPs per second "
    "over the peak of all processes, one figure for the whole run (catalog peak on GPU; on CPU "
    "the machine's theoretical peak, or its measured matmul peak: `peak_flops_machine` in "
    "summary.json). The dashed line is 100%; crosses mark steps above it.",
    "memory": "Recorded by the main process: the allocator's peak on GPU, the peak resident set "
    "size on CPU (which never decreases).",
    "step_time": "Under DDP the gradient all-reduce overlaps the last backward, so it is inside "
    "forward + backward.",
}


def _fmt(value, spec: str) -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return "n/a"


def summary_table(summary: dict) -> list[str]:
    """Markdown rows for the headline figures of summary.json (missing ones read n/a)."""
    def get(*keys):
        node = summary
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    mem, machine = get("peak_mem_bytes"), get("peak_flops_machine", "flops")
    rows = [
        ("processes", get("world_size"), "", ""),
        ("device", get("device"), "", ""),
        ("precision", get("mixed_precision"), "", ""),
        ("parameters", get("model", "params"), ",", ""),
        ("steps", get("steps"), "", ""),
        ("tokens", get("tokens"), ",", ""),
        ("validation loss, start", get("initial_val_loss"), ".4f", ""),
        ("validation loss, end", get("final_val_loss"), ".4f", ""),
        ("tokens/s, median (p10-p90)", get("tokens_per_s", "median"), ",.0f",
         f" ({_fmt(get('tokens_per_s', 'p10'), ',.0f')}-{_fmt(get('tokens_per_s', 'p90'), ',.0f')})"),
        ("MFU, median", get("mfu", "median"), ".2%", ""),
        ("steps with MFU above 100%", get("mfu_steps_above_100_percent", "count"), "", ""),
        ("peak, whole machine", machine / 1e12 if machine else None, ".4g",
         f" TFLOP/s ({get('peak_flops_machine', 'method')})"),
        ("step time, median", (get("step_s", "median") or math.nan) * 1e3, ".1f", " ms"),
        ("peak memory per process", mem / 2**20 if mem else None, ".0f", " MiB"),
    ]
    lines = ["| | |", "|---|---|"]
    for name, value, spec, suffix in rows:
        text = _fmt(value, spec) if spec else ("n/a" if value is None else str(value))
        lines.append(f"| {name} | {text}{suffix if text != 'n/a' else ''} |")
    return lines


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render the plots into OUT/plots/ and write OUT/report.md (OUT = run_dir by default)."""
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise FileNotFoundError(f"{run.metrics} not found: {run.root} is not a run directory")
    out = Path(out_dir) if out_dir else run.root
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    records, _ = read_metrics(run.metrics)
    lines = [f"# Run report: {run.root.resolve().name}", "", f"Run directory: `{run.root}`", ""]
    try:
        summary = read_summary(run.root).raw if run.summary.is_file() else None
    except ValueError as e:  # another format, or no steady steps: the plots still tell the run
        summary = None
        lines += [f"_summary.json not shown: {e}._", ""]
    if summary is not None:
        lines += ["## Summary", "", *summary_table(summary), ""]
        above = summary.get("mfu_steps_above_100_percent")
        if isinstance(above, dict) and above.get("count"):
            lines += [f"**MFU above 100% at {above['count']} of {above.get('of_steps', '?')} "
                      f"steps (max {_fmt(above.get('max'), '.1%')}): not a measurement; the FLOP "
                      "count or the peak is wrong.**", ""]
        elif summary.get("mfu_above_100_percent"):
            lines += ["**MFU above 100%: the FLOP count or the peak is wrong.**", ""]
    elif not run.summary.is_file():
        lines += ["_No summary.json: the run has not finished; plots show the steps so far._", ""]
    for name, (title, plot) in PLOTS.items():
        result = plot(records, plots / f"{name}.png")
        lines += [f"## {title}", ""]
        if isinstance(result, Path):
            lines += [f"![{title}]({result.relative_to(out).as_posix()})", ""]
            if name in CAPTIONS:
                lines += [CAPTIONS[name], ""]
        else:
            lines += [f"_Plot skipped: {result}._", ""]
    lines += ["## Samples", ""]
    if run.samples.is_file():
        lines += ["```text", run.samples.read_text().rstrip().replace("```", "` ` `"), "```", ""]
    else:
        lines += ["_No samples.txt in the run directory._", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.report",
        description="Write report.md with PNG plots (loss, throughput/MFU, memory, step time) for a run.",
    )
    parser.add_argument("run_dir", help="a run directory (with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where to write report.md and plots/ (default: run_dir)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {report} (plots in {report.parent / 'plots'})")


if __name__ == "__main__":
    main()
