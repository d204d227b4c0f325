"""Pipeline bubble, measured against each schedule's formula.

    python -m train.parallel.bench_pp [--pp 2] [--steps 5] [--microbatches 4 8]

Starts `pp` gloo CPU processes (one torch thread each), splits a balanced model (untied
embeddings, a small vocabulary so the head adds little to the last stage, n_layer a multiple
of 2 * pp so every stage holds as many blocks) and times `steps` training steps per
schedule and micro-batch count M, at a fixed micro-batch of `--mb` sequences. Columns, each a
median over the timed steps (shares of the step, barrier to barrier):

- rankN: the rank's blocked share, the bubble as measured: time spent waiting in the
  schedule's point-to-point sends and receives, and at the closing barrier for the other
  stages (`StepClock.blocked`);
- imbal: the largest minus the smallest rank's compute share: stage imbalance, which the
  formula assumes away (every rank but the slowest also waits that much for it);
- idle: mean of 1 - compute share: blocked time plus the schedule's own bookkeeping;
- mean: the mean blocked share, compared with the formula: (p-1)/(m+p-1) for GPipe and 1F1B,
  (p-1)/(v*m+p-1) for interleaved 1F1B (Narayanan et al. 2021, sec. 2.2).

Zero-bubble (ZB-V) and DualPipeV have no closed form here; they are printed beside 1F1B at
the same M. On a shared machine other processes' load shows up as blocked time on the peer.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.transformer import Transformer
from train.parallel.pipeline import bubble_formula, split
from train.parallel.procs import spawn

ORDER = ["gpipe", "1f1b", "interleaved", "zero_bubble", "dualpipev"]


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.n_layer,
                       d_model=args.d_model, n_head=args.d_model // 64,
                       n_kv_head=args.d_model // 64, ffn_hidden=args.d_model * 8 // 3,
                       tie_embeddings=False)


def measure(rank: int, args: argparse.Namespace) -> None:
    """Runs in each process: every (schedule, M), warm-up steps then timed ones; rank 0
    prints the table."""
    rows = measure_rows(args)
    if rank == 0:
        print_table(rows, dist.get_world_size(), model_config(args))


def measure_rows(args: argparse.Namespace) -> list[tuple[str, int, list[tuple[float, ...]]]]:
    """Every (schedule, M) of `args`, measured on every rank of the world: (schedule, M,
    [(median blocked share, median step_s, median idle share, median compute share) per
    rank]), the same list on every rank (also what
    `calibrate --parallel` reads, through train.parallel.collectives_bench)."""
    cfg = model_config(args)
    rows = []
    for schedule in args.schedules:
        for m in args.microbatches:
            torch.manual_seed(0)
            pipe = split(Transformer(cfg), schedule, m)
            g = torch.Generator().manual_seed(0)
            idx = torch.randint(0, cfg.vocab_size, (m * args.mb, cfg.seq_len), generator=g)
            clocks = []
            for step in range(args.warmup + args.steps):
                _, clock = pipe.step(idx, idx)
                for p in pipe.module.parameters():
                    p.grad = None
                if step >= args.warmup:
                    clocks.append(clock)
            mine = (statistics.median(c.blocked for c in clocks),
                    statistics.median(c.step_s for c in clocks),
                    statistics.median(c.bubble for c in clocks),
                    statistics.median(c.busy_s / c.step_s for c in clocks))
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            rows.append((schedule, m, every))
    return rows


def print_table(rows: list, pp: int, cfg: ModelConfig) -> None:
    print(f"pp={pp} gloo CPU, 1 thread/rank; model n_layer={cfg.n_layer} d_model={cfg.d_model} "
          f"seq_len={cfg.seq_len} vocab={cfg.vocab_size}; medians over the timed steps")
    ranks = " ".join(f"{'rank' + str(r):>6}" for r in range(pp))
    print(f"{'schedule':<12} {'M':>2} {'step_s':>7} {ranks} {'imbal':>6} {'idle':>6} {'mean':>6} "
          f"{'formula':>7} {'meas/formula':>12}")
    one_f_one_b = {m: statistics.mean(b for b, *_ in every)
                   for s, m, every in rows if s == "1f1b"}
    for schedule, m, every in rows:
        bubbles = [b for b, *_ in every]
        mean = statistics.mean(bubbles)
        idle = statistics.mean(i for _, _, i, _ in every)
        imbalance = max(c for *_, c in every) - min(c for *_, c in every)
        formula = bubble_formula(schedule, pp, m)
        if formula is not None:
            verdict = f"{mean / formula:>12.2f}"
        elif m in one_f_one_b:
            verdict = f"{'< 1f1b' if mean < one_f_one_b[m] else '>= 1f1b':>12}"
        else:
            verdict = f"{'-':>12}"
        step_s = max(s for _, s, *_ in every)
        print(f"{schedule:<12} {m:>2} {step_s:>7.3f} "
              + " ".join(f"{b:>6.3f}" for b in bubbles)
              + f" {imbalance:>6.3f} {idle:>6.3f} {mean:>6.3f} "
              + f"{'-' if formula is None else f'{formula:.3f}':>7} {verdict}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--schedules", nargs="+", default=ORDER, choices=ORDER)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--mb", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--n_layer", type=int, default=8)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args(argv)
    if args.n_layer % (2 * args.pp):
        ap.error(f"--n_layer={args.n_layer} must be a multiple of 2 * pp = {2 * args.pp} "
                 "(balanced stages under every schedule)")
    spawn(measure, args.pp, args)


if __name__ == "__main__":
    main()
