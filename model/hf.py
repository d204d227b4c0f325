"""What our model is in the HuggingFace transformers Llama format: parameter names, config.json.

Our architecture is Llama's: pre-norm RMSNorm blocks, RoPE in the "rotate half" layout (channel
i pairs with i + head_dim/2, exactly as `transformers`' `rotate_half`, so the query and key
weights need no permutation), grouped-query attention where query head h reads key/value head
h // n_rep (`repeat_kv`), a SwiGLU MLP, no biases. Only the parameter names change, and our
fused projections are split into Llama's separate ones (`split_fused`; `fuse_separate` is the
inverse, which also loads the weights of runs saved before the fusion). A mixture-of-experts
model has no Llama equivalent and is refused.

This module only maps; `python -m train.export` writes the files of a trained run.
transformers is not needed for either.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.transformer import Transformer

# a fused weight of ours -> the separate projections it stacks, in row order
FUSED = {"wqkv.weight": ("wq.weight", "wk.weight", "wv.weight"),
         "w_gate_up.weight": ("w_gate.weight", "w_up.weight")}
# a separate projection (per block, after "blocks.{i}.") -> Llama's (after "model.layers.{i}.")
BLOCK_NAMES = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ValueError if the model has no exact Llama equivalent."""
    if cfg.is_moe:
        raise ValueError(
            f"cannot export a mixture-of-experts model (model.n_experts={cfg.n_experts}) as Llama: "
            "LlamaForCausalLM has one dense MLP per layer. Only dense models (n_experts=0) export."
        )


def llama_config(cfg: ModelConfig, eos_id: int, torch_dtype: str = "float32") -> dict:
    """config.json for LlamaForCausalLM describing exactly our model."""
    check_exportable(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def split_fused(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict with every fused weight of a dense block replaced by the separate ones it
    stacks: q, k, v (n_head, n_kv_head, n_kv_head heads of head_dim rows), gate, up."""
    rows = {"wqkv.weight": [cfg.n_head * cfg.head_dim] + [cfg.n_kv_head * cfg.head_dim] * 2,
            "w_gate_up.weight": [cfg.ffn_hidden] * 2}
    out = {}
    for name, tensor in state.items():
        *path, module, leaf = name.split(".")
        base, key = ".".join(path), f"{module}.{leaf}"
        if key in FUSED:
            for part, piece in zip(FUSED[key], tensor.split(rows[key]), strict=True):
                out[f"{base}.{part}"] = piece
        else:
            out[name] = tensor
    return out


def fuse_separate(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `split_fused`: separate q/k/v and gate/up weights (as in a run saved
    before the projections were fused) stacked into the fused ones; other entries unchanged."""
    out = dict(state)
    for fused, parts in FUSED.items():
        for name in [n for n in state if n.endswith("." + parts[0])]:
            base = name[: -len(parts[0])]
            if all(base + p in out for p in parts):
                out[base + fused] = torch.cat([out.pop(base + p) for p in parts])
    return out


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names (contiguous float32 CPU copies); with tied embeddings the
    shared matrix is stored once, as `model.embed_tokens.weight`."""
    check_exportable(model.cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in split_fused(model.state_dict(), model.cfg).items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # transformers re-ties lm_head to embed_tokens (tie_word_embeddings)
        if name in TOP_NAMES:
            new = TOP_NAMES[name]
        else:
            prefix, layer, rest = name.split(".", 2) if name.startswith("blocks.") else ("", "", "")
            if rest not in BLOCK_NAMES:
                raise ValueError(f"parameter {name!r} has no Llama equivalent")
            new = f"model.layers.{layer}.{BLOCK_NAMES[rest]}"
        out[new] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    return out

