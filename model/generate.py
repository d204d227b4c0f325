"""Generate text from a run directory or a checkpoint: `python -m model.generate RUN_DIR --prompt ...`.

    python -m model.generate runs/demo --prompt "def " --max-new-tokens 100 --temperature 0.8 \
        --top-k 40 --top-p 0.95 --num-samples 3 --seed 0

PATH is a run directory (`config.yaml`, `model.safetensors`, `tokenizer.json`) or one of its
checkpoints (`checkpoints/step_NNNNNNNN/`, whose `trainer.json` holds the config; the tokenizer
is the run directory's, or the dataset's named in the config). Sampling is
`Transformer.generate`: temperature 0 is greedy, top-k and top-p (nucleus) restrict the draw,
the KV cache is on unless `--no-cache`, and a sequence stops at the end-of-text token or after
`--max-new-tokens`. That token is the `eos_token` of the dataset's `meta.json` when it belongs to
this tokenizer (a run prepared with a pretrained tokenizer, e.g. `</s>`), else `<|endoftext|>`.

`model/` imports torch only at module level (see DESIGN.md); reading a run needs PyYAML,
safetensors and tokenizers, which are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import Transformer

EOS_TOKEN = "<|endoftext|>"
WEIGHTS = "model.safetensors"
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of an FSDP checkpoint


@dataclasses.dataclass
class LoadedRun:
    """A trained model with where it came from: the weights' directory, the tokenizer file."""

    model: Transformer
    cfg: ModelConfig
    weights: Path
    tokenizer_path: Path | None
    eos_token: str = EOS_TOKEN  # the end-of-text token the training data was packed with


def model_config_from_dict(section: dict) -> ModelConfig:
    """The `model:` section of a resolved config as a ModelConfig; unknown keys are errors
    (a model with fields this code does not know cannot be rebuilt faithfully)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(
            f"model config has unknown keys {unknown}; this version knows {sorted(known)}"
        )
    cfg = ModelConfig(**section)
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} in the run's config: not a trained model")
    return cfg


def read_run_config(path: Path) -> tuple[dict, Path]:
    """The resolved training config (as a dict) of a run directory or checkpoint, and the run
    directory it belongs to."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        import yaml

        return yaml.safe_load((path / "config.yaml").read_text()), path
    if (path / "trainer.json").is_file():  # a checkpoint: OUT/checkpoints/step_NNNNNNNN/
        return json.loads((path / "trainer.json").read_text())["config"], path.parent.parent
    raise FileNotFoundError(
        f"{path} is neither a run directory (config.yaml) nor a checkpoint (trainer.json)"
    )


def find_tokenizer(run_dir: Path, config: dict) -> Path | None:
    """The run's tokenizer.json, else the dataset's, else None."""
    for candidate in (run_dir / "tokenizer.json", Path(config.get("data_dir", "")) / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    return None


def find_eos_token(tokenizer_path: Path | None, run_dir: Path, config: dict) -> str:
    """The end-of-text token of the run's data: `eos_token` of the dataset's meta.json as copied
    into the run directory (`data_meta.json`), or of the dataset itself, if that meta.json
    belongs to this tokenizer (same sha256); otherwise `<|endoftext|>`, the token of the BPE
    data_prep trains."""
    if tokenizer_path is None:
        return EOS_TOKEN
    digest = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    metas = [run_dir / "data_meta.json"]
    metas += [Path(config["data_dir"]) / "meta.json"] if config.get("data_dir") else []
    for m in metas:
        try:
            meta = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("tokenizer_sha256") == digest and meta.get("eos_token"):
            return str(meta["eos_token"])
    return EOS_TOKEN


def load_sharded_weights(model: Transformer, path: Path) -> None:
    """Load the weights of an FSDP checkpoint (torch.distributed.checkpoint: one file of slices
    per rank, indexed by `.metadata`) into an unsharded model, in this one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}  # the run saved {"model": ..., "optimizer": ...}
    with warnings.catch_warnings():  # "...assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"], strict=True)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory or checkpoint and load its weights (eval mode):
    `model.safetensors`, or an FSDP checkpoint's sharded files."""
    from safetensors.torch import load_model

    path = Path(path)
    config, run_dir = read_run_config(path)
    cfg = model_config_from_dict(config["model"])
    weights = path / WEIGHTS
    sharded = not weights.is_file() and (path / SHARDED_INDEX).is_file()
    if sharded:
        weights = path / SHARDED_INDEX
    elif not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: the run has not finished (only finished runs and checkpoints "
            "hold weights); pass a checkpoint directory such as "
            f"{run_dir / 'checkpoints' / 'step_00000100'}"
        )
    model = Transformer(cfg)
    if sharded:
        load_sharded_weights(model, path)
    else:
        load_model(model, str(weights), strict=True)  # tied embeddings are stored once
    tokenizer_path = find_tokenizer(run_dir, config)
    return LoadedRun(
        model.to(device).eval(), cfg, weights, tokenizer_path,
        find_eos_token(tokenizer_path, run_dir, config),
    )


def pick_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def generate_text(
    run: LoadedRun,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int = 0,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[list[str], dict]:
    """Continue `prompt` num_samples times; return the texts (prompt included, cut at the end
    of text) and figures: new tokens, seconds, tokens/s."""
    from tokenizers import Tokenizer

    if run.tokenizer_path is None:
        raise FileNotFoundError(f"no tokenizer.json next to {run.weights} or in the run's data_dir")
    tokenizer = Tokenizer.from_file(str(run.tokenizer_path))
    eos_id = tokenizer.token_to_id(run.eos_token)
    shown = tokenizer.encode(prompt).ids
    # An empty prompt starts a new document: the context is the end-of-text token before it.
    ids = shown or [eos_id if eos_id is not None else 0]
    device = next(run.model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32)
        else torch.autocast(device.type, enabled=False)
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with autocast:
        out = run.model.generate(
            idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_id=eos_id if stop_at_eos else None, use_cache=use_cache, generator=gen,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    texts, new_tokens = [], 0
    for row in out.tolist():
        new = row[len(ids):]
        if stop_at_eos and eos_id in new:
            new = new[: new.index(eos_id) + 1]  # keep the end-of-text marker, drop the padding
        new_tokens += len(new)
        texts.append(tokenizer.decode(shown + new, skip_special_tokens=False))
    return texts, {"new_tokens": new_tokens, "seconds": seconds,
                   "tokens_per_s": new_tokens / seconds if seconds > 0 else float("nan")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.generate", description="Sample text from a trained run or checkpoint."
    )
    parser.add_argument("path", help="run directory (runs/demo) or checkpoint (runs/demo/checkpoints/step_N)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = no cut")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute every step (slow; for checking)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads (0 = torch's default). Decoding a small model one token at a time is "
        "latency-bound: on a busy machine --threads 1 can be many times faster",
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        parser.error("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error(f"--top-p must be in (0, 1] and --top-k >= 0, got {args.top_p}, {args.top_k}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        run = load_run(args.path, device)
        texts, stats = generate_text(
            run, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
            args.top_p if args.top_p < 1 else None, args.num_samples, args.seed,
            use_cache=not args.no_cache, stop_at_eos=not args.no_stop,
            dtype=getattr(torch, args.dtype),
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    print(
        f"[{run.cfg.n_layer}-layer model from {run.weights} on {device}: {stats['new_tokens']} new "
        f"tokens in {stats['seconds']:.2f} s, {stats['tokens_per_s']:,.0f} tokens/s, "
        f"KV cache {'off' if args.no_cache else 'on'}]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
