"""Generate text from a run directory or a checkpoint: `python -m train.generate RUN_DIR --prompt ...`.

    python -m train.generate runs/demo --prompt "def " --max-new-tokens 100 --temperature 0.8 \
        --top-k 40 --top-p 0.95 --num-samples 3 --seed 0

PATH is a run directory (`config.yaml`, `model.safetensors`, `tokenizer.json`) or one of its
checkpoints (`checkpoints/step_NNNNNNNN/`, whose `trainer.json` holds the config; the tokenizer
is the run directory's, or the dataset's named in the config), loaded by `train.load.load_run`,
which first checks the files against their manifest.json: a mismatch is one line and exit 2.
Sampling is `Transformer.generate`: temperature 0 is greedy, top-k and top-p (nucleus) restrict
the draw, the KV cache is on unless `--no-cache`, and a sequence stops at the end-of-text token
or after `--max-new-tokens`. That token is the `eos_token` of the dataset's `meta.json` when it
belongs to this tokenizer (a run prepared with a pretrained tokenizer, e.g. `</s>`), else
`<|endoftext|>` (`contracts.run.find_eos_token`).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tokenizers import Tokenizer

from contracts.cli import USER_ERRORS, report
from train.load import LoadedRun, add_trust_pickle, load_run


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
        prog="python -m train.generate", description="Sample text from a trained run or checkpoint."
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
    add_trust_pickle(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        parser.error("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error(f"--top-p must be in (0, 1] and --top-k >= 0, got {args.top_p}, {args.top_k}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        run = load_run(args.path, device, args.trust_pickle)
        texts, stats = generate_text(
            run, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
            args.top_p if args.top_p < 1 else None, args.num_samples, args.seed,
            use_cache=not args.no_cache, stop_at_eos=not args.no_stop,
            dtype=getattr(torch, args.dtype),
        )
    except USER_ERRORS as e:
        sys.exit(report(e))
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
