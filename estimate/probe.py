"""`python -m estimate probe`: the engine's goals of issue 19, printed (a benchmark, not a test).

- count: a 7B (given by size) on 64, 512, 8,192 and 32,768 H100: wall-clock days must never rise
  with the count;
- context: the same shape at 4K and 128K context: accelerator-hours may rise by no more than
  the FLOPs-per-token ratio x 1.5;
- size vs shape: every published run of `validate` given by its parameter count alone (the
  shape of estimate.shapes' rule, same tokens, count, precision and published layout) against
  its published shape, leave-one-out as in validate: the median |ln error| of the two should
  agree within 0.05.
"""

from __future__ import annotations

import math
import statistics

from estimate.assumptions import load_defaults
from estimate.engine import estimate_run
from estimate.hardware import get_accelerator
from estimate.perf import load_factors
from estimate.published import RUNS_PATH, fit, load_runs, model_run, reported_hours
from estimate.report import md_table
from estimate.shapes import shape_from_size
from estimate.units import human
from model.flops import model_flops_per_token

COUNTS = (64, 512, 8192, 32768)
PROBE_TOKENS = 2e12


def count_probe(params: float = 7e9, acc_name: str = "H100-SXM5-80GB",
                counts: tuple[int, ...] = COUNTS, tokens: float = PROBE_TOKENS) -> list[dict]:
    """Days, hours and layout of `params` (by size) on each count."""
    d = load_defaults()
    fitted = fit()
    acc = get_accelerator(acc_name)
    factors = load_factors(d, fitted.stack_for(True, acc))
    cfg = shape_from_size(params)
    rows = []
    for n in counts:
        e = estimate_run(cfg, cfg.seq_len, tokens, acc, n, "bf16", factors, d)
        hours = e.compute_hours() / fitted.wallclock_goodput  # project's wall-clock figure
        rows.append({"count": n, "days": hours / n / 24, "hours": hours, "used": e.layout.devices,
                     "layout": e.plan.best.describe(), "estimate": e})
    return rows


def context_probe(params: float = 7e9, acc_name: str = "H100-SXM5-80GB", n: int = 1024,
                  short: int = 4096, long: int = 131072, tokens: float = PROBE_TOKENS) -> dict:
    """The same shape at `short` and `long` context: hours ratio against the FLOPs ratio."""
    d = load_defaults()
    fitted = fit()
    acc = get_accelerator(acc_name)
    factors = load_factors(d, fitted.stack_for(True, acc))
    out = {}
    for T in (short, long):
        cfg = shape_from_size(params, seq_len=T)
        e = estimate_run(cfg, T, tokens, acc, n, "bf16", factors, d)
        out[T] = {"hours": e.compute_hours() / fitted.wallclock_goodput, "flops_per_token": model_flops_per_token(cfg, T),
                  "layout": e.plan.best.describe(), "estimate": e}
    out["hours_ratio"] = out[long]["hours"] / out[short]["hours"]
    out["flops_ratio"] = out[long]["flops_per_token"] / out[short]["flops_per_token"]
    return out


def size_vs_shape(path=RUNS_PATH) -> list[dict]:
    """Each run with reported hours, predicted leave-one-out from its shape and from its size."""
    d = load_defaults()
    rows = []
    for run in load_runs(path):
        hours, _ = reported_hours(run)
        if hours is None:
            continue
        fitted = fit(exclude=run["name"], path=path)
        factors = load_factors(d, fitted.stack)
        by_shape = model_run(run, factors, fit=fitted)
        cfg = by_shape.cfg
        sized = shape_from_size(run["params"], run["active_params"], seq_len=cfg.seq_len)
        as_size = dict(run, model={k: v for k, v in vars(sized).items() if k != "notes"})
        by_size = model_run(as_size, factors, count=by_shape.count, fit=fitted)
        rows.append({"run": run["name"], "reported": hours,
                     "shape": by_shape.hours, "size": by_size.hours,
                     "ln_shape": math.log(by_shape.hours / hours),
                     "ln_size": math.log(by_size.hours / hours)})
    return rows


def main() -> int:
    print("## Count probe: 7B given by size (--params 7B), 2T tokens, H100-SXM5-80GB\n")
    rows = count_probe()
    print(md_table(["count", "wall-clock days", "accelerator-hours", "devices used", "layout"],
                   [[r["count"], f"{r['days']:.3g}", human(r["hours"]), r["used"], r["layout"]]
                    for r in rows]))
    days = [r["days"] for r in rows]
    ok = all(b <= a * (1 + 1e-9) for a, b in zip(days, days[1:], strict=False))
    print(f"\ndays never rise with the count: {'yes' if ok else 'NO'}\n")

    print("## Context probe: the 7B shape at 4K and 128K context, 2T tokens, 1024 x H100\n")
    c = context_probe()
    print(md_table(["context", "FLOPs/token", "accelerator-hours", "layout"],
                   [[T, f"{c[T]['flops_per_token']:.3g}", human(c[T]["hours"]), c[T]["layout"]]
                    for T in (4096, 131072)]))
    limit = c["flops_ratio"] * 1.5
    print(f"\nhours ratio {c['hours_ratio']:.2f}, FLOPs ratio {c['flops_ratio']:.2f}, limit "
          f"{limit:.2f}: {'within' if c['hours_ratio'] <= limit else 'OVER'}\n")

    print("## Size vs shape: published runs given by size and by shape (leave-one-out)\n")
    s = size_vs_shape()
    print(md_table(["run", "reported", "by shape", "ln err", "by size", "ln err"],
                   [[r["run"], human(r["reported"]), human(r["shape"]), f"{r['ln_shape']:+.2f}",
                     human(r["size"]), f"{r['ln_size']:+.2f}"] for r in s]))
    med_shape = statistics.median(abs(r["ln_shape"]) for r in s)
    med_size = statistics.median(abs(r["ln_size"]) for r in s)
    print(f"\nmedian |ln err|: by shape {med_shape:.3f}, by size {med_size:.3f}, difference "
          f"{abs(med_size - med_shape):.3f} (goal <= 0.05)")
    return 0
