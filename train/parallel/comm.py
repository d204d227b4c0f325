"""Autograd-aware collectives of one process group, each timed: the four conjugate pairs that
Megatron-LM's tensor parallelism (Shoeybi et al. 2019, sec. 3: the operators f and g) and
sequence parallelism (Korthikanti et al. 2022, sec. 4.2: g and its conjugate) are built from,
and the all-gather of context parallelism's keys and values.

| function | forward | backward |
|---|---|---|
| `copy_in` (f) | identity | all-reduce |
| `reduce_out` (g) | all-reduce | identity |
| `gather` (along a dim) | all-gather | reduce-scatter |
| `scatter_reduce` (along a dim) | reduce-scatter | all-gather |

A reduce-scatter goes through `reduce_scatter`: on gloo an all-to-all of the chunks and a
local sum, since gloo's own `reduce_scatter_tensor` moves an all-reduce's bytes (measured on
the loopback: 2.10 MB per 1 MB reduce-scatter between 2 ranks, 1.05 MB for the all-to-all, as
for an all-gather), twice the (g-1)/g of the message a ring reduce-scatter sends (Patarasuk &
Yuan 2009); other backends run their own.

`Comm.seconds` adds up the wall time spent inside the collectives (`Comm.calls` counts them).
On a CPU (gloo) every collective blocks until its peers have sent their part, so that is the
step's exposed communication; on a GPU the clock synchronises the device around each
collective first, so it reads the same (TP's collectives sit on the critical path: nothing
overlaps them here).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Comm:
    """The collectives of `group` (this rank's `rank` of `size`), and the time spent in them."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.seconds = 0.0
        self.calls = 0

    def _timed(self, fn, *args) -> None:
        cuda = args[0].is_cuda if isinstance(args[0], torch.Tensor) else False
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args, group=self.group)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def take_seconds(self) -> float:
        """The seconds spent in collectives since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def take_calls(self) -> int:
        """The collectives issued since the last call."""
        calls, self.calls = self.calls, 0
        return calls

    # Plain (no autograd) collectives, along dim 0 of contiguous tensors.
    def all_reduce_(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            self._timed(dist.all_reduce, x, op)
        return x

    def all_gather_raw(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((self.size * moved.size(0), *moved.shape[1:]))
        self._timed(dist.all_gather_into_tensor, out, moved)
        return out.movedim(0, dim)

    def reduce_scatter_raw(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        if x.size(dim) % self.size:
            raise ValueError(f"dimension {dim} of size {x.size(dim)} does not split into "
                             f"{self.size} equal shards")
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((moved.size(0) // self.size, *moved.shape[1:]))
        self._timed(reduce_scatter, out, moved)
        return out.movedim(0, dim)

    # Autograd-aware pairs.
    def copy_in(self, x: torch.Tensor) -> torch.Tensor:
        return self._pair(x, lambda t: t.view_as(t), lambda g: self.all_reduce_(g.contiguous().clone()))

    def reduce_out(self, x: torch.Tensor) -> torch.Tensor:
        return self._pair(x, lambda t: self.all_reduce_(t.contiguous().clone()), lambda g: g)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self._pair(x, lambda t: self.all_gather_raw(t, dim),
                          lambda g: self.reduce_scatter_raw(g, dim))

    def scatter_reduce(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self._pair(x, lambda t: self.reduce_scatter_raw(t, dim),
                          lambda g: self.all_gather_raw(g, dim))

    def _pair(self, x: torch.Tensor, forward, backward) -> torch.Tensor:
        return _Conjugate.apply(x, forward, backward) if self.size > 1 else x


def reduce_scatter(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup | None = None,
                   ) -> None:
    """out = this rank's 1/g of the sum over the group's g ranks of x (dim 0, contiguous), as
    `dist.reduce_scatter_tensor`; on gloo an all-to-all (rank r receives every rank's chunk r:
    (g-1)/g of x sent per rank) and the sum of the g chunks here, in rank order."""
    if dist.get_backend(group) != "gloo":
        dist.reduce_scatter_tensor(out, x, group=group)
        return
    chunks = torch.empty_like(x)
    dist.all_to_all_single(chunks, x, group=group)
    torch.sum(chunks.view(-1, *out.shape), 0, out=out)


class _Conjugate(torch.autograd.Function):
    """y = forward(x) with dL/dx = backward(dL/dy): a collective and its conjugate."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward_fn = backward
        return forward(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.backward_fn(g), None, None
