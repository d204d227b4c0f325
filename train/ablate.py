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

`--parallel` runs the parallel layouts instead, each on 2 processes (gloo) at the baseline's
global batch: DDP, tp=2, cp=2 and pp=2 under each schedule at `--microbatches M`. Their memory
probe runs on as many processes, laid out like the run, and gives per rank the step memory and
the weights and AdamW state kept between steps; pipelined rows add each rank's measured bubble
(summary.json's `pipeline`) beside the schedule's formula (ablation-parallel-DATE.md).

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
from contracts.run import ROOT, launch_training

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
    nproc: int = 1  # processes (2 for the parallel layouts, on gloo)


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


# The parallel layouts (`--parallel`), each on 2 processes (gloo, one thread each) with the
# same global batch as the baseline. Expectations are the papers' analyses; on one 2-core CPU
# the "devices" share a memory bus, and every collective is a blocking gloo call.
EXPECT_DDP = (
    "data-parallel reference: each rank runs half the batch, one gradient all-reduce per step; "
    "up to 2x one process's tokens/s (this machine's scaling table: 88% efficiency at a fixed "
    "global batch, scaling-2026-11-29.md); weights and AdamW state whole on every rank, "
    "activations of half the sequences"
)
EXPECT_TP = (
    "Megatron-LM (Shoeybi et al. 2019 §3): heads and MLP columns split over t ranks, an "
    "all-reduce (here all-gather + reduce-scatter, sequence parallel) around each sub-layer, "
    "forward and backward; weights and AdamW state 1/t per rank (embedding and head "
    "vocabulary-split too). Activations per layer sbh(34+5as/h)/t with sequence parallel "
    "against sbh(10+24/t+5as/(ht)) without (Korthikanti et al. 2022 §4.2.2, eq. 4 and 3): "
    "~1/2 at t=2. Same FLOPs on 2 cores, less the exposed collectives"
)
EXPECT_CP = (
    "Llama 3 (Dubey et al. 2024 §3.3.2): each sequence cut into 2·cp chunks, rank r keeps "
    "chunks r and 2cp-1-r (balanced under the causal mask) and all-gathers every layer's keys "
    "and values; activations outside attention 1/cp per rank, weights and AdamW state "
    "replicated (gradients summed over cp like data parallel)"
)
EXPECT_PP_MEMORY = (
    "Weights and AdamW state of 1/p of the layers per stage (Narayanan et al. 2021 §2.2); each "
    "rank here keeps its stages only (the embedding on the first, the LM head on the last, "
    "both with tied embeddings), so the rank with the vocabulary matrices holds more"
)
EXPECT_PP = {
    "gpipe": "GPipe (Huang et al. 2019): all forwards, then all backwards; bubble "
             "(p-1)/(m+p-1) of the step = {formula:.3f} (Narayanan et al. 2021 §2.2.1); "
             "activations of all m micro-batches held at once",
    "1f1b": "1F1B (Narayanan et al. 2021 §2.2.1, PipeDream-Flush): GPipe's bubble "
            "(p-1)/(m+p-1) = {formula:.3f}, but at most p micro-batches' activations in flight",
    "interleaved": "interleaved 1F1B, v=2 chunks per rank (Narayanan et al. 2021 §2.2.2): "
                   "bubble (p-1)/(v·m+p-1) = {formula:.3f}, v times the point-to-point sends",
    "zero_bubble": "ZB-V (Qi et al. 2023, arXiv:2401.10241 §6): backward split into input (B) "
                   "and weight (W) gradients, the Ws fill the bubble: zero with equal F, B, W "
                   "times, 1F1B's activation memory; below 1F1B's {formula:.3f} here",
    "dualpipev": "DualPipe (DeepSeek-V3, arXiv:2412.19437 §3.2.1, table 2: bubble "
                 "(PP/2-1)(F&B+B-3W) against 1F1B's (PP-1)(F+B)), in torch's V form (one "
                 "weight copy): 0 at p=2; its overlap of compute with all-to-all needs "
                 "concurrent streams, which one CPU thread per rank lacks; below 1F1B's "
                 "{formula:.3f} here",
}


def parallel_techniques(microbatches: int) -> tuple[Technique, ...]:
    """The 2-process layouts: the DDP reference, tp=2, cp=2, and pp=2 under each schedule at
    `microbatches` micro-batches per step."""
    from train.parallel.pipeline import SCHEDULES, bubble_formula

    def pp(schedule: str) -> Technique:
        formula = bubble_formula(schedule, 2, microbatches) or bubble_formula("1f1b", 2,
                                                                                microbatches)
        return Technique(
            f"pp=2 {schedule}, M={microbatches}",
            ("parallel.pp=2", f"parallel.schedule={schedule}",
             f"parallel.microbatches={microbatches}"),
            EXPECT_PP[schedule].format(formula=formula) + ". " + EXPECT_PP_MEMORY, nproc=2)

    return (Technique("DDP, 2 processes", ("micro_batch_size=4",), EXPECT_DDP, nproc=2),
            Technique("tp=2 + sequence parallel", ("parallel.tp=2",), EXPECT_TP, nproc=2),
            Technique("cp=2", ("parallel.cp=2",), EXPECT_CP, nproc=2),
            *(pp(schedule) for schedule in SCHEDULES))


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
    """Build this layout's model, optimizer and step as training does
    (`train.loop.build_training`), take `warmup` steps on random tokens, then measure one
    step's memory and the bytes the rank holds across steps. On several processes (launched
    like training) the main rank returns every rank's figures under `ranks`."""
    import torch.distributed as dist

    from train.clock import PhaseTimer
    from train.config import load_config
    from train.distributed import build_accelerator, finish, set_threads
    from train.loop import build_training
    from train.parallel.layout import Layout
    from train.parallel.pp_train import PipelineRun

    cfg = load_config(config, overrides)
    accelerator = build_accelerator(cfg)
    set_threads(cfg, accelerator)
    torch.manual_seed(cfg.seed)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = read_dataset_meta(cfg.data_dir).vocab_size
    world = accelerator.num_processes
    layout = Layout.plan(cfg.parallel, accelerator.process_index, world, cfg.fsdp)
    pipeline = PipelineRun(cfg, accelerator) if cfg.parallel.pp > 1 else None
    _, model, optimizer, step_fn, _ = build_training(cfg, accelerator, layout, pipeline)
    accum = cfg.batch_size // (cfg.micro_batch_size * (pipeline.dp if pipeline else layout.dp))
    seq_len = cfg.seq_len or cfg.model.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (accum, cfg.micro_batch_size, seq_len + 1),
                           device=accelerator.device)  # the same on every rank (same seed)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    timer = PhaseTimer(accelerator.device)

    def step():
        timer.start()
        step_fn(model, optimizer, batches, accelerator, timer, cfg.optim.grad_clip)

    for _ in range(warmup):  # compilation, lazy optimizer state
        step()
    mine = {"step_peak_bytes": peak_step_bytes(step, accelerator.device),
            **held_bytes(model, optimizer)}
    if world == 1:
        return mine
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    main = accelerator.is_main_process
    finish(accelerator)
    return {"ranks": every} if main else None


def held_bytes(model: torch.nn.Module, optimizer) -> dict:
    """What a rank keeps from step to step: its weights (all it holds, sharded or not) and its
    optimizer state (AdamW's moments exist only for parameters that got a gradient)."""
    params = {id(p): p for p in model.parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"weight_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "optimizer_bytes": sum(v.numel() * v.element_size() for v in state)}


def run_technique(technique: Technique, config: str, overrides: list[str], out: Path,
                  steps: int) -> dict:
    """Train and probe one technique in fresh processes; the row of the table."""
    run_dir = out.resolve() / "runs" / slug(technique.name)
    args = [str(Path(config).resolve()), *overrides, *technique.overrides]
    started = time.monotonic()
    summary = launch_training(
        Path(config).resolve(),
        [*overrides, *technique.overrides, f"steps={steps}", f"eval_every={steps}",
         "eval_batches=2", "tracker=none", "sample_tokens=8", "peak_samples=2",
         "checkpoint_every=0"],
        run_dir, nproc=technique.nproc)
    ranks = run_probe(technique, args)
    ranks = ranks.get("ranks", [ranks])  # one process: its own figures
    row = {
        "technique": technique.name,
        "overrides": list(technique.overrides),
        "nproc": technique.nproc,
        "tokens_per_s": summary.tokens_per_s_median,
        "tokens_per_s_p10": summary.tokens_per_s["p10"],
        "tokens_per_s_p90": summary.tokens_per_s["p90"],
        "step_s": summary.step_s["median"],
        "step_peak_bytes": max(r["step_peak_bytes"] for r in ranks),  # the busiest rank's
        "peak_rss_bytes": summary.peak_mem_bytes,
        "flops_ratio": summary.recompute_ratio,
        "mfu": summary.mfu_median,
        "final_train_loss": summary.raw["final_train_loss"],
        "device": summary.device,
        "wall_s": time.monotonic() - started,
        "expectation": technique.expectation,
    }
    for key in ("step_peak_bytes", "weight_bytes", "optimizer_bytes"):
        row[f"{key}_per_rank"] = [r[key] for r in ranks]
    for key in ("tp_comm_s", "cp_comm_s"):  # the layout's exposed collectives, per step
        if key in summary.raw:
            row["comm_s"] = summary.raw[key]["median"]
    if "pipeline" in summary.raw:
        pipe = summary.raw["pipeline"]
        row["bubble_per_rank"] = pipe["bubble_median_per_rank"]
        row["bubble_formula"] = pipe["bubble_formula"]
        row["microbatches"] = pipe["microbatches"]
    return row


def run_probe(technique: Technique, args: list[str]) -> dict:
    """The memory probe: not a training run, but processes of their own laid out like the
    technique's (launch/cpu.sh for several), one step measured."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if technique.nproc == 1:
        cmd = [sys.executable, "-m", "train.ablate", "--probe", *args]
    else:
        from train.parallel.procs import free_port

        cmd = [str(ROOT / "launch" / "cpu.sh"), "--probe", *args]
        env |= {"NPROC": str(technique.nproc), "PY": sys.executable, "MODULE": "train.ablate",
                "MASTER_PORT": str(free_port())}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{technique.name}: memory probe failed\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def combine(rounds: list[list[dict]]) -> list[dict]:
    """Median over repeated rounds of each technique's measurements (per rank for the
    per-rank figures), and each row's ratios to the first row, the baseline."""
    rows = []
    for same in zip(*rounds, strict=True):
        row = dict(same[0])
        for key in ("tokens_per_s", "step_s", "step_peak_bytes", "peak_rss_bytes", "mfu",
                    "comm_s"):
            if key in row:
                row[key] = statistics.median(r[key] for r in same)
        for key in [k for k in row if k.endswith("_per_rank")]:
            row[key] = [statistics.median(values) for values in zip(*(r[key] for r in same),
                                                                    strict=True)]
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


def mib(values: list[int]) -> str:
    return " / ".join(f"{v / 2**20:,.0f}" for v in values)


def markdown_parallel(rows: list[dict], machine: str, command: str) -> str:
    """The parallel layouts' table: throughput, memory per rank and the pipeline bubble
    beside the published expectation."""
    lines = [
        header(TITLE + ": parallel layouts", command),
        f"Measured on {machine}.",
        "",
        "| layout | processes | tokens/s | vs 1 process | step memory per rank (MiB) "
        "| weights per rank (MiB) | AdamW state per rank (MiB) | exposed collectives (ms/step) "
        "| bubble per rank, measured | bubble, formula | published expectation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        comm = f"{r['comm_s'] * 1e3:,.0f}" if "comm_s" in r else "—"
        bubble = (" / ".join(f"{b:.3f}" for b in r["bubble_per_rank"])
                  if r.get("bubble_per_rank") else "—")
        formula = (f"{r['bubble_formula']:.3f}" if r.get("bubble_formula") is not None
                   else ("no closed form" if r.get("bubble_per_rank") else "—"))
        lines.append(
            f"| {r['technique']} | {r['nproc']} | {r['tokens_per_s']:,.0f} "
            f"| {r['tokens_per_s_vs_baseline']:.2f}x | {mib(r['step_peak_bytes_per_rank'])} "
            f"| {mib(r['weight_bytes_per_rank'])} | {mib(r['optimizer_bytes_per_rank'])} "
            f"| {comm} | {bubble} | {formula} | {r['expectation']} |")
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
    return (f"{model}, {os.cpu_count()} cores, one thread per process, {bf16} native bf16 "
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
    parser.add_argument("--parallel", action="store_true",
                        help="the parallel layouts instead of the techniques: DDP, tp=2, cp=2 "
                        "and pp=2 under each schedule, each on 2 processes (gloo), beside the "
                        "1-process baseline; publishes ablation-parallel-DATE.md")
    parser.add_argument("--microbatches", type=int, default=4,
                        help="with --parallel: pipeline micro-batches per step (M)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        figures = probe(args.config, args.overrides)
        if figures is not None:  # the main rank speaks for all
            print(json.dumps(figures), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    menu = ((TECHNIQUES[0], *parallel_techniques(args.microbatches)) if args.parallel
            else TECHNIQUES)
    chosen = [t for i, t in enumerate(menu) if i == 0 or not args.only
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
        + ([f"--parallel --microbatches {args.microbatches}"] if args.parallel else [])
        + ([f"--only {args.only}"] if args.only else []) + (["--publish"] if args.publish else []))
    write_tables(out, rows, machine_description(), command, args.steps,
                 DOCS if args.publish else None, parallel=args.parallel)


def write_tables(out: Path, rows: list[dict], machine: str, command: str, steps: int,
                 publish: Path | None = None, parallel: bool = False) -> str:
    """OUT/ablation.{md,json,png}, and with `publish` (a directory) PUBLISH/ablation-DATE.md
    (ablation-parallel-DATE.md for the parallel layouts)."""
    table = (markdown_parallel if parallel else markdown)(rows, machine, command)
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps(
        {"format": 1, "machine": machine, "command": command, "steps": steps, "rows": rows},
        indent=2))
    plot(rows, out / "ablation.png", f"{machine}\n{command}")
    print("\n" + table)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    if publish is not None:
        name = "ablation-parallel" if parallel else "ablation"
        print(f"published {publish_table(name, table, publish)}")
    return table


if __name__ == "__main__":
    main()
