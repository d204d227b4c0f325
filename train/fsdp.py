"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) and its checkpoints.

With `fsdp=true` every rank keeps only its 1/world slice of each parameter, gradient and
optimizer state (ZeRO-3, Rajbhandari et al. 2020; PyTorch FSDP, Zhao et al. 2023): a block's
full weights are all-gathered just before its forward (and again before its backward, since
they are freed after the forward: "reshard after forward"), and gradients are reduce-scattered
so that each rank receives the averaged gradient of its own slice.

On GPU, accelerate's FSDP plugin does the wrapping (`launch/accelerate/gpu_fsdp2.yaml`). On
CPU accelerate ignores the plugin and would wrap the model in DDP, so here we call
`fully_shard` ourselves over the gloo group: each `Block`, then the root (embedding, final norm
and LM head), the layout torchtitan uses.

Under tensor/context parallel (train/parallel/layout.py) the same `shard` runs over a
sub-mesh: the ranks that hold the same tp shard (dp x cp of them), given as a 1-D DeviceMesh,
so FSDP all-gathers and reduce-scatters inside that group only and each tp rank's shards are
sharded again over its data-parallel group. `full_state` and `load_full` move whole tensors
in and out of any sharded model: a tp x dp_shard run saves through them, and a plain FSDP run
resumes from an unsharded (safetensors) checkpoint with them.

Sharded checkpoints use torch.distributed.checkpoint (DCP): every rank writes its own slices,
in parallel, with a metadata file that lets a run with another world size load them. The
run's checkpoints (`train/checkpoint.py`) hold them in place of the safetensors weights.
DCP's `.metadata` is a pickle, so `load_sharded` first matches every file against the
checkpoint's manifest (`contracts.checkpoint.check_loadable`) and refuses a mismatch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from contracts.checkpoint import SHARDED_INDEX, check_loadable
from model.transformer import Transformer
from train.parallel.tensor import optimizer_names

log = logging.getLogger("train")


def shard(model: Transformer, mixed_precision: str = "no", reshard_after_forward: bool = True,
          mesh=None) -> None:
    """Shard `model` in place over `mesh` (a 1-D DeviceMesh; None: every process): each block,
    then the root.

    Under bf16 the sharded fp32 parameters are the master weights; FSDP casts the gathered
    copies to bf16 for compute and reduces gradients in fp32 (MixedPrecisionPolicy).
    """
    if mesh is None and not dist.is_initialized():
        raise RuntimeError("fsdp=true needs a process group: launch with launch/cpu.sh or accelerate")
    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision == "fp16":
        policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters gathered after forward: the LM head's backward comes first.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An unsharded copy of a sharded model on every rank (for checksums, export, sampling);
    `model` itself when it is not sharded."""
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 broadcast_from_rank0=False))
    plain = Transformer(model.cfg).to(next(iter(state.values())).device)
    plain.load_state_dict(state)
    return plain


def full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The whole weights and optimizer state of a sharded model on every rank (a collective):
    plain tensors, the optimizer state keyed by index like `Optimizer.state_dict()`."""
    weights, optim = get_state_dict(model, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True))
    index = {name: i for i, name in enumerate(n for g in optim["param_groups"] for n in g["params"])}
    return weights, {"state": {index[n]: s for n, s in optim["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                      for g in optim["param_groups"]]}


def load_full(model: torch.nn.Module, optimizer, weights: dict, optim: dict) -> None:
    """Load whole weights and an index-keyed optimizer state (`full_state`'s, or a one-process
    checkpoint's) into a sharded model: each rank keeps its slices."""
    names = optimizer_names(model, optimizer)
    optim = {"state": {names[i]: s for i, s in optim["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                              for g in optim["param_groups"]]}
    set_state_dict(model, _inner(optimizer), model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def _options(flat: bool) -> StateDictOptions:
    """`flat`: the optimizer state keyed `state.NAME.exp_avg`, `param_groups.NAME.lr`, one key
    per parameter, which ranks holding different parameters (pipeline stages) can write side
    by side (nested, every rank's `param_groups` list would share one key)."""
    return StateDictOptions(flatten_optimizer_state_dict=flat)


def save_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 flat: bool = False) -> None:
    """Every rank writes its slices of the weights and optimizer state to directory `path`
    (`flat` for pipeline stages: `_options`)."""
    model_state, optim_state = get_state_dict(model, _inner(optimizer), options=_options(flat))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 flat: bool = False) -> None:
    """Load a `save_sharded` checkpoint into a model sharded like (or unlike) the one saved,
    once its files match its manifest (ValueError naming the file otherwise: DCP unpickles)."""
    check_loadable(path, SHARDED_INDEX)
    model_state, optim_state = get_state_dict(model, _inner(optimizer), options=_options(flat))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=_options(flat))


def _inner(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper, if any."""
    return getattr(optimizer, "optimizer", optimizer)
