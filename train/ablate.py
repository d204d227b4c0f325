"""`python -m train.ablate CONFIG [key=value ...]`: one short run per efficiency technique.

Each technique is switched on alone over the config (the baseline: fp32, no recomputation, no
compilation, fused AdamW) and trained for `--steps` steps by the real training command
(`python -m train`, one process, started by `contracts.run.launch_training`). The table gives,
per technique:
- tokens/s: median over the steps after warm-up (summary.json), and its ratio to the baseline;
- step memory: the allocator's peak during one training step (forward, backward, optimizer)
  above what was allocated before it, measured in a separate probe process. On GPU this is
  `torch.cuda.max_memory_allocated`; on CPU, where there is no allocator statistic, the
  PyTorch profiler's memory events (`profile_memory=True`) give the running total. It counts
  activations, gradients and temporaries; weights and optimizer state live across steps and
  are not in it. Peak RSS, the whole process including Python and libraries, is given too;
- executed FLOPs per token relative to the model FLOPs (recomputation runs part of the
  forward pass again), and the published expectation, with its source, beside the measurement.

Writes `OUT/ablation.md` (headed by the date, machine, torch version and command:
`contracts.measured.header`), `OUT/ablation.json` and `OUT/ablation.png`; with `--publish` also
`docs/measured/ablation-DATE.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from contracts.dataset import read_dataset_meta
from contracts.measured import DOCS, header
from contracts.measured import publish as publish_table
from contracts.run import launch_training

TITLE = "Efficiency ablation"

EXPECT_RECOMPUTE = (
    "one more forward pass of each block: ~+33% compute (Chen et al. 2016; Korthikanti et al. "
    "2022 §4), ours +{flops} (non-reentrant checkpoint skips each block's last matmul, "
    "model/flops.py); keeps only block inputs, 2sbh bytes per layer instead of sbh(34+5as/h) "
    "(Korthikanti et al. 2022 eq. 2): most activation memory saved"
)


@dataclass(frozen=True)
class Technique:
    name: str
    overrides: tuple[str, ...]
    expectation: str
    gpu_only: bool = False


TECHNIQUES = (
    Technique("baseline (fp32, fused AdamW)", (), "reference"),
    Technique("recompute every block", ("activation_checkpointing=full",), EXPECT_RECOMPUTE),
    Technique(
        "recompute every 2nd block", ("activation_checkpointing=every_k", "checkpoint_every_k=2"),
        "half of full recomputation's cost (+{flops} FLOPs) for about half its memory saving "
        "(Chen et al. 2016: checkpoint spacing trades memory for compute)",
    ),
    Technique(
        "recompute attention only", ("activation_checkpointing=attention",),
        "selective recomputation (Korthikanti et al. 2022 §4.2): +2.7% FLOPs for GPT-3 175B, "
        "saving the large 5as²b attention-score activations; ours +{flops}. With a fused SDPA "
        "kernel the scores are never stored (Dao et al. 2022), so the saving is small here",
    ),
    Technique(
        "torch.compile, whole model", ("compile=true", "compile_scope=model"),
        "Ansel et al. 2024 (PyTorch 2): 1.41x geometric-mean training speed-up on an A100 over "
        "180+ models, from fusing memory-bound elementwise ops (norms, RoPE, SwiGLU); fused "
        "kernels also store fewer intermediates. Matmul-bound steps gain least",
    ),
    Technique(
        "torch.compile, per block", ("compile=true", "compile_scope=blocks"),
        "the same fusions inside blocks, one graph reused by every block: shorter compile "
        "(torchtitan, Liang et al. 2024, compiles per block); the embedding, LM head and loss "
        "stay eager",
    ),
    Technique(
        "AdamW foreach (not fused)", ("optim.fused=false",),
        "the fused kernel updates all of a group's tensors in one pass (PyTorch 2 AdamW docs: "
        "fused > foreach > for-loop); the optimizer is a small share of a step, so a few % at most",
    ),
    Technique(
        "bf16 autocast", ("mixed_precision=bf16",),
        "~2x matmul throughput and half the activation bytes where bf16 units exist (tensor "
        "cores, AMX; Kalamkar et al. 2019). On a CPU without avx512_bf16/AMX, bf16 matmuls are "
        "emulated: slower than fp32",
    ),
    Technique(
        "fp16 + grad scaler", ("mixed_precision=fp16",),
        "Micikevicius et al. 2018: fp16 compute with fp32 master weights and loss scaling; "
        "~2x matmul throughput on tensor cores. GPU only (refused on CPU)", gpu_only=True,
    ),
)


def peak_step_bytes(step_fn, device: torch.device) -> int:
    """Peak bytes allocated during `step_fn()` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # The CPU allocator reports each allocation, with the running total of the bytes allocated
    # since profiling started (and not yet freed), to the profiler: its maximum is the peak.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
        stack.extend(event.children)
    return int(peak)


def probe(config: str, overrides: list[str], warmup: int = 2) -> dict:
    """Build the model as training does, take `warmup` steps, then measure one step's memory."""
    from train.config import load_config
    from train.distributed import build_accelerator, set_threads
    from train.techniques import build_model

    cfg = load_config(config, overrides)
    accelerator = build_accelerator(cfg)
    set_threads(cfg, accelerator)
    torch.manual_seed(cfg.seed)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = read_dataset_meta(cfg.data_dir).vocab_size
    model, optimizer = build_model(cfg, accelerator)
    seq_len = cfg.seq_len or cfg.model.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (cfg.micro_batch_size, seq_len + 1),
                      device=accelerator.device)

    def step():
        _, loss = model(x[:, :-1], x[:, 1:])
        accelerator.backward(loss / x[:, 1:].numel())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):  # compilation, lazy optimizer state
        step()
    return {"step_peak_bytes": peak_step_bytes(step, accelerator.device)}


def run_technique(technique: Technique, config: str, overrides: list[str], out: Path,
                  steps: int) -> dict:
    """Train and probe one technique in fresh processes; the row of the table."""
    run_dir = out.resolve() / "runs" / slug(technique.name)
    args = [config, *overrides, *technique.overrides]
    started = time.monotonic()
    summary = launch_training(
        Path(config).resolve(),
        [*overrides, *technique.overrides, f"steps={steps}", f"eval_every={steps}",
         "eval_batches=2", "tracker=none", "sample_tokens=8", "peak_samples=2",
         "checkpoint_every=0"],
        run_dir)
    # the memory probe is not a training run: a process of its own, one step measured
    result = subprocess.run([sys.executable, "-m", "train.ablate", "--probe", *args],
                            capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if result.returncode != 0:
        raise RuntimeError(f"{technique.name}: memory probe failed\n{result.stderr[-3000:]}")
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "technique": technique.name,
        "overrides": list(technique.overrides),
        "tokens_per_s": summary.tokens_per_s_median,
        "tokens_per_s_p10": summary.tokens_per_s["p10"],
        "tokens_per_s_p90": summary.tokens_per_s["p90"],
        "step_peak_bytes": memory["step_peak_bytes"],
        "peak_rss_bytes": summary.peak_mem_bytes,
        "flops_ratio": summary.recompute_ratio,
        "mfu": summary.mfu_median,
        "final_train_loss": summary.raw["final_train_loss"],
        "device": summary.device,
        "wall_s": time.monotonic() - started,
        "expectation": technique.expectation,
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def combine(rounds: list[list[dict]]) -> list[dict]:
    """Median over repeated rounds of each technique's measurements."""
    rows = []
    for same in zip(*rounds, strict=True):
        row = dict(same[0])
        for key in ("tokens_per_s", "step_peak_bytes", "peak_rss_bytes", "mfu"):
            row[key] = statistics.median(r[key] for r in same)
        row["repeats"] = len(same)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["tokens_per_s_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["step_memory_vs_baseline"] = row["step_peak_bytes"] / base["step_peak_bytes"]
        row["expectation"] = row["expectation"].format(flops=f"{row['flops_ratio'] - 1:.0%}")
    return rows


def markdown(rows: list[dict], machine: str, command: str) -> str:
    """The table, headed by the date, machine, torch version and command."""
    lines = [
        header(TITLE, command),
        f"Measured on {machine}.",
        "",
        "| technique | tokens/s | vs baseline | step memory (MiB) | vs baseline | peak RSS (MiB) "
        "| executed FLOPs | published expectation |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['technique']} | — | — | — | — | — | — | {r['expectation']} "
                         f"(skipped: {r['skipped']}) |")
            continue
        lines.append(
            f"| {r['technique']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_vs_baseline']:.2f}x "
            f"| {r['step_peak_bytes'] / 2**20:,.0f} | {r['step_memory_vs_baseline']:.2f}x "
            f"| {r['peak_rss_bytes'] / 2**20:,.0f} | {r['flops_ratio']:.2f}x | {r['expectation']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    names = [r["technique"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, key, label in ((axes[0], "tokens_per_s_vs_baseline", "tokens/s vs baseline"),
                           (axes[1], "step_memory_vs_baseline", "step memory vs baseline")):
        values = [r[key] for r in rows]
        ax.barh(names, values, color=["#888" if v == 1 else "#3a7" for v in values])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel(label)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description() -> str:
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                  if line.startswith("model name")), platform.processor())
    bf16 = "with" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "without"
    return (f"{model}, {os.cpu_count()} cores, 1 process, {bf16} native bf16 "
            f"(torch {torch.__version__})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.ablate", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/train/ablate.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all techniques; the table gives medians")
    parser.add_argument("--only", default="", help="comma-separated words: keep techniques "
                        "whose name contains one (the baseline is always run)")
    parser.add_argument("--publish", action="store_true",
                        help="also write the table as docs/measured/ablation-DATE.md")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.config, args.overrides)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    chosen = [t for i, t in enumerate(TECHNIQUES) if i == 0 or not args.only
              or any(w in t.name for w in args.only.split(","))]
    runnable = [t for t in chosen if gpu or not t.gpu_only]
    rounds = []
    for r in range(args.repeats):
        order = runnable if r % 2 == 0 else [runnable[0], *reversed(runnable[1:])]
        results = {}
        for t in order:
            print(f"[round {r + 1}/{args.repeats}] {t.name} ...", flush=True)
            results[t.name] = run_technique(t, args.config, args.overrides, out, args.steps)
            print(f"    {results[t.name]['tokens_per_s']:,.0f} tokens/s, step memory "
                  f"{results[t.name]['step_peak_bytes'] / 2**20:,.0f} MiB", flush=True)
        rounds.append([results[t.name] for t in runnable])
    rows = combine(rounds)
    for t in chosen:
        if t not in runnable:
            rows.append({"technique": t.name, "skipped": "needs a GPU",
                         "expectation": t.expectation})
    command = "python -m train.ablate " + " ".join(
        [args.config, *args.overrides, f"--steps {args.steps}", f"--repeats {args.repeats}"]
        + ([f"--only {args.only}"] if args.only else []) + (["--publish"] if args.publish else []))
    write_tables(out, rows, machine_description(), command, args.steps,
                 DOCS if args.publish else None)


def write_tables(out: Path, rows: list[dict], machine: str, command: str, steps: int,
                 publish: Path | None = None) -> str:
    """OUT/ablation.{md,json,png}, and with `publish` (a directory) PUBLISH/ablation-DATE.md."""
    table = markdown(rows, machine, command)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps(
        {"format": 1, "machine": machine, "command": command, "steps": steps, "rows": rows},
        indent=2))
    plot(rows, out / "ablation.png", f"{machine}\n{command}")
    print("\n" + table)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    if publish is not None:
        print(f"published {publish_table('ablation', table, publish)}")
    return table


if __name__ == "__main__":
    main()
