"""Time, on this machine, what the performance model charges for parallelism: the rates it
starts from and each parallel term it adds.

    python -m train.parallel.collectives_bench SPEC.json OUT.json

`python -m estimate calibrate --parallel` writes SPEC.json (the model, the shapes, the message
sizes; `estimate.calibrate.parallel`), runs this command and reads OUT.json; the estimator
never imports torch. Everything runs with one torch thread per process, on gloo between 2
local processes started by `train.parallel.procs.spawn`.

One process:
- **matmul**: `train.clock`'s 1024^3 peak, and each forward matmul shape the model runs (and
  the two backward matmuls of each: dX = dY W, dW = dY^T X), the fastest of the repeats
  (`fastest_seconds`, as every one-process timing here);
- **memory bandwidth**: c = a + b over tensors far larger than the caches (3 x their bytes
  moved per call);
- **attention**: causal scaled-dot-product attention forward and backward at the model's shape;
- **dispatch**: the host seconds of one dispatched operation under autograd, and how many
  operations a training step of the model dispatches (`train.opcount`);
- **memory-bound work**: torch.profiler's CPU time of one block's forward and backward,
  without its matmuls and attention kernel (norms, RoPE, SiLU, products, residual adds,
  copies), per token.

Two processes (gloo):
- **collectives**: all-reduce, all-gather, reduce-scatter (gloo's own, as FSDP2 issues it),
  the reduce-scatter as the trainer's tensor and context parallelism issue it
  (`train.parallel.comm.reduce_scatter`: an all-to-all and a local sum), and one-way send/recv
  (half a ping-pong), at each message size, the median of the repeats (`median_seconds`, as
  every two-process timing here);
- **data parallel**: all-reduce of the model's gradients (fp32) in DDP's 25 MB buckets;
- **FSDP**: per sharded unit (each block, then the root), an all-gather of its parameters for
  the forward and one for the backward (FSDP2 reshards blocks after forward; the root keeps
  its gathered parameters) and a reduce-scatter of its gradients;
- **overlap**: an all-reduce alone, matmuls alone, and the two at once: the share of the
  compute a collective hides behind (perf's dp_overlap);
- **arrival**: a chain of all-gathers and (the trainer's) reduce-scatters of the model's
  activation message, each entered straight from compute on both ranks (no barrier), against
  the same entered together: the latency a collective pays inside a step beyond its isolated
  time (waiting for the later rank, waking the transport);
- **context parallel**: per layer, the all-gather of this rank's keys and values (forward),
  and the all-gather and reduce-scatter (the trainer's) of keys, values and their gradients
  (backward);
- **pipeline**: `train.parallel.bench_pp.measure_rows` at the spec's schedules and M, with
  the blocks of each stage and the stages of each rank the pipeline was split into.

Tensor parallelism is not timed here: calibrate runs the trainer itself at parallel.tp=2,
which clocks its collectives per step (tp_comm_s, tp_collectives in metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.transformer import Transformer
from train.clock import measure_matmul_flops
from train.opcount import OpCounter, count_step
from train.parallel import bench_pp
from train.parallel.comm import reduce_scatter
from train.parallel.pipeline import block_ranges, rank_stages, stages_per_rank
from train.parallel.procs import spawn

WORLD = 2
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
MEMORY_ELEMS = 8 * 2**20  # 32 MiB per fp32 tensor: well past the caches
TRAINER_REDUCE_SCATTER = "trainer_reduce_scatter"  # train.parallel.comm.reduce_scatter


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` calls after `warmup`, a barrier before each
    so that the ranks of a collective start together. The median, for the collectives and
    the terms alike: a sequence of collectives pays each one's typical time, not its best."""
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def fastest_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """The fewest wall seconds of fn() over `repeats` calls after `warmup`. The fastest, not
    the median: on a shared machine a matmul waits whenever its core is taken; the minimum is
    what the core does, the rest is the neighbours (calibrate reports their CPU use beside
    the runs)."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return min(times)


# --- one process -------------------------------------------------------------------------

def gemm_seconds(m: int, k: int, n: int, repeats: int) -> dict:
    """Seconds of Y = X W^T ([m, k] x [k, n], as nn.Linear) and of its two backward
    matmuls."""
    x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    return {"m": m, "k": k, "n": n,
            "fwd_s": fastest_seconds(lambda: F.linear(x, w), repeats),
            "bwd_s": fastest_seconds(lambda: g @ w, repeats)
            + fastest_seconds(lambda: g.t() @ x, repeats)}


def attention_seconds(b: int, h: int, t: int, hd: int, repeats: int) -> dict:
    """Seconds of causal SDPA forward, and of forward + backward, on [b, h, t, hd]."""
    q, k, v = (torch.randn(b, h, t, hd, requires_grad=True) for _ in range(3))

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    fwd = fastest_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
    return {"fwd_s": fwd, "fwd_bwd_s": fastest_seconds(fwd_bwd, repeats)}


def memory_bandwidth(repeats: int) -> float:
    """Bytes/s of c = a + b on fp32 tensors of MEMORY_ELEMS (read 2, write 1)."""
    a, b, c = torch.randn(MEMORY_ELEMS), torch.randn(MEMORY_ELEMS), torch.empty(MEMORY_ELEMS)
    return 3 * 4 * MEMORY_ELEMS / fastest_seconds(lambda: torch.add(a, b, out=c), repeats)


def _kernel_ops(counts: dict) -> int:
    return sum(sum(c.values()) for c in counts.values())


def dispatch_seconds(repeats: int, length: int = 100) -> float:
    """Host seconds per dispatched operation under autograd: a chain of `length` elementwise
    ops on an 8-element tensor, forward and backward (nothing to compute: what is left is the
    dispatcher, autograd's bookkeeping and the Python around them), over its op count."""
    x = torch.randn(8, requires_grad=True)

    def chain():
        y = x
        for _ in range(length):
            y = y * 1.0001 + 0.0001
        y.sum().backward()
        x.grad = None

    counter = OpCounter()
    with counter:
        chain()
    return fastest_seconds(chain, repeats) / _kernel_ops(counter.counts)


def step_ops(cfg: ModelConfig, micro_batch: int) -> dict[str, int]:
    """Dispatched operations of one training step of `cfg` (forward, backward, AdamW), as
    `train.opcount` counts them, after a warm-up step."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    try:
        opt = torch.optim.AdamW(model.parameters(), fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
    idx = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len))

    def loss_fn():
        return model(idx, idx)[1] / idx.numel()

    loss_fn().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    counts = count_step(loss_fn, opt, {"device_type": "cpu", "enabled": False})
    return {phase: sum(c.values()) for phase, c in counts.items()}


MATMUL_OPS = ("mm", "addmm", "bmm", "matmul", "linear", "attention", "_efficient", "flash")


def elementwise_seconds(cfg: ModelConfig, micro_batch: int) -> dict:
    """CPU seconds of one block's forward and backward spent outside matmuls and the
    attention kernel (torch.profiler's self time per aten op), per token."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = Transformer(cfg)
    block = model.blocks[0]
    x = torch.randn(micro_batch, cfg.seq_len, cfg.d_model, requires_grad=True)
    cos, sin = model.rope_cos[:cfg.seq_len], model.rope_sin[:cfg.seq_len]
    block(x, cos, sin).sum().backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x, cos, sin).sum().backward()
    other = total = 0.0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        total += e.self_cpu_time_total
        if not any(k in e.key for k in MATMUL_OPS):
            other += e.self_cpu_time_total
    tokens = micro_batch * cfg.seq_len
    return {"s_per_token_layer": other * 1e-6 / tokens, "aten_s": total * 1e-6,
            "other_s": other * 1e-6}


def one_process(spec: dict) -> dict:
    torch.set_num_threads(1)
    r = spec["repeats"]
    cfg = ModelConfig(**spec["model"])
    return {"matmul_peak_flops": measure_matmul_flops(torch.float32),
            "memory_bytes_per_s": memory_bandwidth(r),
            "gemms": [gemm_seconds(*shape, r) for shape in spec["gemms"]],
            "attention": attention_seconds(*spec["attention"], r),
            "dispatch_s_per_op": dispatch_seconds(r),
            "elementwise": elementwise_seconds(cfg, spec["micro_batch"]),
            "ops_per_step": step_ops(cfg, spec["micro_batch"])}


# --- two processes -----------------------------------------------------------------------

def collective_seconds(op: str, nbytes: int, repeats: int) -> float:
    """Seconds of one collective on a message of `nbytes` (the all-reduced tensor, the
    gathered output, the scattered input, or the sent message)."""
    n = max(WORLD, nbytes // 4 // WORLD * WORLD)
    full, part = torch.ones(n), torch.ones(n // WORLD)
    if op == "all_reduce":
        fn = lambda: dist.all_reduce(full)  # noqa: E731
    elif op == "all_gather":
        fn = lambda: dist.all_gather_into_tensor(full, part)  # noqa: E731
    elif op == "reduce_scatter":
        fn = lambda: dist.reduce_scatter_tensor(part, full)  # noqa: E731
    elif op == TRAINER_REDUCE_SCATTER:
        fn = lambda: reduce_scatter(part, full)  # noqa: E731
    elif op == "send_recv":  # half a ping-pong: one message one way
        peer = 1 - dist.get_rank()

        def fn():
            if dist.get_rank() == 0:
                dist.send(full, peer)
                dist.recv(full, peer)
            else:
                dist.recv(full, peer)
                dist.send(full, peer)
        return median_seconds(fn, repeats) / 2
    else:
        raise ValueError(f"unknown collective {op!r}")
    return median_seconds(fn, repeats)


def overlap_share(repeats: int, nbytes: int = 16 * 2**20, matmuls: int = 3,
                  n: int = 512) -> dict:
    """How much of a collective hides behind compute here (perf's `dp_overlap`, measured): an
    all-reduce of `nbytes` alone (X), `matmuls` n^3 matmuls alone (C, shorter than X), and the
    all-reduce started asynchronously before the matmuls and waited for after them (B). The
    collective hid behind C + X - B seconds of the compute: dp_overlap = that / C, in [0, 1]
    (1: it proceeds at full speed beside compute, as on a GPU's copy engines; 0: it takes the
    same cores)."""
    buf = torch.ones(nbytes // 4)
    a, b = torch.randn(n, n), torch.randn(n, n)

    def compute():
        for _ in range(matmuls):
            torch.mm(a, b)

    def both():
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    x = median_seconds(lambda: dist.all_reduce(buf), repeats)
    c = median_seconds(compute, repeats)
    t = median_seconds(both, repeats)
    return {"comm_s": x, "compute_s": c, "both_s": t,
            "share": min(1.0, max(0.0, (c + x - t) / c))}


def arrival_seconds(repeats: int, nbytes: int = 2**20, n: int = 256, matmuls: int = 10) -> dict:
    """Collectives as a training step issues them under sequence parallelism: an all-gather of
    an `nbytes` message, then the trainer's reduce-scatter of it (`train.parallel.comm`), and
    so on, each entered straight from `matmuls` n^3 matmuls (the same on both ranks), with no
    barrier anywhere: each rank arrives when its compute and its exit from the previous
    collective let it, so a collective waits for the later rank and wakes the sleeping
    transport. Against the same collectives entered together (a barrier before each): the
    difference, per collective (the mean over the two of their medians), is the latency a
    collective pays in a step beyond its isolated time (`skew_s`). A barrier before the
    compute would realign the ranks every time and hide the lag a chain of collectives
    carries from one to the next."""
    n_elems = max(WORLD, nbytes // 4 // WORLD * WORLD)
    full, part = torch.ones(n_elems), torch.ones(n_elems // WORLD)
    a, b = torch.randn(n, n), torch.randn(n, n)
    pair = {"all_gather": lambda: dist.all_gather_into_tensor(full, part),
            "reduce_scatter": lambda: reduce_scatter(part, full)}
    chained: dict[str, list[float]] = {op: [] for op in pair}
    dist.barrier()
    for i in range(repeats + 1):
        for op, fn in pair.items():
            for _ in range(matmuls):
                torch.mm(a, b)
            start = time.perf_counter()
            fn()
            if i:
                chained[op].append(time.perf_counter() - start)
    step = statistics.mean(statistics.median(t) for t in chained.values())
    alone = statistics.mean(median_seconds(fn, repeats) for fn in pair.values())
    return {"in_step_s": step, "isolated_s": alone, "skew_s": max(0.0, step - alone),
            "bytes": nbytes}


def dp_allreduce_seconds(model: nn.Module, repeats: int) -> float:
    """All-reduce of every gradient, flattened into DDP-sized buckets, one after another."""
    numel = sum(p.numel() for p in model.parameters())
    per_bucket = BUCKET_BYTES // 4
    buckets = [torch.ones(min(per_bucket, numel - i)) for i in range(0, numel, per_bucket)]

    def step():
        for b in buckets:
            dist.all_reduce(b)
    return median_seconds(step, repeats)


def fsdp_seconds(model: Transformer, repeats: int) -> dict:
    """FSDP2's collectives of one step, as train/fsdp.py shards: per block an all-gather for
    the forward, one for the backward, a reduce-scatter of the gradients; the root (embedding,
    final norm, head) one all-gather and one reduce-scatter."""
    units = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    root = sum(p.numel() for p in model.parameters()) - sum(units)
    sizes = [(n + WORLD - 1) // WORLD * WORLD for n in [*units, root]]
    full = [torch.ones(n) for n in sizes]
    part = [torch.ones(n // WORLD) for n in sizes]
    gathers = list(range(len(sizes))) + list(range(len(units)))  # forward, then blocks again

    def all_gather():
        for i in gathers:
            dist.all_gather_into_tensor(full[i], part[i])

    def reduce_scatter():
        for i in range(len(sizes)):
            dist.reduce_scatter_tensor(part[i], full[i])
    return {"all_gather_s": median_seconds(all_gather, repeats),
            "reduce_scatter_s": median_seconds(reduce_scatter, repeats),
            "all_gathers": len(gathers), "reduce_scatters": len(sizes)}


def cp_exchange_seconds(cfg: ModelConfig, tokens: int, repeats: int) -> dict:
    """Per layer: all-gather of this rank's keys and values of its tokens / WORLD (forward),
    all-gather of them again and reduce-scatter of their gradients (backward)."""
    width = 2 * cfg.n_kv_head * cfg.head_dim
    chunk = tokens // WORLD * width
    part, full = torch.ones(chunk), torch.ones(chunk * WORLD)

    def exchange():
        for _ in range(cfg.n_layer):
            dist.all_gather_into_tensor(full, part)
            dist.all_gather_into_tensor(full, part)
            reduce_scatter(part, full)
    return {"seconds": median_seconds(exchange, repeats),
            "chunk_bytes": chunk * 4, "collectives": 3 * cfg.n_layer}


def pipeline_stages(schedule: str, n_layer: int) -> dict:
    """The stages `train.parallel.pipeline.split` builds for `schedule` on WORLD ranks: each
    stage's blocks [start, stop) and each rank's stages (calibrate predicts the bubble of
    these stages: the first holds the embedding, the last the LM head and loss)."""
    stages = WORLD * stages_per_rank(schedule)
    return {"stage_blocks": [[r.start, r.stop] for r in block_ranges(n_layer, stages)],
            "rank_stages": [rank_stages(schedule, WORLD, r) for r in range(WORLD)]}


def ranks(rank: int, spec: dict, out: str) -> None:
    r = spec["repeats"]
    cfg = ModelConfig(**spec["model"])
    tokens = spec["micro_batch"] * cfg.seq_len
    torch.manual_seed(0)
    model = Transformer(cfg)
    result = {
        "collectives": {op: {str(b): collective_seconds(op, b, r) for b in spec["sizes_bytes"]}
                        for op in ("all_reduce", "all_gather", "reduce_scatter",
                                   TRAINER_REDUCE_SCATTER, "send_recv")},
        "dp_allreduce_s": dp_allreduce_seconds(model, r),
        "fsdp": fsdp_seconds(model, r),
        "cp": cp_exchange_seconds(cfg, tokens, r),
        "overlap": overlap_share(r),
        "arrival": arrival_seconds(max(21, 3 * r), nbytes=tokens * cfg.d_model * 4),
    }
    pp = spec["pp"]
    args = argparse.Namespace(
        schedules=pp["schedules"], microbatches=pp["microbatches"], mb=pp["mb"],
        steps=spec["steps"], warmup=spec["warmup"], n_layer=cfg.n_layer,
        d_model=cfg.d_model, seq=cfg.seq_len, vocab=cfg.vocab_size)
    result["pp"] = {"model": vars(bench_pp.model_config(args)),
                    "rows": [{"schedule": s, "microbatches": m,
                              "bubble": [e[0] for e in every], "step_s": [e[1] for e in every],
                              "compute": [e[3] for e in every], **pipeline_stages(s, cfg.n_layer)}
                             for s, m, every in bench_pp.measure_rows(args)]}
    every = [None] * WORLD
    dist.all_gather_object(every, result)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": every}))


def _mean_of_ranks(every: list) -> dict:
    """Timings averaged over the ranks (numbers), the first rank's otherwise."""
    def merge(values):
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], float):
            return statistics.mean(values)
        return values[0]
    return merge(every)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="JSON written by `python -m estimate calibrate --parallel`")
    ap.add_argument("out", help="where to write the measurements (JSON)")
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    cfg = ModelConfig(**spec["model"])
    if cfg.n_head % WORLD or cfg.n_kv_head % WORLD or cfg.n_layer % (2 * WORLD):
        print(f"error: model n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head} must divide by "
              f"{WORLD} and n_layer={cfg.n_layer} by {2 * WORLD}", file=sys.stderr)
        return 2
    single = one_process(spec)
    tmp = Path(args.out).with_suffix(".ranks.json")
    spawn(ranks, WORLD, spec, str(tmp))
    every = json.loads(tmp.read_text())["ranks"]
    tmp.unlink()
    pp = every[0].pop("pp")
    for other in every[1:]:
        other.pop("pp")
    result = {"format": 1, "world": WORLD, "threads_per_process": 1, **single,
              **_mean_of_ranks(every), "pp": pp, "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
