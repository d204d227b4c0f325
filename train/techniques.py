"""Efficiency techniques applied around the model, one switch each (see the README).

`model/` knows nothing of them: everything here wraps or replaces modules from the outside,
keeping parameter names unchanged so checkpoints do not depend on which switches were on.
"""

from __future__ import annotations

import torch

from model.flops import hardware_flops_per_token
from model.transformer import Transformer
from train.config import TrainConfig


def apply_techniques(model: Transformer, cfg: TrainConfig) -> torch.nn.Module:
    """Activation checkpointing, then compilation, as configured."""
    checkpoint_blocks(model, cfg)
    if cfg.compile:
        model = torch.compile(model)
    return model


def checkpointed_layers(cfg: TrainConfig) -> list[int]:
    """Indices of the blocks whose activations are recomputed in the backward pass."""
    if cfg.activation_checkpointing == "none":
        return []
    k = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every_k
    return [i for i in range(cfg.model.n_layer) if i % k == 0]


def executed_flops_per_token(cfg: TrainConfig, seq_len: int) -> float:
    """FLOPs per token actually executed (for HFU): the recomputation cost of one block times
    the number of checkpointed blocks."""
    plain = hardware_flops_per_token(cfg.model, seq_len, "none")
    every = hardware_flops_per_token(cfg.model, seq_len, "full")
    return plain + (every - plain) * len(checkpointed_layers(cfg)) / cfg.model.n_layer


def checkpoint_blocks(model: Transformer, cfg: TrainConfig) -> None:
    """Recompute block activations in the backward pass instead of storing them.

    `full` wraps every block, `every_k` every k-th block. The wrapper replaces the block's
    bound `forward`, so parameter names (and checkpoints) do not change.
    """
    for i in checkpointed_layers(cfg):
        block = model.blocks[i]
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
