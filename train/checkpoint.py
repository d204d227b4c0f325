"""Checkpoints that resume bit-exactly, written atomically and verified before use.

A checkpoint is a directory `OUT/checkpoints/step_NNNNNNNN/` holding
- `model.safetensors`: the weights (safetensors: loading them runs no code);
- `optimizer.pt`: the optimizer state, loaded with `torch.load(weights_only=True)`;
- `trainer.json`: step, tokens seen, consecutive bad steps, the grad scaler's state, and the
  config fingerprint the run must match to resume;
- `rank_NNNNN.pt`: each rank's RNG states (python, numpy, torch, CUDA) and data position;
- `manifest.json`, written last: SHA-256 and size of every other file.

Under `fsdp=true` no rank holds the whole model, so the weights and optimizer state are saved
sharded instead (torch.distributed.checkpoint, `train/fsdp.py`): `__R_0.distcp` holds rank R's
slices and `.metadata` DCP's index of them, in place of `model.safetensors` and `optimizer.pt`;
`trainer.json` says `"sharded": true`. The rest, manifest included, is the same.

All ranks write into `step_NNNNNNNN.tmp/`, which the main rank renames once every file is on
disk. A directory without a manifest, or whose files do not match it, is not a checkpoint:
`latest_valid` reports it and falls back to the one before. The schedule is a pure function
of the step, so it needs no state of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from train.fsdp import is_sharded, load_sharded, save_sharded

log = logging.getLogger("train")
FORMAT = 1
PREFIX = "step_"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict:
    """This process's RNG states, as plain types and tensors (safe for weights_only loading)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves, finds and loads the checkpoints of one run directory."""

    def __init__(self, out_dir: Path, keep: int, rank: int, barrier):
        self.root = Path(out_dir) / "checkpoints"
        self.keep, self.rank, self.barrier = keep, rank, barrier

    def save(self, step: int, model, optimizer, trainer: dict, rank_state: dict) -> Path:
        """Write checkpoint `step` from every rank; returns its final path."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{PREFIX}{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        torch.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        sharded = is_sharded(model)
        if sharded:  # a collective: every rank writes its slices, rank 0 also DCP's .metadata
            save_sharded(tmp, model, optimizer)
        elif self.rank == 0:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if self.rank == 0:
            (tmp / "trainer.json").write_text(
                json.dumps({"format": FORMAT, "sharded": sharded, **trainer}, indent=2))
        self.barrier()
        if self.rank == 0:
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            config_sha256 = hashlib.sha256(
                json.dumps(trainer["fingerprint"], sort_keys=True).encode()).hexdigest()
            manifest = {"format": FORMAT, "step": step, "config_sha256": config_sha256,
                        "fingerprint": trainer["fingerprint"],
                        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                                  for p in files}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints (0 keeps all)."""
        for stale in self.root.glob(f"{PREFIX}*.tmp"):  # left by a crash during a save
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep <= 0:
            return
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Finished checkpoint directories, oldest first (in-progress `.tmp` ones excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                      and not p.name.endswith(".tmp"))

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; invalid ones are reported."""
        for path in reversed(self.checkpoints()):
            problem = verify(path)
            if problem is None:
                return path
            log.warning(f"checkpoint {path} is unusable ({problem}); trying the one before")
        return None


def verify(path: Path) -> str | None:
    """None if every file of the checkpoint matches its manifest, else what is wrong."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json: the write did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return f"manifest.json is not valid JSON ({e})"
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['bytes']}"
        if sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def load(path: Path, model, optimizer, rank: int, expected_fingerprint: dict) -> tuple[dict, dict]:
    """Load weights and optimizer state into place; returns (trainer state, this rank's state).

    Refuses, naming every difference, a checkpoint whose model, data, batch layout or world
    size differ from this run's: continuing from it would not be the same run.
    """
    trainer = json.loads((path / "trainer.json").read_text())
    diffs = fingerprint_differences(trainer["fingerprint"], expected_fingerprint)
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run changed: " + "; ".join(diffs))
    sharded = trainer.get("sharded", False)
    if sharded != is_sharded(model):
        raise ValueError(f"cannot resume from {path}: it was written with fsdp={str(sharded).lower()}, "
                         f"this run has fsdp={str(not sharded).lower()}; resume with "
                         f"fsdp={str(sharded).lower()}")
    if sharded:  # a collective: every rank reads its own slices
        load_sharded(path, model, optimizer)
    else:
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{rank_file} is missing: the checkpoint was written by fewer ranks")
    return trainer, torch.load(rank_file, weights_only=True)


def fingerprint(cfg, meta: dict, world_size: int) -> dict:
    """What must not change for a resume to continue the same run exactly."""
    model = {k: v for k, v in vars(cfg.model).items() if k != "notes"}
    return {
        "model": model,
        "data": {"tokenizer_sha256": meta.get("tokenizer_sha256"), "vocab_size": meta["vocab_size"],
                 "dtype": meta["dtype"],
                 "train_tokens": meta["splits"]["train"].get("tokens"),
                 "train_shards": meta["splits"]["train"]["shards"]},
        "seq_len": cfg.seq_len or cfg.model.seq_len,
        "batch_size": cfg.batch_size,
        "micro_batch_size": cfg.micro_batch_size,
        "world_size": world_size,
        "seed": cfg.seed,
        "mixed_precision": cfg.mixed_precision,
    }


def fingerprint_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints, e.g. 'model.n_layer: 4 -> 6'."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def resume_path(resume: str, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint to resume from: none, the newest valid one (auto), or a given directory."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpointer.latest_valid()
        if found is None:
            log.info(f"resume=auto: no valid checkpoint in {checkpointer.root}, starting fresh")
        return found
    path = Path(resume)
    problem = verify(path) if path.is_dir() else "no such directory"
    if problem:
        raise ValueError(f"resume={resume!r}: {problem} (use resume=auto or resume=none)")
    return path


class StopRequest:
    """Turns SIGTERM / SIGINT (SLURM preemption, Ctrl-C) into a flag read at step boundaries.

    A second SIGINT interrupts at once, for a user who does not want to wait for the save.
    """

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning(f"received {signal.Signals(signum).name}: checkpointing at the end of this step")
