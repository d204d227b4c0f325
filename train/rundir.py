"""The files around training: the dataset it reads, and the run directory it writes
(`contracts.run.RunDir`: config.yaml, metrics.jsonl, summary.json, model.safetensors,
tokenizer.json, data_meta.json, samples.txt, and manifest.json over the files generate and
export read, written last)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_model

from contracts import lock
from contracts.checkpoint import WEIGHTS
from contracts.cli import NoSpace, NotWritable, is_no_space, is_not_writable
from contracts.dataset import META, DatasetMeta, read_dataset_meta
from contracts.run import RunDir, write_run_manifest, write_summary
from model.transformer import Transformer
from train.config import TrainConfig, to_yaml
from train.metrics import report

log = logging.getLogger("train")
# What a run leaves in its directory that a fresh run there would replace
EARLIER_RUN = ("metrics.jsonl", "summary.json", WEIGHTS, "samples.txt", "manifest.json",
               "checkpoints")


def open_dataset(cfg: TrainConfig) -> DatasetMeta:
    """The dataset's meta.json, checked against the model; an unset model.vocab_size (0) takes
    the dataset's."""
    meta = read_dataset_meta(cfg.data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta.vocab_size
    elif cfg.model.vocab_size < meta.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's "
            f"vocab_size={meta.vocab_size} ({cfg.data_dir}); use model.vocab_size=0 to follow the data"
        )
    check_tokenizer(meta)
    return meta


def check_tokenizer(meta: DatasetMeta) -> None:
    """The dataset's tokenizer must exist and have the vocabulary its shards were written with."""
    from tokenizers import Tokenizer

    path = meta.tokenizer_path
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} named by meta.json is missing")
    size = Tokenizer.from_file(str(path)).get_vocab_size()
    if size != meta.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {size} tokens but meta.json says the shards use "
            f"vocab_size={meta.vocab_size}: the tokenizer does not belong to these shards"
        )


@contextlib.contextmanager
def disk_space(path: Path | str, needed: int | Callable[[], int]) -> Iterator[None]:
    """Turn a write into `path` that fails for lack of space into one line, NoSpace: "no space
    left on device: PATH needs ~N MB". `needed` (bytes, or a function computing them) is what
    the write takes. A failure counts as a full disk when its errno is ENOSPC, or when the disk
    holds less than `needed` free: torch.save reports a full disk as `RuntimeError: unexpected
    pos ...`, without the errno. A read-only (or not our own) place becomes NotWritable: "cannot
    write to PATH: Read-only file system"."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, (NoSpace, NotWritable)):
            raise
        if is_not_writable(e):
            raise NotWritable(getattr(e, "filename", None) or path, e) from e
        need = needed() if callable(needed) else needed
        if is_no_space(e) or _free_bytes(path) < need:
            raise NoSpace(path, need) from e
        raise


def _free_bytes(path: Path | str) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62  # unknown: not the reason


def state_bytes(*states) -> int:
    """Bytes of the tensors in modules, optimizers or (nested) state dicts: what writing them
    takes on disk."""
    total = 0
    for state in states:
        if hasattr(state, "state_dict"):
            state = state.state_dict()
        if isinstance(state, torch.Tensor):
            total += state.numel() * state.element_size()
        elif isinstance(state, dict):
            total += state_bytes(*state.values())
        elif isinstance(state, (list, tuple)):
            total += state_bytes(*state)
    return total


def claim_out_dir(out_dir: str | Path, accelerator) -> None:
    """Rank 0 takes out_dir's lock (`contracts.lock`: one run per directory) before anything
    there is read or written; every rank learns the outcome, so that all ranks of a refused run
    stop with the same line instead of racing the live run."""
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            with disk_space(out_dir, 4096):  # a read-only or full disk: one line naming it
                lock.acquire(out_dir)
        except (lock.LockHeld, NotWritable, NoSpace) as e:
            error = e
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            error = ValueError(box[0])
    if error is not None:
        raise error


def set_aside_earlier_run(run: RunDir) -> Path | None:
    """Move the files of an earlier run in `run` (metrics, summary, weights, checkpoints...)
    into run/earlier_runs/<UTC time>/ before a fresh run starts there: nothing of it is
    replaced or deleted, and the move is logged. Returns where they went, or None."""
    present = [n for n in EARLIER_RUN if (run.root / n).exists()
               and not (n == "metrics.jsonl" and (run.root / n).stat().st_size == 0)]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = run.root / "earlier_runs" / stamp, 1
    while dest.exists():
        dest, n = run.root / "earlier_runs" / f"{stamp}_{n}", n + 1
    dest.mkdir(parents=True)
    for name in present:
        os.replace(run.root / name, dest / name)
    log.warning(f"{run.root} held an earlier run ({', '.join(present)}): moved to {dest} "
                "(resume=auto would have continued it)")
    return dest


def prepare_run_dir(cfg: TrainConfig, meta: DatasetMeta, fresh: bool) -> RunDir:
    """Write the resolved config and copy the dataset's tokenizer and meta.json (generate and
    export read its eos token) into the run directory (main rank only). A fresh run starts a
    new metrics.jsonl; a resumed one keeps it. The manifest of a finished run goes first: its
    files are about to change, and write_outputs writes a new one at the end. A fresh run
    in the directory of an earlier one first sets the earlier one's files aside."""
    run = RunDir(cfg.out_dir)
    text = to_yaml(cfg)
    needed = len(text) + meta.tokenizer_path.stat().st_size + (meta.root / META).stat().st_size
    with disk_space(run.root, needed):
        run.root.mkdir(parents=True, exist_ok=True)
        if fresh:
            set_aside_earlier_run(run)
        run.manifest.unlink(missing_ok=True)
        run.config.write_text(text)
        shutil.copy(meta.tokenizer_path, run.tokenizer)
        shutil.copy(meta.root / META, run.data_meta)
    return run


def sample_text(model: Transformer, tokenizer_path: Path, cfg: TrainConfig, device,
                eos_id: int = 0) -> str:
    """Generate from the trained model with the dataset's tokenizer (main rank only); an empty
    prompt starts from the end-of-text token, as a new document does."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids = tokenizer.encode(cfg.sample_prompt).ids or [eos_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(
        idx, cfg.sample_tokens, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k or None,
        generator=gen,
    )
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def write_outputs(cfg: TrainConfig, summary: dict, model: Transformer, device,
                  eos_id: int) -> None:
    """The main rank's end-of-run files (summary.json, model.safetensors, samples.txt, then
    manifest.json over the files generate and export read) and the report on stdout."""
    run = RunDir(cfg.out_dir)
    with disk_space(run.summary, 1 << 20):
        write_summary(run.root, summary)
    with disk_space(run.weights, lambda: state_bytes(model)):
        save_model(model, str(run.weights))
    text = sample_text(model, run.tokenizer, cfg, device, eos_id)
    with disk_space(run.samples, len(text.encode()) + 1024):
        run.samples.write_text(f"prompt: {cfg.sample_prompt!r}\n\n{text}\n")
        write_run_manifest(run.root)
    report(summary, text)
