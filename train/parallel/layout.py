"""The trainer's tensor x context x data parallel layout: which ranks share what, and the
hooks the loop calls (`Parallel`). Ranks are laid out as a [dp, cp, tp] grid, tp fastest, so a
tp group is neighbouring ranks (one host's fast links first, as Megatron-LM places them).

- a tp group holds one copy of the model, sharded (train/parallel/tensor.py);
- a cp group holds the same weights and splits each sequence (train/parallel/context.py);
- the ranks of one tp index across dp x cp sum their gradients: DDP over that group, or, with
  `fsdp=true` / `parallel.dp_shard` > 1, FSDP2 over it (`train.fsdp.shard` on the "dp_shard_cp"
  dimension of a 2-D DeviceMesh [dp x cp, tp]), which shards each tp rank's (plain-tensor)
  shards again over that group and reduce-scatters gradients inside it; every rank of one dp
  index reads the same batches.

The mesh is torch's `init_device_mesh`: accelerate's `ParallelismConfig` builds the same kind
of mesh but applies tp only to transformers models with a `tp_plan` (DTensor parameters).

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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from contracts.checkpoint import read_trainer
from model.transformer import Transformer, compute_dtype
from train import fsdp
from train.checkpoint import describe_layout, load
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
    shard: bool = False  # FSDP2 over the dp x cp ranks of each tp index, instead of DDP

    @classmethod
    def plan(cls, parallel, rank: int, world: int, fsdp: bool = False) -> Layout:
        """The layout a config's `parallel:` section (and its `fsdp` switch) asks for on `world`
        processes (the rest is checked with the config: train.config.check_tp_cp)."""
        tp, cp = parallel.tp, parallel.cp
        if world % (tp * cp):
            raise ValueError(f"parallel.tp={tp} x parallel.cp={cp} must divide the {world} processes")
        dp = world // (tp * cp)
        left = f"{world} processes at tp={tp} x cp={cp} leave {dp} data-parallel ranks"
        if not fsdp and parallel.dp_replicate not in (0, dp):
            raise ValueError(f"parallel.dp_replicate={parallel.dp_replicate}: {left} (or 0 = that)")
        if fsdp and parallel.dp_replicate > 1:
            raise ValueError(f"parallel.dp_replicate={parallel.dp_replicate} with fsdp=true: hybrid "
                             "sharding (HSDP) is not run here; use dp_replicate=0 (all of dp sharded)")
        if fsdp and dp * cp == 1 and tp > 1:  # (one process alone: train.techniques refuses)
            raise ValueError(f"fsdp=true: {left} and cp={cp}: nothing to shard over; launch more "
                             "processes or use fsdp=false")
        if fsdp and parallel.dp_shard not in (0, dp):
            raise ValueError(f"parallel.dp_shard={parallel.dp_shard}: {left} (or 0 = that)")
        return cls(tp, cp, dp, rank, parallel.sequence_parallel, fsdp)

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

    def __init__(self, layout: Layout, device_type: str = "cpu"):
        self.layout = layout
        self.active = layout.tp > 1 or layout.cp > 1
        self.tp = self.cp = None
        self.grad_group = self.mesh = None
        if not self.active:
            return
        g, r = layout.grid(), layout.rank
        self.tp = TensorParallel(Comm(_groups(g.reshape(-1, layout.tp).tolist(), r)),
                                 layout.sequence_parallel)
        self.cp = ContextParallel(Comm(_groups(g.transpose(1, 2).reshape(-1, layout.cp).tolist(), r)))
        if layout.shard:  # rows: the ranks of one tp index across dp x cp (the grid's order)
            self.mesh = init_device_mesh(device_type, (layout.dp * layout.cp, layout.tp),
                                         mesh_dim_names=("dp_shard_cp", "tp"))["dp_shard_cp"]
            self.tp.shard_group = self.mesh.get_group()
            return
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

    def wrap(self, model: torch.nn.Module, mixed_precision: str = "no") -> torch.nn.Module:
        """DDP over the ranks that sum gradients (same tp index, across dp x cp), if several;
        or FSDP2 over them (in place) when the layout shards."""
        if self.mesh is not None:
            fsdp.shard(model, mixed_precision, mesh=self.mesh)
            self.tp.track(model)  # FSDP replaced the parameters
            return model
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
        """What a checkpoint saves: full tensors under tp or tp/cp x FSDP (a collective: the
        one-process format, safetensors, which any layout loads), else as given."""
        if not self.active or (self.layout.tp == 1 and self.mesh is None):
            return model, optimizer
        if self.mesh is not None:
            return self.tp.full_state(model, optimizer, *fsdp.full_state(model, optimizer))
        return self.tp.full_state(model, optimizer)

    def full_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain, unsharded copy on every rank (checksums, export, samples); `model` itself
        when nothing splits or shards it."""
        if not self.active:
            return fsdp.full_copy(model)
        weights = None
        if self.mesh is not None:
            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return self.tp.full_model(model, weights)

    def load(self, path: Path, model: torch.nn.Module, optimizer, fingerprint: dict,
             rank: int | None = None):
        """`train.checkpoint.load` for this layout: rank states by data-parallel rank (`rank`,
        default this layout's), full tensors sharded for this rank (whatever tp wrote them).
        A pipeline checkpoint (stages in DCP) is refused under tp/cp, in one line."""
        rank = self.layout.dp_rank if rank is None else rank
        if not self.active or (self.layout.tp == 1 and self.mesh is None):
            return load(path, model, optimizer, rank, fingerprint)
        saved = read_trainer(path)["fingerprint"]
        if "pipeline" in saved:
            raise ValueError(f"cannot resume from {path}: it was written under "
                             f"{describe_layout(saved)}, this run is tp={self.layout.tp} x "
                             f"cp={self.layout.cp}: pipeline stages are not resharded into "
                             "tensor/context parallel; resume under pp or in one process")
        full, state = Transformer(model.cfg).to(model.tok_emb.weight.device), StateOnly()
        saved = load(path, full, state, rank, fingerprint)
        weights, optim = self.tp.local_state(model, optimizer, full, state.state)
        if self.mesh is not None:
            fsdp.load_full(model, optimizer, weights, optim)
        else:
            model.load_state_dict(weights)
            optimizer.load_state_dict(optim)
        return saved
