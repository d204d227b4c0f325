"""Dispatched operations per training step, counted exactly (`python -m train.bench --count-ops`).

In eager mode every aten operation that reaches a kernel is one launch on a GPU (a few hundred
nanoseconds to microseconds of host time each, plus a read and write of its operands), so at
small and medium sizes a step is bound by how many it dispatches, not by its FLOPs. This counts
them on any device, without noise, with a `TorchDispatchMode`: it sits below autograd and
autocast, so it sees the backward's operations and autocast's casts as the kernels would.

Views and metadata-only operations launch no kernel and are not counted: every op whose schema
says it returns an alias of its input (`view`, `transpose`, `t`, `expand`, `slice`, `split`,
`detach`, ...), and `_unsafe_view` and the other shape-only ops in `METADATA`.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# shape or bookkeeping only: no kernel runs (their schemas do not mark them as views)
METADATA = frozenset({"_unsafe_view", "promote_types", "lift_fresh", "is_same_size", "_local_scalar_dense",
                      "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim",
                      "_has_compatible_shallow_copy_type", "_reshape_alias", "set_"})


def op_name(func) -> str:
    """`aten.mm.default` -> "mm" (the overload dropped: mm and mm.out are one kernel)."""
    return func._schema.name.split("::", 1)[-1]


def launches_kernel(func) -> bool:
    """False for views and metadata-only ops (see the module docstring)."""
    return not getattr(func, "is_view", False) and op_name(func) not in METADATA


class OpCounter(TorchDispatchMode):
    """Counts dispatched operations by name into `counts[phase]`; set `phase` between parts."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.counts: dict[str, Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.counts.setdefault(self.phase, Counter())[op_name(func)] += 1
        return func(*args, **(kwargs or {}))


def count_step(loss_fn, optimizer: torch.optim.Optimizer, autocast: dict) -> dict[str, Counter]:
    """The operations of one training step: forward (the loss), backward, optimizer (step and
    zero_grad). Run it after a warm-up step, so that lazy optimizer state is not counted."""
    counter = OpCounter()
    with counter:
        with torch.autocast(**autocast):
            loss = loss_fn()
        counter.phase = "backward"
        loss.backward()
        counter.phase = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {p: counter.counts.get(p, Counter()) for p in ("forward", "backward", "optimizer")}


def summarize(counts: dict[str, Counter], top: int = 8) -> dict:
    """Totals per phase, forward + backward, and the most frequent ops of forward + backward."""
    fwd_bwd = counts["forward"] + counts["backward"]
    return {"forward": sum(counts["forward"].values()),
            "backward": sum(counts["backward"].values()),
            "fwd_bwd": sum(fwd_bwd.values()),
            "optimizer": sum(counts["optimizer"].values()),
            "top_fwd_bwd": fwd_bwd.most_common(top),
            "top_forward": counts["forward"].most_common(top)}
