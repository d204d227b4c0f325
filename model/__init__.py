"""The decoder-only transformer, its configuration, and its parameter/FLOP accounting."""

from model.config import PRESETS, ModelConfig, get_preset
from model.flops import count_params, hardware_flops_per_token, model_flops_per_token
from model.transformer import KVCache, Transformer

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "count_params",
    "get_preset",
    "hardware_flops_per_token",
    "model_flops_per_token",
]
