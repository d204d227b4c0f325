"""Efficiency techniques applied around the model, one switch each (see the README).

`model/` knows nothing of them: everything here wraps modules from the outside, keeping
parameter names unchanged so checkpoints do not depend on which switches were on.

| switch | what it does |
|---|---|
| `activation_checkpointing=full|every_k|attention` | recompute activations in the backward pass |
| `compile=auto|true|false` | torch.compile the model (auto: on a CUDA GPU, not on CPU/MPS) |
| `compile_scope=model|blocks` | compile the whole model, or each block alone |
| `compile_mode=default|reduce-overhead|max-autotune` | torch.compile's mode (CUDA graphs: 2nd) |
| `compile_optimizer=true` | torch.compile the AdamW step (foreach; `train.optim.compile_step`) |
| `optim.fused=true|false` | one fused AdamW kernel, or the multi-tensor (foreach) one |
| `mixed_precision=no|bf16|fp16` | autocast through accelerate (fp16 with a grad scaler, GPU only) |
| `mixed_precision=fp8` | torchao float8 linears, bf16 autocast around them (`train/fp8.py`) |
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
from train import fp8, fsdp
from train.config import TrainConfig
from train.optim import build_optimizer

log = logging.getLogger("train")


def build_model(cfg: TrainConfig, accelerator: Accelerator, parallel=None):
    """The model with the configured techniques and its optimizer, both prepared for the
    distributed set-up: DDP (or nothing) through accelerate, FSDP2 through accelerate's plugin
    on GPU, or through `train.fsdp.shard` on CPU, where accelerate would use DDP instead.
    Under tensor/context parallel (`parallel`, train/parallel/layout.py) the model is split
    first and DDP or FSDP2 spans only the ranks that sum gradients."""
    launched_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if launched_fsdp and not cfg.fsdp:
        raise ValueError("launched with an FSDP accelerate config but fsdp=false: add fsdp=true")
    split = parallel is not None and parallel.active  # tp/cp: FSDP (if any) over its own mesh
    if cfg.fsdp and accelerator.device.type != "cpu" and not launched_fsdp and not split:
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
    resolve_compile(cfg, accelerator.device)  # done already by the loop; not by every caller
    model = Transformer(cfg.model)
    if split:
        model = apply_techniques(parallel.apply(model), cfg)
        wrapped = parallel.wrap(model, cfg.mixed_precision)  # FSDP first: it replaces parameters
        optimizer = build_optimizer(model, cfg.optim, accelerator.device, cfg.compile_optimizer)
        return wrapped, accelerator.prepare_optimizer(optimizer)
    model = apply_techniques(model, cfg)
    if cfg.fsdp and not launched_fsdp:
        fsdp.shard(model, cfg.mixed_precision)
        optimizer = build_optimizer(model, cfg.optim, accelerator.device, cfg.compile_optimizer)
        return model, accelerator.prepare_optimizer(optimizer)
    optimizer = build_optimizer(model, cfg.optim, accelerator.device, cfg.compile_optimizer)
    return accelerator.prepare(model, optimizer)


def resolve_compile(cfg: TrainConfig, device: torch.device) -> None:
    """Settle `compile=auto` for `device` (in place: the run's config.yaml and summary say what
    ran) and refuse compile settings that would not do what they say, in one line each."""
    if cfg.compile == "auto":
        cfg.compile = "true" if device.type == "cuda" else "false"
        log.info(f"compile=auto on {device.type}: compile={cfg.compile}")
    if cfg.compile_mode != "reduce-overhead":
        return
    if device.type != "cuda":
        raise ValueError(f"compile_mode=reduce-overhead captures CUDA graphs and needs a CUDA GPU "
                         f"(this run is on {device.type}); use compile_mode=default")
    if cfg.compile != "true":
        raise ValueError("compile_mode=reduce-overhead needs compile=true (or auto on a GPU)")
    if cfg.model.n_experts:
        raise ValueError("compile_mode=reduce-overhead needs static shapes, and MoE routing sends "
                         "a data-dependent number of tokens to each expert: use "
                         "compile_mode=default")
    if cfg.fsdp:
        raise ValueError("compile_mode=reduce-overhead with fsdp=true: FSDP's per-layer "
                         "all-gathers cannot be captured in CUDA graphs; use compile_mode=default")


def techniques_in_use(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> dict:
    """The switches as this run applied them, for summary.json: a setting that does nothing
    (the compile scope without compile, k without every_k) is null, and the optimizer kernel
    is the one built, which falls back to foreach where torch has no fused one."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    every_k = cfg.activation_checkpointing == "every_k"
    compiled = cfg.compile == "true"  # "auto" is settled by build_model (resolve_compile)
    return {
        "compile": compiled,
        "compile_scope": cfg.compile_scope if compiled else None,
        "compile_mode": cfg.compile_mode if compiled else None,
        "compile_optimizer": cfg.compile_optimizer,
        "fsdp": cfg.fsdp,
        "activation_checkpointing": cfg.activation_checkpointing,
        "checkpoint_every_k": cfg.checkpoint_every_k if every_k else None,
        "checkpointed_layers": checkpointed_layers(cfg),
        "mixed_precision": cfg.mixed_precision,
        "fused_optimizer": bool(inner.param_groups[0].get("fused")),
    }


def apply_techniques(model: Transformer, cfg: TrainConfig) -> torch.nn.Module:
    """float8 linears (mixed_precision=fp8), activation checkpointing, then compilation, as
    configured; returns the same module. `compile=auto` must be settled first
    (`resolve_compile`; here it means no compilation).

    Compilation uses `nn.Module.compile()`, which compiles in place: unlike `torch.compile(m)`
    it adds no `_orig_mod.` wrapper, so state-dict keys, checkpoints and DDP/FSDP wrapping are
    the same with and without it. `compile_mode=reduce-overhead` records CUDA graphs of the
    compiled code; the loop's shapes are static (every micro-batch is full, `BatchLoader`, and
    evaluation uses the same micro-batch), and graphs with a mutated input, such as generation's
    KV cache, run without them.
    """
    if cfg.mixed_precision == "fp8":
        fp8.convert(model)
    checkpoint_modules(model, cfg)
    if cfg.compile == "true":
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        if cfg.compile_scope == "blocks":
            for block in model.blocks:  # one graph per block, reused: shorter compile time
                block.compile(mode=mode)
        else:
            model.compile(mode=mode)  # one graph: the embedding, LM head and loss are fused in too
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
