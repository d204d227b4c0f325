"""The bubble a schedule's order of work leaves, computed without running it: each rank runs
its actions in torch's order, each action as soon as its inputs exist, with given compute
times and free transfers.

With equal stages this reproduces the formulas of `pipeline.bubble_formula` from torch's own
orders (the check that the schedule torch runs is the one the formula describes); with the
last stage slower (the LM head and loss) it shows how much of a measured bubble is stage
imbalance: every other rank also waits for the slowest one, which the formula assumes away.
`estimate.perf.bubble_fraction` charges that imbalance in closed form; tests/train/
test_pipeline.py checks it against `simulate` on these orders.

    python -m train.parallel.schedule_sim [--pp 2] [--microbatches 4 8] [--head 0 0.3]
"""

from __future__ import annotations

import argparse
import types

from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

from train.parallel.pipeline import bubble_formula

Action = tuple[str, int, int]  # ("F" | "B", micro-batch, stage)


def one_f_one_b_order(pp: int, m: int) -> dict[int, list[Action]]:
    """1F1B (PipeDream-Flush): rank r runs pp-1-r warm-up forwards, then alternates one
    forward and one backward, then the remaining backwards (torch's Schedule1F1B order)."""
    orders = {}
    for r in range(pp):
        warm = min(m, pp - 1 - r)
        ops: list[Action] = [("F", i, r) for i in range(warm)]
        for i in range(warm, m):
            ops += [("F", i, r), ("B", i - warm, r)]
        ops += [("B", i, r) for i in range(m - warm, m)]
        orders[r] = ops
    return orders


def interleaved_order(pp: int, v: int, m: int) -> dict[int, list[Action]]:
    """torch's ScheduleInterleaved1F1B order, from its own per-rank calculation."""
    rounds = max(1, m // pp)
    fake = types.SimpleNamespace(pp_group_size=pp, n_local_stages=v, _n_microbatches=m,
                                 number_of_rounds=rounds, microbatches_per_round=m // rounds)
    orders = {}
    for r in range(pp):
        actions = ScheduleInterleaved1F1B._calculate_single_rank_operations(fake, r)
        orders[r] = [("F" if a.computation_type == _ComputationType.FORWARD else "B",
                      a.microbatch_index, a.stage_index) for a in actions if a is not None]
    return orders


def simulate(orders: dict[int, list[Action]], n_stages: int, cost) -> dict[int, float]:
    """Each rank's idle share of the step: ranks run their actions in order, each when its
    inputs are ready (a forward after the previous stage's, a backward after its forward and
    the next stage's backward); cost(kind, stage) is an action's compute time."""
    done: dict[Action, float] = {}
    clock, busy, pos = dict.fromkeys(orders, 0.0), dict.fromkeys(orders, 0.0), dict.fromkeys(orders, 0)
    moved = True
    while moved:
        moved = False
        for r, ops in orders.items():
            while pos[r] < len(ops):
                kind, mb, s = ops[pos[r]]
                needs = [("F", mb, s - 1)] if kind == "F" and s > 0 else []
                if kind == "B":
                    needs += [("F", mb, s)] + ([("B", mb, s + 1)] if s < n_stages - 1 else [])
                if any(n not in done for n in needs):
                    break
                start = max([clock[r]] + [done[n] for n in needs])
                clock[r] = done[(kind, mb, s)] = start + cost(kind, s)
                busy[r] += cost(kind, s)
                pos[r] += 1
                moved = True
    if any(pos[r] < len(ops) for r, ops in orders.items()):
        raise RuntimeError("the order deadlocks")
    step = max(clock.values())
    return {r: 1 - busy[r] / step for r in orders}


def simulated_bubble(schedule: str, pp: int, m: int, head: float = 0.0) -> dict[int, float]:
    """Idle share per rank of `schedule` ("1f1b" or "interleaved", v=2) with every chunk's
    backward twice its forward, and the last stage's forward `head` times one chunk's
    forward longer (the LM head and loss, whose gradients the forward computes)."""
    v = 1 if schedule == "1f1b" else 2
    orders = one_f_one_b_order(pp, m) if v == 1 else interleaved_order(pp, v, m)
    n = pp * v
    chunk = 2.0 / v  # the same model: a 1F1B stage is v interleaved chunks

    def cost(kind: str, stage: int) -> float:
        base = chunk if kind == "F" else 2 * chunk
        return base + (head if kind == "F" and stage == n - 1 else 0.0)

    return simulate(orders, n, cost)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--head", type=float, nargs="+", default=[0.0, 0.1, 0.3],
                    help="the last stage's extra forward, in units of one 2-block chunk's forward")
    args = ap.parse_args(argv)
    print(f"{'schedule':<12} {'M':>2} {'head':>5} " + " ".join(f"{'rank' + str(r):>6}" for r in range(args.pp))
          + f" {'mean':>6} {'formula':>7} {'ratio':>6}")
    for schedule in ("1f1b", "interleaved"):
        for m in args.microbatches:
            for head in args.head:
                idle = simulated_bubble(schedule, args.pp, m, head)
                mean = sum(idle.values()) / len(idle)
                formula = bubble_formula(schedule, args.pp, m)
                print(f"{schedule:<12} {m:>2} {head:>5.2f} " + " ".join(f"{i:>6.3f}" for i in idle.values())
                      + f" {mean:>6.3f} {formula:>7.3f} {mean / formula:>6.2f}")


if __name__ == "__main__":
    main()
