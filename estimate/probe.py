"""`python -m estimate probe`: the engine's goals of issue 19, printed (a benchmark, not a test).

- count: a 7B (given by size) on 64, 512, 8,192 and 32,768 H100: wall-clock days must never rise
  with the count;
- context: the same shape at 4K and 128K context: accelerator-hours may rise by no more than
  the FLOPs-per-token ratio x 1.5;
- size vs shape: every published run of `validate` given by its parameter count alone (the
  shape of estimate.shapes' rule, same tokens, count, precision and published layout) against
  its published shape, leave-one-out as in validate: the median |ln error| of the two should
  agree within 0.05;
- shapes: the size rule's shape (estimate.shapes) against published shapes, compared on shapes
  alone (width, depth, MLP width): the dense runs of published_runs.yaml and the configs of
  other published models below (no hours), the evidence the rule's constants are fitted on.
"""

from __future__ import annotations

import math
import statistics

from estimate import shapes
from estimate.assumptions import load_defaults
from estimate.engine import estimate_run
from estimate.hardware import get_accelerator
from estimate.perf import load_factors
from estimate.published import RUNS_PATH, fit, load_runs, model_run, reported_hours, run_config
from estimate.report import md_table
from estimate.shapes import shape_from_size
from estimate.units import human
from model.flops import count_params, model_flops_per_token

# Dense configs of published models that are not runs of published_runs.yaml, for the shape check:
# (vocab, d_model, layers, heads, kv heads, head dim, gated MLP width (3 matrices), tied). Read
# 2026-12-07 from each model's config.json as published on the Hugging Face Hub (copies in the
# docs search: Qwen/Qwen2.5-*, Qwen/Qwen3-*, mistralai/Mistral-7B-v0.1, google/gemma-2b and
# gemma-2-9b (GeGLU), allenai/OLMo-1B-hf, OLMo-7B-hf, OLMo-2-1124-7B and -13B); Qwen2.5-3B from
# torchtune's qwen2_3B builder, which copies it.
PUBLISHED_CONFIGS = {
    "Qwen2.5-0.5B": (151936, 896, 24, 14, 2, 64, 4864, True),
    "Qwen2.5-1.5B": (151936, 1536, 28, 12, 2, 128, 8960, True),
    "Qwen2.5-3B": (151936, 2048, 36, 16, 2, 128, 11008, True),
    "Qwen2.5-7B": (152064, 3584, 28, 28, 4, 128, 18944, False),
    "Qwen2.5-14B": (152064, 5120, 48, 40, 8, 128, 13824, False),
    "Qwen3-0.6B": (151936, 1024, 28, 16, 8, 128, 3072, True),
    "Qwen3-4B": (151936, 2560, 36, 32, 8, 128, 9728, True),
    "Qwen3-8B": (151936, 4096, 36, 32, 8, 128, 12288, False),
    "Mistral-7B-v0.1": (32000, 4096, 32, 32, 8, 128, 14336, False),
    "Gemma-2B": (256000, 2048, 18, 8, 1, 256, 16384, True),
    "Gemma-2-9B": (256000, 3584, 42, 16, 8, 256, 14336, True),
    "OLMo-1B": (50304, 2048, 16, 16, 16, 128, 8192, True),
    "OLMo-7B": (50304, 4096, 32, 32, 32, 128, 11008, False),
    "OLMo-2-7B": (100352, 4096, 32, 32, 32, 128, 11008, False),
    "OLMo-2-13B": (100352, 5120, 40, 40, 40, 128, 13824, False),
    # Below 1B (read 2026-12-08). facebook/MobileLLM-125M config.json (hidden 576, 30 layers, 9
    # heads, 3 kv heads, intermediate 1536, vocab 32000, share_embedding); the five sizes as in
    # Table 9 of the MobileLLM paper (Liu et al. 2024, arXiv:2402.14905), vocab 32000 shared.
    "MobileLLM-125M": (32000, 576, 30, 9, 3, 64, 1536, True),
    "MobileLLM-350M": (32000, 960, 32, 15, 5, 64, 2560, True),
    "MobileLLM-600M": (32000, 1152, 40, 18, 6, 64, 3072, True),
    "MobileLLM-1B": (32000, 1280, 54, 20, 5, 64, 3584, True),
    "MobileLLM-1.5B": (32000, 1600, 54, 25, 5, 64, 4352, True),
    # EleutherAI/pythia-160m and pythia-410m config.json (GPT-NeoX: hidden 768 / 1024, 12 / 24
    # layers, 12 / 16 heads, GELU MLP 4 x d, vocab 50304, untied; Biderman et al. 2023, Table 1):
    # the 2-matrix 4d MLP written as its 3-matrix equivalent 8d/3, as the Pythia 1B run is.
    "Pythia-160M": (50304, 768, 12, 12, 12, 64, 2048, False),
    "Pythia-410M": (50304, 1024, 24, 16, 16, 64, 2731, False),
    # google/gemma-3-270m and gemma-3-1b-pt config.json (Gemma3ForCausalLM: hidden 640 / 1152,
    # 18 / 26 layers, 4 heads of 256, 1 kv head, GeGLU 2048 / 6912, vocab 262144, tied).
    "Gemma-3-270M": (262144, 640, 18, 4, 1, 256, 2048, True),
    "Gemma-3-1B": (262144, 1152, 26, 4, 1, 256, 6912, True),
}


def config_params(vocab: int, d: int, layers: int, heads: int, kv: int, head_dim: int, ffn: int,
                  tied: bool) -> float:
    """Parameters of a PUBLISHED_CONFIGS shape (gated MLP, RMSNorm, no biases)."""
    block = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ffn + 2 * d
    return vocab * d * (1 if tied else 2) + layers * block + d


def published_shapes(path=RUNS_PATH) -> list[dict]:
    """Every published dense shape: the dense runs of `path` and PUBLISHED_CONFIGS."""
    out = []
    for run in load_runs(path):
        if run["active_params"] < run["params"] * 0.999:
            continue
        c = run_config(run)
        out.append({"name": run["name"], "source": "run", "params": count_params(c), "d_model": c.d_model,
                    "n_layer": c.n_layer, "ffn_ratio": c.ffn_hidden / c.d_model})
    for name, (v, d, layers, h, kv, hd, f, tied) in PUBLISHED_CONFIGS.items():
        out.append({"name": name, "source": "config", "params": config_params(v, d, layers, h, kv, hd, f, tied),
                    "d_model": d, "n_layer": layers, "ffn_ratio": f / d})
    return out


def shape_check(path=RUNS_PATH) -> tuple[list[dict], dict]:
    """The size rule's shape for each published dense shape's parameter count, and per set
    (run, config, all) the median ln(rule / published) of width, depth and MLP width ratio, and
    the mean of their absolute values."""
    rows = []
    for s in published_shapes(path):
        r = shape_from_size(s["params"])
        rows.append({**s, "rule_d": r.d_model, "rule_L": r.n_layer, "rule_ffn_ratio": r.ffn_hidden / r.d_model,
                     "ln_d": math.log(r.d_model / s["d_model"]), "ln_L": math.log(r.n_layer / s["n_layer"]),
                     "ln_ffn": math.log(r.ffn_hidden / r.d_model / s["ffn_ratio"])})
    summary = {}
    for group in ("run", "config", "all"):
        sel = [r for r in rows if group == "all" or r["source"] == group]
        summary[group] = {"n": len(sel), "published_ffn_ratio": statistics.median(r["ffn_ratio"] for r in sel)}
        for k in ("ln_d", "ln_L", "ln_ffn"):
            summary[group][k] = statistics.median(r[k] for r in sel)
            summary[group][k + "_abs"] = statistics.fmean(abs(r[k]) for r in sel)
    return rows, summary


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

    print(f"## The size rule against published shapes (estimate.shapes, MLP {shapes.FFN_RATIO} x d_model)\n")
    rows, summ = shape_check()
    print(md_table(["shape", "from", "params", "d_model pub / rule", "layers pub / rule", "MLP/d pub / rule"],
                   [[r["name"], r["source"], human(r["params"]), f"{r['d_model']} / {r['rule_d']}",
                     f"{r['n_layer']} / {r['rule_L']}", f"{r['ffn_ratio']:.2f} / {r['rule_ffn_ratio']:.2f}"]
                    for r in rows]))
    print()
    print(md_table(["set", "shapes", "published MLP/d (median)", "ln d rule/pub: median (mean |.|)",
                    "ln layers", "ln MLP/d"],
                   [[g, v["n"], f"{v['published_ffn_ratio']:.2f}"]
                    + [f"{v[k]:+.3f} ({v[k + '_abs']:.3f})" for k in ("ln_d", "ln_L", "ln_ffn")]
                    for g, v in summ.items()]))
    print()

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
