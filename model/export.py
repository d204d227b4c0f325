"""Export a trained model to the HuggingFace transformers Llama format.

    python -m model.export runs/demo runs/demo/hf
    # then, with transformers installed:
    #   AutoModelForCausalLM.from_pretrained("runs/demo/hf"), AutoTokenizer.from_pretrained(...)

Our architecture is Llama's: pre-norm RMSNorm blocks, RoPE in the "rotate half" layout (channel
i pairs with i + head_dim/2, exactly as `transformers`' `rotate_half`, so the query and key
weights need no permutation), grouped-query attention where query head h reads key/value head
h // n_rep (`repeat_kv`), a SwiGLU MLP, no biases. Only the parameter names change. A
mixture-of-experts model has no Llama equivalent and is refused.

Written files: `config.json` (LlamaForCausalLM), `generation_config.json`, `model.safetensors`
(Llama parameter names, float32), `tokenizer.json` (copied) and `tokenizer_config.json` /
`special_tokens_map.json` (PreTrainedTokenizerFast with the data's end-of-text token as bos, eos
and pad: `<|endoftext|>`, or the `eos_token` of the dataset's meta.json, see
`model.generate.find_eos_token`), so that `AutoTokenizer.from_pretrained(dir)` works offline.

transformers is not needed to export: the files are written with json and safetensors, which
is imported lazily (`model/` imports torch only at module level).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import Transformer

EOS_TOKEN = "<|endoftext|>"

# our parameter name (per block, after "blocks.{i}.") -> Llama's (after "model.layers.{i}.")
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


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names (contiguous float32 CPU copies); with tied embeddings the
    shared matrix is stored once, as `model.embed_tokens.weight`."""
    check_exportable(model.cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
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


def eos_id_of(tokenizer_json: Path, eos_token: str = EOS_TOKEN) -> int:
    """The id of `eos_token` in tokenizer_json's vocabulary (added tokens included)."""
    from tokenizers import Tokenizer

    eos_id = Tokenizer.from_file(str(tokenizer_json)).token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"{tokenizer_json} has no {eos_token} token")
    return eos_id


def tokenizer_files(
    tokenizer_json: Path, seq_len: int, eos_token: str = EOS_TOKEN
) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for a PreTrainedTokenizerFast around the
    data's tokenizer.json, whose `eos_token` ends (and so begins) every document."""
    vocab = json.loads(Path(tokenizer_json).read_text())
    added = vocab.get("added_tokens", [])
    eos_id_of(tokenizer_json, eos_token)  # raises if the token is not in the vocabulary
    special = {"bos_token": eos_token, "eos_token": eos_token, "pad_token": eos_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(t["id"]): {"content": t["content"], "lstrip": t.get("lstrip", False),
                           "normalized": t.get("normalized", False),
                           "rstrip": t.get("rstrip", False),
                           "single_word": t.get("single_word", False),
                           "special": t.get("special", True)}
            for t in added
        },
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def export_model(
    model: Transformer, tokenizer_json: str | Path, out_dir: str | Path, eos_token: str = EOS_TOKEN
) -> Path:
    """Write `model` and its tokenizer to out_dir in the transformers Llama format; `eos_token`
    is the end-of-text token the training data was packed with."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = Path(tokenizer_json)
    eos_id = eos_id_of(tokenizer_json, eos_token)
    cfg = model.cfg
    (out / "config.json").write_text(json.dumps(llama_config(cfg, eos_id), indent=2) + "\n")
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(llama_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tokenizer_json, out / "tokenizer.json")
    for name, content in tokenizer_files(tokenizer_json, cfg.seq_len, eos_token).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def export_run(path: str | Path, out_dir: str | Path) -> Path:
    """Export the model of a run directory or checkpoint (see `model.generate.load_run`)."""
    from model.generate import load_run

    run = load_run(path)
    check_exportable(run.cfg)
    if run.tokenizer_path is None:
        raise FileNotFoundError(f"no tokenizer.json for {path} (run directory or data_dir)")
    return export_model(run.model, run.tokenizer_path, out_dir, run.eos_token)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.export",
        description="Export a run or checkpoint to the transformers Llama format.",
    )
    parser.add_argument("path", help="run directory or checkpoint directory")
    parser.add_argument("out_dir", help="where to write config.json, model.safetensors, tokenizer files")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.path, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {args.path} -> {out} (load with transformers' "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()
