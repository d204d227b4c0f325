"""Export a trained run to the HuggingFace transformers Llama format.

    python -m train.export runs/demo runs/demo/hf
    # then, with transformers installed:
    #   AutoModelForCausalLM.from_pretrained("runs/demo/hf"), AutoTokenizer.from_pretrained(...)

PATH is a run directory or one of its checkpoints (see `train.load.load_run`; files that do
not match their manifest.json are refused, one line and exit 2, and nothing is written). The
mapping of our parameters and config onto Llama's is `model.hf`; this module writes the files:
`config.json` (LlamaForCausalLM), `generation_config.json`, `model.safetensors` (Llama
parameter names, float32), `tokenizer.json` (copied) and `tokenizer_config.json` /
`special_tokens_map.json` (PreTrainedTokenizerFast with the data's end-of-text token as bos, eos
and pad: `<|endoftext|>`, or the `eos_token` of the dataset's meta.json, see
`contracts.run.find_eos_token`), so that `AutoTokenizer.from_pretrained(dir)` works offline.

transformers is not needed to export: the files are written with json and safetensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer

from contracts.cli import USER_ERRORS, report
from contracts.run import EOS_TOKEN
from model.hf import check_exportable, llama_config, llama_state_dict
from model.transformer import Transformer
from train.load import add_trust_pickle, load_run


def eos_id_of(tokenizer_json: Path, eos_token: str = EOS_TOKEN) -> int:
    """The id of `eos_token` in tokenizer_json's vocabulary (added tokens included)."""
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


def export_run(path: str | Path, out_dir: str | Path, trust_pickle: bool = False) -> Path:
    """Export the model of a run directory or checkpoint (see `train.load.load_run`)."""
    run = load_run(path, trust_pickle=trust_pickle)
    check_exportable(run.cfg)
    if run.tokenizer_path is None:
        raise FileNotFoundError(f"no tokenizer.json for {path} (run directory or data_dir)")
    return export_model(run.model, run.tokenizer_path, out_dir, run.eos_token)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.export",
        description="Export a run or checkpoint to the transformers Llama format.",
    )
    parser.add_argument("path", help="run directory or checkpoint directory")
    parser.add_argument("out_dir", help="where to write config.json, model.safetensors, tokenizer files")
    add_trust_pickle(parser)
    args = parser.parse_args(argv)
    try:
        out = export_run(args.path, args.out_dir, args.trust_pickle)
    except USER_ERRORS as e:
        sys.exit(report(e))
    print(f"exported {args.path} -> {out} (load with transformers' "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()
