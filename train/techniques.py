"""Efficiency techniques applied around the model, one switch each (see the README).

`model/` knows nothing of them: everything here wraps modules from the outside, keeping
parameter names unchanged so checkpoints do not depend on which switches were on.

| switch | what it does |
|---|---|
| `activation_checkpointing=full|every_k|attention` | recompute activations in the backward pass |
| `compile=true compile_scope=model|blocks` | torch.compile the whole model, or each block alone |
| `optim.fused=true|false` | one fused AdamW kernel, or the multi-tensor (foreach) one |
| `mixed_precision=no|bf16|fp16` | autocast through accelerate (fp16 with a grad scaler, GPU only) |
| `fsdp=true` | shard parameters, gradients and optimizer state (FSDP2, `train/fsdp.py`) |
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.checkpoint import checkpoint

from model.flops import hardware_flops_per_token, recomputed_layers
from model.transformer import Transformer
from train import fsdp
from train.config import TrainConfig
from train.optim import build_optimizer

log = logging.getLogger("train")


def build_model(cfg: TrainConfig, accelerator: Accelerator):
    """The model with the configured techniques and its optimizer, both prepared for the
    distributed set-up: DDP (or nothing) through accelerate, FSDP2 through accelerate's plugin
    on GPU, or through `train.fsdp.shard` on CPU, where accelerate would use DDP instead."""
    launched_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if launched_fsdp and not cfg.fsdp:
        raise ValueError("launched with an FSDP accelerate config but fsdp=false: add fsdp=true")
    if cfg.fsdp and accelerator.device.type != "cpu" and not launched_fsdp:
        raise ValueError("fsdp=true on GPU needs accelerate's FSDP plugin: launch with "
                         "--config_file launch/accelerate/gpu_fsdp2.yaml (MODE=fsdp2 launch/gpu.sh)")
    if cfg.fsdp and accelerator.num_processes < 2:
        raise ValueError("fsdp=true shards over processes: launch 2 or more (NPROC=2 launch/cpu.sh)")
    plugin = accelerator.state.fsdp_plugin if launched_fsdp else None
    if plugin is not None and plugin.activation_checkpointing:
        # Apply our own per-block recomputation instead of accelerate's wrapper: the same
        # effect, unchanged parameter names, and HFU counts the recomputation.
        plugin.activation_checkpointing = False
        if cfg.activation_checkpointing == "none":
            cfg.activation_checkpointing = "full"
            log.info("activation checkpointing from the FSDP config: activation_checkpointing=full")
    model = apply_techniques(Transformer(cfg.model), cfg)
    if cfg.fsdp and not launched_fsdp:
        fsdp.shard(model, cfg.mixed_precision)
        optimizer = build_optimizer(model, cfg.optim, accelerator.device)
        return model, accelerator.prepare_optimizer(optimizer)
    optimizer = build_optimizer(model, cfg.optim, accelerator.device)
    return accelerator.prepare(model, optimizer)


def techniques_in_use(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> dict:
    """The switches as this run applied them, for summary.json: a setting that does nothing
    (the compile scope without compile, k without every_k) is null, and the optimizer kernel
    is the one built, which falls back to foreach where torch has no fused one."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    every_k = cfg.activation_checkpointing == "every_k"
    return {
        "compile": cfg.compile,
        "compile_scope": cfg.compile_scope if cfg.compile else None,
        "fsdp": cfg.fsdp,
        "activation_checkpointing": cfg.activation_checkpointing,
        "checkpoint_every_k": cfg.checkpoint_every_k if every_k else None,
        "checkpointed_layers": checkpointed_layers(cfg),
        "mixed_precision": cfg.mixed_precision,
        "fused_optimizer": bool(inner.defaults.get("fused")),
    }


def apply_techniques(model: Transformer, cfg: TrainConfig) -> torch.nn.Module:
    """Activation checkpointing, then compilation, as configured; returns the same module.

    Compilation uses `nn.Module.compile()`, which compiles in place: unlike `torch.compile(m)`
    it adds no `_orig_mod.` wrapper, so state-dict keys, checkpoints and DDP/FSDP wrapping are
    the same with and without it.
    """
    checkpoint_modules(model, cfg)
    if cfg.compile:
        if cfg.compile_scope == "blocks":
            for block in model.blocks:  # one graph per block, reused: shorter compile time
                block.compile()
        else:
            model.compile()  # one graph: the embedding, LM head and loss are fused in too
    return model


def checkpointed_layers(cfg: TrainConfig) -> list[int]:
    """Indices of the blocks in which activations are recomputed in the backward pass."""
    return recomputed_layers(cfg.model.n_layer, cfg.activation_checkpointing, cfg.checkpoint_every_k)


def executed_flops_per_token(cfg: TrainConfig, seq_len: int) -> float:
    """FLOPs per token actually executed (for HFU): the model FLOPs plus what is recomputed."""
    return hardware_flops_per_token(cfg.model, seq_len, cfg.activation_checkpointing,
                                    cfg.checkpoint_every_k)


def _checkpoint_forward(module: torch.nn.Module) -> None:
    """Make `module` recompute its activations in the backward pass instead of storing them.

    The wrapper replaces the module's bound `forward`, so parameter names do not change and
    module hooks (FSDP's, compile's) still run around it.
    """
    forward = module.forward

    def checkpointed(*args, _forward=forward, **kwargs):
        return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


def checkpoint_modules(model: Transformer, cfg: TrainConfig) -> None:
    """`full` checkpoints every block, `every_k` every k-th block, `attention` the attention
    sub-layer (projections, RoPE and the attention core) of every block."""
    for i in checkpointed_layers(cfg):
        block = model.blocks[i]
        _checkpoint_forward(block.attn if cfg.activation_checkpointing == "attention" else block)
