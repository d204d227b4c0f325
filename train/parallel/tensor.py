"""Tensor parallelism in the trainer: Megatron-LM's column/row sharding (Shoeybi et al. 2019)
with sequence parallelism (Korthikanti et al. 2022) and a vocabulary-parallel embedding and
cross-entropy, applied to a `model.transformer.Transformer` from outside.

- Attention and MLP: q/k/v and gate/up are column-parallel (this rank's heads and hidden
  columns, cut block by block from the fused weights: `train.tensor_parallel`), `wo` and
  `w_down` row-parallel. The module's own forward runs on its share (n_head and n_kv_head are
  divided by tp), between two collectives installed as forward hooks: without sequence
  parallelism f (identity; all-reduce backward) before and g (all-reduce) after; with it the
  residual stream, the norms and the dropout-free residual adds hold 1/tp of the sequence, an
  all-gather of the sequence enters each sub-layer and a reduce-scatter leaves it (the same
  bytes as one all-reduce, Korthikanti et al. sec. 4.2.2), and the norm weights' gradients,
  partial sums over this rank's tokens, are all-reduced.
- The embedding and the LM head are split by vocabulary rows (tied, they stay one matrix): a
  rank looks up the ids it holds, zeros elsewhere, and the partial embeddings are summed. The
  loss is computed on vocabulary-sharded logits (Megatron's vocab-parallel cross-entropy):
  the max and the sum of exponentials are all-reduced, and the target's logit comes from the
  rank that holds it, so no rank ever holds a full row of logits.

The parameters keep their names; a checkpoint holds full tensors (`full_state`,
`shard_state`), so a tp=2 run resumes at tp=1 and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.transformer import Transformer
from train.parallel.comm import Comm
from train.tensor_parallel import shard_blocks


def shard_specs(model: Transformer) -> dict[str, tuple[list[int], int]]:
    """Sharded parameter name -> (its blocks' sizes along the sharded dimension, that dim)."""
    cfg = model.cfg
    d, hidden = cfg.head_dim, cfg.ffn_hidden
    specs = {"tok_emb.weight": ([cfg.vocab_size], 0), "lm_head.weight": ([cfg.vocab_size], 0)}
    for i in range(cfg.n_layer):
        specs[f"blocks.{i}.attn.wqkv.weight"] = ([cfg.n_head * d, cfg.n_kv_head * d,
                                                  cfg.n_kv_head * d], 0)
        specs[f"blocks.{i}.attn.wo.weight"] = ([cfg.n_head * d], 1)
        specs[f"blocks.{i}.mlp.w_gate_up.weight"] = ([hidden, hidden], 0)
        specs[f"blocks.{i}.mlp.w_down.weight"] = ([hidden], 1)
    return specs


def shard(t: torch.Tensor, spec: tuple[list[int], int], rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s share of full tensor `t`: 1/world of each block along the spec's dim."""
    blocks, dim = spec
    if dim == 1:
        return shard_blocks(t.t(), blocks, rank, world).t().contiguous()
    return shard_blocks(t, blocks, rank, world)


def unshard(shards: list[torch.Tensor], spec: tuple[list[int], int]) -> torch.Tensor:
    """The full tensor from every rank's share (the inverse of `shard`)."""
    blocks, dim = spec
    pieces = [s.split([b // len(shards) for b in blocks], dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in pieces], dim) for i in range(len(blocks))], dim)


def check_shardable(model: Transformer, tp: int) -> None:
    """One line naming what keeps `model` from tp-way sharding."""
    cfg = model.cfg
    if cfg.is_mla or cfg.n_experts:
        raise ValueError("parallel.tp/cp > 1 split standard attention and dense SwiGLU MLPs: "
                         "multi-head latent attention (kv_lora_rank) and MoE are not supported")
    for key in ("n_kv_head", "ffn_hidden", "vocab_size"):
        if getattr(cfg, key) % tp:
            raise ValueError(f"parallel.tp={tp} needs model.{key} ({getattr(cfg, key)}) "
                             "divisible by it")


class TensorParallel:
    """A Transformer sharded over one tp group: its forward pieces and its state's gathering."""

    def __init__(self, comm: Comm, sequence_parallel: bool):
        self.comm, self.sp = comm, sequence_parallel
        self.specs: dict[str, tuple[list[int], int]] = {}
        self.sharded_ids: set[int] = set()
        self.shard_group: dist.ProcessGroup | None = None  # FSDP's data-parallel group, if any

    def apply(self, model: Transformer) -> None:
        """Replace the model's weights by this rank's shares and install the collectives."""
        check_shardable(model, self.comm.size)
        self.specs = shard_specs(model)
        tp, rank = self.comm.size, self.comm.rank
        for name, p in list(model.named_parameters()):
            if name in self.specs:
                owner, attr = _owner(model, name)
                setattr(owner, attr, torch.nn.Parameter(shard(p.data, self.specs[name], rank, tp)))
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        self.track(model)
        for block in model.blocks:
            block.attn.n_head //= tp
            block.attn.n_kv_head //= tp
            for sub in (block.attn, block.mlp):
                sub.register_forward_pre_hook(lambda m, args: (self.enter(args[0]), *args[1:]))
                sub.register_forward_hook(lambda m, args, out: self.leave(out))

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Into a column-parallel region: the whole (local) sequence on every tp rank."""
        return self.comm.gather(x, 1) if self.sp else self.comm.copy_in(x)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Out of a row-parallel region: the partial sums added (and, under sp, scattered)."""
        return self.comm.scatter_reduce(x, 1) if self.sp else self.comm.reduce_out(x)

    def embed(self, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The vocabulary-parallel lookup of ids [B, T]: [B, T(/tp under sp), d]."""
        rows = weight.size(0)
        local = idx - self.comm.rank * rows
        outside = (local < 0) | (local >= rows)
        x = F.embedding(local.clamp(0, rows - 1), weight).masked_fill(outside[..., None], 0.0)
        return self.leave(x)

    def loss_sum(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
        """Cross-entropy summed over targets != -100, from hidden states x [B, T(/tp), d]
        (after the final norm) and this rank's vocabulary rows of the LM head: the logits
        [tokens, V/tp] never leave the rank; three small all-reduces per token make the loss."""
        x = (self.comm.gather(x, 1) if self.sp else self.comm.copy_in(x)).flatten(0, 1)
        logits = (x.to(dtype) @ weight.to(dtype).t()).float()
        t = targets.reshape(-1)
        biggest = self.comm.all_reduce_(logits.detach().amax(-1), dist.ReduceOp.MAX)
        z = logits - biggest[:, None]  # a constant per row: the loss does not change
        sum_exp = self.comm.reduce_out(z.exp().sum(-1))
        rows = weight.size(0)
        local = t - self.comm.rank * rows
        mine = (local >= 0) & (local < rows)
        target_z = z.gather(1, local.clamp(0, rows - 1)[:, None]).squeeze(1) * mine
        target_z = self.comm.reduce_out(target_z)
        kept = t != -100
        return (sum_exp.log() - target_z)[kept].sum()

    def track(self, model: torch.nn.Module) -> None:
        """Note which of `model`'s parameters are tp shards (again after FSDP replaced them)."""
        self.sharded_ids = {id(p) for n, p in model.named_parameters() if n in self.specs}

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Finish the gradients and clip them: under sequence parallelism the norm weights'
        gradients are partial sums over this rank's tokens and are summed over tp here (after
        DDP's or FSDP's data-parallel reduction: both are linear). The global norm sums the
        shards' squares over tp and counts the replicated weights once; under FSDP each rank
        holds a slice of each gradient (a DTensor), and the slices' squares are summed over
        the data-parallel group (`shard_group`) first."""
        params = [p for p in parameters if p.grad is not None]
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        pairs = list(zip(params, grads, strict=True))
        shards = [g for p, g in pairs if id(p) in self.sharded_ids]
        replicated = [g for p, g in pairs if id(p) not in self.sharded_ids]
        if self.sp:
            for g in replicated:
                self.comm.all_reduce_(g)
        zero = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        squares = torch.stack([sum((g.double().pow(2).sum() for g in group), zero)
                               for group in (shards, replicated)])
        if self.shard_group is not None:
            dist.all_reduce(squares, group=self.shard_group)
        norm = (self.comm.all_reduce_(squares[0].clone()) + squares[1]).sqrt().float()
        # torch.nn.utils.clip_grads_with_norm_'s scaling, on the local tensors (plain or slices)
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    # Checkpoints: full tensors in, full tensors out.
    def full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The full tensor of parameter `name` (or of its optimizer state) from every tp rank."""
        if name not in self.specs or self.comm.size == 1:
            return t
        shards = [torch.empty_like(t) for _ in range(self.comm.size)]
        dist.all_gather(shards, t.contiguous(), group=self.comm.group)
        return unshard(shards, self.specs[name])

    def mine(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's share of the full tensor of parameter `name` (or its optimizer state)."""
        return shard(t, self.specs[name], self.comm.rank, self.comm.size) if name in self.specs else t

    def full_model(self, model: Transformer, weights: dict | None = None) -> Transformer:
        """An unsharded copy of the model on every tp rank (a collective), from this rank's
        `weights` (by default the model's own state dict)."""
        weights = model.state_dict() if weights is None else weights
        full = Transformer(model.cfg).to(next(iter(weights.values())).device)
        full.load_state_dict({n: self.full(n, t) for n, t in weights.items()})
        return full

    def full_state(self, model: Transformer, optimizer, weights: dict | None = None,
                   optim: dict | None = None) -> tuple[Transformer, StateOnly]:
        """An unsharded copy of the model and of the optimizer state (a collective), from this
        rank's `weights` and index-keyed `optim` state (by default the model's and optimizer's)."""
        full = self.full_model(model, weights)
        names = optimizer_names(model, optimizer)
        state = optimizer.state_dict() if optim is None else optim
        state["state"] = {i: {k: self.full(names[i], v) if torch.is_tensor(v) and v.dim() else v
                              for k, v in s.items()} for i, s in sorted(state["state"].items())}
        return full, StateOnly(state)

    def local_state(self, model: Transformer, optimizer, full: Transformer,
                    state: dict) -> tuple[dict, dict]:
        """This rank's shares of a full model's weights and of a full optimizer state."""
        names = optimizer_names(model, optimizer)
        state["state"] = {i: {k: self.mine(names[i], v) if torch.is_tensor(v) and v.dim() else v
                              for k, v in s.items()} for i, s in state["state"].items()}
        return {n: self.mine(n, t) for n, t in full.state_dict().items()}, state


class StateOnly:
    """Holds an optimizer state dict where a checkpoint save or load expects an optimizer."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def optimizer_names(model: torch.nn.Module, optimizer) -> list[str]:
    """Parameter name of each index of the optimizer's state dict (its groups' order)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in inner.param_groups for p in g["params"]]


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, attr = name.rsplit(".", 1)
    return model.get_submodule(path), attr
