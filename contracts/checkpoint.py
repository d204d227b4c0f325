"""A training checkpoint directory and its manifest (format 1).

A checkpoint is `RUN/checkpoints/step_NNNNNNNN/` holding
- `model.safetensors`: the weights (safetensors: loading them runs no code);
- `optimizer.pt`: the optimizer state, loaded with `torch.load(weights_only=True)`;
- `trainer.json`: step, tokens seen, consecutive bad steps, the grad scaler's state, the
  resolved config, and the fingerprint a run must match to resume;
- `rank_NNNNN.pt`: each rank's RNG states (python, numpy, torch, CUDA) and data position;
- `manifest.json`, written last: SHA-256 and size of every other file.

Under `fsdp=true` the weights and optimizer state are sharded instead (torch.distributed.checkpoint):
`__R_0.distcp` holds rank R's slices and `.metadata` DCP's index of them, in place of
`model.safetensors` and `optimizer.pt`; `trainer.json` says `"sharded": true`.

Checkpoints are written into `step_NNNNNNNN.tmp/` and renamed when complete. A directory
without a manifest, or whose files do not match it, is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = 1
PREFIX = "step_"
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
WEIGHTS = "model.safetensors"
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int, fingerprint: dict) -> dict:
    """Write `manifest.json` over every other file of `directory`; returns it."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != MANIFEST)
    config_sha256 = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    manifest = {"format": FORMAT, "step": step, "config_sha256": config_sha256,
                "fingerprint": fingerprint,
                "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in files}}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_checkpoint(path: Path) -> str | None:
    """None if every file of the checkpoint matches its manifest, else what is wrong."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST}: the write did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        return f"{MANIFEST} is not valid JSON ({e})"
    for name, entry in manifest["files"].items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['bytes']}"
        if sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def write_trainer(directory: Path, sharded: bool, trainer: dict) -> None:
    (Path(directory) / TRAINER).write_text(
        json.dumps({"format": FORMAT, "sharded": sharded, **trainer}, indent=2))


def read_trainer(path: Path) -> dict:
    """trainer.json of a checkpoint: its step counters, config, fingerprint and `sharded`."""
    data = json.loads((Path(path) / TRAINER).read_text())
    data.setdefault("sharded", False)
    return data


def is_checkpoint_dir(path: Path) -> bool:
    return (Path(path) / TRAINER).is_file()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoint directories of a run, oldest first (in-progress `.tmp` excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and not p.name.endswith(".tmp"))
