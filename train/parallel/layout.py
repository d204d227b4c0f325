"""The trainer's tensor x context x data parallel layout: which ranks share what, and the
hooks the loop calls (`Parallel`). Ranks are laid out as a [dp, cp, tp] grid, tp fastest, so a
tp group is neighbouring ranks (one host's fast links first, as Megatron-LM places them).

- a tp group holds one copy of the model, sharded (train/parallel/tensor.py);
- a cp group holds the same weights and splits each sequence (train/parallel/context.py);
- the ranks of one tp index across dp x cp sum their gradients (DDP over that group), and
  every rank of one dp index reads the same batches.

Each rank's forward returns cp x the loss sum of its tokens, which is what keeps the loop's
normalisation (it divides by world x local tokens and DDP averages over dp x cp) the sum over
the whole batch; tokens per step are counted once per dp rank (`replicas`).
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import torch
import torch.distributed as dist

from model.transformer import Transformer, compute_dtype
from train.checkpoint import load
from train.parallel.comm import Comm
from train.parallel.context import ContextParallel
from train.parallel.tensor import StateOnly, TensorParallel


@dataclasses.dataclass(frozen=True)
class Layout:
    """This rank's place in the [dp, cp, tp] grid of `world` ranks."""

    tp: int
    cp: int
    dp: int
    rank: int
    sequence_parallel: bool = True

    @classmethod
    def plan(cls, parallel, rank: int, world: int) -> Layout:
        """The layout a config's `parallel:` section asks for on `world` processes (the rest
        is checked with the config: train.config.check_tp_cp)."""
        tp, cp = parallel.tp, parallel.cp
        if world % (tp * cp):
            raise ValueError(f"parallel.tp={tp} x parallel.cp={cp} must divide the {world} processes")
        dp = world // (tp * cp)
        if parallel.dp_replicate not in (0, dp):
            raise ValueError(f"parallel.dp_replicate={parallel.dp_replicate}: {world} processes at "
                             f"tp={tp} x cp={cp} leave {dp} data-parallel replicas (or 0 = that)")
        return cls(tp, cp, dp, rank, parallel.sequence_parallel)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tp % self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.cp)

    @property
    def replicas(self) -> int:
        """Ranks that work on one batch together (each counts its tokens)."""
        return self.tp * self.cp

    def grid(self) -> torch.Tensor:
        return torch.arange(self.dp * self.cp * self.tp).view(self.dp, self.cp, self.tp)


def _groups(rank_lists: list[list[int]], rank: int) -> dist.ProcessGroup | None:
    """Create every group of `rank_lists` (all ranks must) and return this rank's."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


class Parallel:
    """The layout's process groups and what the loop asks of them; with tp = cp = 1 every
    hook passes through (no groups are made)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.active = layout.tp > 1 or layout.cp > 1
        self.tp = self.cp = None
        self.grad_group = None
        if not self.active:
            return
        g, r = layout.grid(), layout.rank
        self.tp = TensorParallel(Comm(_groups(g.reshape(-1, layout.tp).tolist(), r)),
                                 layout.sequence_parallel)
        self.cp = ContextParallel(Comm(_groups(g.transpose(1, 2).reshape(-1, layout.cp).tolist(), r)))
        dp_cp = g.permute(2, 0, 1).reshape(layout.tp, -1).tolist()
        self.grad_group = _groups(dp_cp, r) if len(dp_cp[0]) > 1 else None

    def apply(self, model: Transformer) -> Transformer:
        """Shard `model` for this rank and give it the parallel forward (in place)."""
        if not self.active:
            return model
        self.tp.apply(model)
        if self.layout.cp > 1:
            for block in model.blocks:
                self.cp.install(block.attn)
        model.forward = types.MethodType(self.forward, model)
        return model

    def forward(self, model: Transformer, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache=None, return_logits: bool = False):
        """Transformer.forward for training and evaluation, on this rank's share: cp x the
        loss sum of this rank's tokens (see the module docstring), no logits."""
        if targets is None or kv_cache is not None or return_logits:
            raise ValueError("a tensor/context-parallel model computes losses only; generate "
                             "from its full copy (Parallel.full_model)")
        T = idx.size(1)
        if T > model.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.seq_len={model.cfg.seq_len}")
        if self.layout.sequence_parallel and (T // self.layout.cp) % self.layout.tp:
            raise ValueError(f"sequence parallel splits {T // self.layout.cp} tokens per rank "
                             f"over tp={self.layout.tp}: seq_len must divide evenly")
        if self.layout.cp > 1:
            pos = self.cp.positions(T, idx.device)
            idx, targets = idx[:, pos], targets[:, pos]
        else:
            pos = slice(0, T)
        x = self.tp.embed(model.tok_emb.weight, idx)
        dtype = compute_dtype(x)
        cos, sin = model.rope_cos[pos].to(dtype), model.rope_sin[pos].to(dtype)
        for block in model.blocks:
            x = block(x, cos, sin)
        loss = self.tp.loss_sum(model.norm(x), model.lm_head.weight, targets, dtype)
        return None, loss * self.layout.cp

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over the ranks that sum gradients (same tp index, across dp x cp), if several."""
        if self.grad_group is None:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, process_group=self.grad_group)

    def clip_grad_norm_(self, default):
        """The gradient-norm clip the step uses: the tp-aware one, or `default`."""
        return self.tp.clip_grad_norm_ if self.active and self.layout.tp > 1 else default

    def comm_seconds(self) -> dict[str, float]:
        """Seconds spent in tp and cp collectives since the last call (and how many tp issued),
        for the step's record."""
        out = {}
        if self.active and self.layout.tp > 1:
            out["tp_comm_s"] = self.tp.comm.take_seconds()
            out["tp_collectives"] = self.tp.comm.take_calls()  # calibrate --parallel counts them
        if self.active and self.layout.cp > 1:
            out["cp_comm_s"] = self.cp.comm.take_seconds()
        return out

    def to_save(self, model: torch.nn.Module, optimizer):
        """What a checkpoint saves: full tensors under tp (a collective), else as given."""
        if not self.active or self.layout.tp == 1:
            return model, optimizer
        return self.tp.full_state(model, optimizer)

    def full_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain, unsharded copy on every rank (checksums, export, samples); `model` itself
        without tensor/context parallel."""
        if not self.active:
            return model
        return self.tp.full_model(model)

    def load(self, path: Path, model: torch.nn.Module, optimizer, fingerprint: dict):
        """`train.checkpoint.load` for this layout: rank states by data-parallel rank, full
        tensors sharded for this rank (whatever tp wrote them)."""
        rank = self.layout.dp_rank
        if not self.active or self.layout.tp == 1:
            return load(path, model, optimizer, rank, fingerprint)
        full, state = Transformer(model.cfg).to(model.tok_emb.weight.device), StateOnly()
        saved = load(path, full, state, rank, fingerprint)
        self.tp.shard_state(model, optimizer, full, state.state)
        return saved
