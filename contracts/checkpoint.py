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
`model.safetensors` and `optimizer.pt`; `trainer.json` says `"sharded": true`. DCP's
`.metadata` is a pickle: loading it can run code, so nothing reads a checkpoint's weights before
`check_loadable` has matched every file against the manifest (and found no DCP file the manifest
does not list). The manifest guards against corruption, not against a forger: whoever can write
the files can write a manifest that matches them (docs/faults.md, "Trusting a checkpoint"), so
generate and export read DCP files only when told to trust them (--trust-pickle). At the end of
an FSDP run its last checkpoint also gets the unsharded weights as `model.safetensors`
(consolidated), which they read instead.

Checkpoints are written into `step_NNNNNNNN.tmp/` and renamed when complete. A directory
without a manifest, or whose files do not match it, is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = 1
PREFIX = "step_"
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
WEIGHTS = "model.safetensors"
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint
DCP_SUFFIXES = (".metadata", ".distcp")  # files torch.distributed.checkpoint may read (pickles)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int | None = None, fingerprint: dict | None = None,
                   names: list[str] | None = None) -> dict:
    """Write `manifest.json` over `names` (default: every other file of `directory`); returns
    it. A checkpoint's manifest also records its step and fingerprint."""
    directory = Path(directory)
    if names is None:
        names = [p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST]
    manifest: dict = {"format": FORMAT}
    if step is not None:
        manifest["step"] = step
    if fingerprint is not None:
        manifest["config_sha256"] = hashlib.sha256(
            json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        manifest["fingerprint"] = fingerprint
    manifest["files"] = {name: {"sha256": sha256_file(directory / name),
                                "bytes": (directory / name).stat().st_size}
                         for name in sorted(names)}
    tmp = directory / f"{MANIFEST}.tmp"  # replaced whole: a crash leaves the old or the new one
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(the manifest's `files` entries, None), or (None, what is wrong with manifest.json)."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return None, f"no {MANIFEST}: the write did not finish"
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and {"sha256", "bytes"} <= e.keys() for e in files.values()):
            raise TypeError
    except json.JSONDecodeError as e:
        return None, f"{MANIFEST} is not valid JSON ({e})"
    except (KeyError, TypeError):
        return None, f"{MANIFEST} has no valid 'files' table of sha256 and bytes"
    return files, None


def verify_checkpoint(path: Path) -> str | None:
    """None if every file of the checkpoint matches its manifest, else what is wrong, naming
    the file. A DCP file (`.metadata`, `*.distcp`) the manifest does not list is wrong too:
    torch.distributed.checkpoint would read it."""
    files, problem = read_manifest(path)
    if problem:
        return problem
    for name, entry in files.items():
        file = Path(path) / name
        if Path(name).name != name or not file.is_file():  # a manifest names files, not paths
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['bytes']}"
        if sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    for p in sorted(Path(path).iterdir()):
        if p.name.endswith(DCP_SUFFIXES) and p.name not in files:
            return f"{p.name} is not listed in {MANIFEST}"
    return None


def check_loadable(path: Path, weights: str) -> None:
    """Raise ValueError (one line, naming the file) unless every file of directory `path`
    matches its manifest and the manifest lists `weights`, the file about to be read (WEIGHTS,
    or SHARDED_INDEX for DCP). Called before any checkpoint's weights are loaded."""
    problem = verify_checkpoint(path)
    if problem is None and weights not in read_manifest(path)[0]:
        problem = f"{weights} is not listed in {MANIFEST}"
    if problem:
        raise ValueError(f"refusing to load {path}: {problem} (a checkpoint is loaded only when "
                         f"its files match the {MANIFEST} written with them)")


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
