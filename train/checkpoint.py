"""Checkpoints that resume bit-exactly, written atomically and verified before use.

The directory layout, the manifest, trainer.json and their verification are
`contracts.checkpoint`'s; this module holds the torch side: saving and loading the weights
(safetensors, or DCP shards under `fsdp=true`, `train/fsdp.py`, and under `parallel.pp` > 1,
where each rank writes its own stages; an FSDP run also resumes from safetensors, as a
tp x dp_shard run writes them), the optimizer state and each
rank's RNG states and data position, and the fingerprint a run must match to resume.

All ranks write into `step_NNNNNNNN.tmp/`, which the main rank renames once every file is on
disk. A directory without a manifest, or whose files do not match it, is not a checkpoint:
`latest_valid` reports it and falls back to the one before. The schedule is a pure function
of the step, so it needs no state of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from contracts.checkpoint import (
    PREFIX,
    WEIGHTS,
    checkpoint_dirs,
    checkpoint_name,
    read_trainer,
    verify_checkpoint,
    write_manifest,
    write_trainer,
)
from contracts.dataset import DatasetMeta
from contracts.run import RunDir
from model.transformer import Transformer
from train.fsdp import is_sharded, load_full, load_sharded, save_sharded
from train.load import refuse_unfused
from train.optim import param_groups
from train.parallel.pipeline import block_ranges, stage_ranges, stages_per_rank
from train.parallel.tensor import optimizer_names

log = logging.getLogger("train")
OPTIMIZER = "optimizer.pt"


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

    def __init__(self, out_dir: Path, keep: int, rank: int, barrier, state_rank: int | None = None,
                 saves_state: bool = True):
        """`state_rank`: the index this rank's RNG and data position are saved under (default
        `rank`; under tp/cp its data-parallel rank, written by one rank of those that share
        it: `saves_state`), so that another layout with as many data-parallel ranks reads them."""
        self.run_dir = Path(out_dir)
        self.root = RunDir(out_dir).checkpoints
        self.keep, self.rank, self.barrier = keep, rank, barrier
        self.state_rank = rank if state_rank is None else state_rank
        self.saves_state = saves_state
        self.last_save_s = 0.0  # how long the last save took: the time limit keeps room for one

    def save(self, step: int, model, optimizer, trainer: dict, rank_state: dict) -> Path:
        """Write checkpoint `step` from every rank; returns its final path."""
        started = time.monotonic()
        final = self.root / checkpoint_name(step)
        tmp = self.root / f"{checkpoint_name(step)}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        if self.saves_state:
            torch.save(rank_state, tmp / f"rank_{self.state_rank:05d}.pt")
        stages = pipelined(trainer)
        sharded = is_sharded(model) or stages
        if sharded:  # a collective: every rank writes its slices, rank 0 also DCP's .metadata
            save_sharded(tmp, model, optimizer, flat=stages)
        elif self.rank == 0:
            save_model(model, str(tmp / WEIGHTS))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        if self.rank == 0:
            write_trainer(tmp, sharded, trainer)
        self.barrier()
        if self.rank == 0:
            write_manifest(tmp, step, trainer["fingerprint"])
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune()
        self.barrier()
        self.last_save_s = time.monotonic() - started
        return final

    def consolidate(self, step: int, model) -> Path | None:
        """Add `model`'s unsharded weights to checkpoint `step` (the last of an FSDP run) as
        model.safetensors, and its manifest over them: the pickle-free copy of a sharded
        checkpoint that generate and export read (main rank). None if there is no such
        checkpoint, or it does not verify."""
        path = self.root / checkpoint_name(step)
        if not path.is_dir() or verify_checkpoint(path) is not None:
            return None
        tmp = path / f"{WEIGHTS}.tmp"
        save_model(model, str(tmp))
        os.replace(tmp, path / WEIGHTS)
        write_manifest(path, step, read_trainer(path)["fingerprint"])
        return path

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
        return checkpoint_dirs(self.run_dir)

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; invalid ones are reported."""
        for path in reversed(self.checkpoints()):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            log.warning(f"checkpoint {path} is unusable ({problem}); trying the one before")
        return None


def load(path: Path, model, optimizer, rank: int, expected_fingerprint: dict) -> tuple[dict, dict]:
    """Load weights and optimizer state into place; returns (trainer state, this rank's state;
    `rank`: its data-parallel index, the one its RNG and data position were saved under).

    Refuses, naming every difference, a checkpoint whose model, data, batch layout or
    data-parallel size differ from this run's: continuing from it would not be the same run.
    The pipeline layout may differ (`run_identity`): weights and AdamW state are keyed by
    parameter name and resharded onto this run's stages (or whole model), the counters, RNG
    and data position are the data-parallel rank's, so the run continues with the same state;
    its losses then follow the uninterrupted run within summation order, not bit for bit
    (another layout sums the loss and gradients in another order).
    """
    trainer = read_trainer(path)
    saved_fp = trainer["fingerprint"]
    diffs = fingerprint_differences(run_identity(saved_fp), run_identity(expected_fingerprint))
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run changed: " + "; ".join(diffs))
    sharded, stages = trainer["sharded"], pipelined(trainer)
    if saved_fp.get("pipeline") != expected_fingerprint.get("pipeline"):
        log.info(f"resuming {path}, written under {describe_layout(saved_fp)}, under "
                 f"{describe_layout(expected_fingerprint)}: weights and AdamW state resharded "
                 "by parameter name; the losses follow the same run within summation order")
    if sharded and not stages and not is_sharded(model):
        raise ValueError(f"cannot resume from {path}: it was written with fsdp=true, this run has "
                         "fsdp=false; resume with fsdp=true")
    if stages and is_sharded(model):
        raise ValueError(f"cannot resume from {path}: it was written under "
                         f"{describe_layout(saved_fp)}, this run has fsdp=true; a pipeline "
                         "checkpoint resumes under pp or in one process (fsdp=false)")
    if sharded:  # a collective: every rank reads its own slices (its own stages under pp)
        load_sharded(path, model, optimizer, flat=stages)
    elif "pipeline" in expected_fingerprint:  # whole (one process, tp, or pp before DCP)
        load_whole_into_stages(path, model, optimizer)
    elif is_sharded(model):  # whole tensors (one process, DDP, tp x dp_shard) into FSDP slices
        refuse_unfused(path / WEIGHTS)
        full = Transformer(model.cfg)
        load_model(full, str(path / WEIGHTS))
        load_full(model, optimizer, full.state_dict(), torch.load(path / OPTIMIZER, weights_only=True))
    else:
        refuse_unfused(path / WEIGHTS)  # a run saved before wqkv / w_gate_up (train/load.py)
        load_model(model, str(path / WEIGHTS))
        optimizer.load_state_dict(torch.load(path / OPTIMIZER, weights_only=True))
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{rank_file} is missing: the checkpoint was written by fewer ranks")
    return trainer, torch.load(rank_file, weights_only=True)


def load_whole_into_stages(path: Path, model: Transformer, optimizer) -> None:
    """A whole-model checkpoint (model.safetensors, and optimizer.pt keyed by index in the
    one-process optimizer's order, `train.optim.param_groups`) into a model cut down to its
    pipeline stages (`train.parallel.pipeline.keep_only`): its own parameters' weights and
    AdamW state, matched by name."""
    refuse_unfused(path / WEIGHTS)
    with torch.random.fork_rng(devices=[]):
        whole = Transformer(model.cfg)
    load_model(whole, str(path / WEIGHTS))
    saved = torch.load(path / OPTIMIZER, weights_only=True)
    whole_names = optimizer_names(whole, SimpleNamespace(param_groups=param_groups(whole, 0.0)))
    saved_count = sum(len(g["params"]) for g in saved["param_groups"])
    if saved_count != len(whole_names):
        raise ValueError(f"cannot resume from {path}: its {OPTIMIZER} holds {saved_count} "
                         f"parameters, the whole model has {len(whole_names)}")
    index = {name: i for i, name in enumerate(whole_names)}
    inner = getattr(optimizer, "optimizer", optimizer)
    groups, start = [], 0
    for saved_group, group in zip(saved["param_groups"], inner.param_groups, strict=True):
        groups.append({**saved_group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    state = {i: saved["state"][index[name]]
             for i, name in enumerate(optimizer_names(model, optimizer)) if index[name] in saved["state"]}
    weights = whole.state_dict()
    model.load_state_dict({name: weights[name] for name in model.state_dict()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def pipelined(trainer: dict) -> bool:
    """Whether a checkpoint's trainer state (or the one about to be written) is a pipelined
    run's (parallel.pp > 1), whose every rank holds and writes its own stages: DCP files,
    the optimizer state flattened by parameter name (`train.fsdp.save_sharded(flat=True)`)."""
    return "pipeline" in trainer["fingerprint"]


def pipeline_layout(cfg) -> dict:
    """A pipelined run's layout, which fixes the order of its sums: pp, schedule,
    micro-batches, and the blocks per stage where they are not the even split (the only one
    of runs written before `parallel.stage_split`, which then still resume)."""
    p = cfg.parallel
    layout = {k: getattr(p, k) for k in ("pp", "schedule", "microbatches")}
    n_stages = p.pp * stages_per_rank(p.schedule)
    blocks = [len(r) for r in stage_ranges(cfg.model, n_stages, p.stage_split)]
    if blocks != [len(r) for r in block_ranges(cfg.model.n_layer, n_stages)]:
        layout["blocks_per_stage"] = blocks
    return layout


def fingerprint(cfg, meta: DatasetMeta, world_size: int) -> dict:
    """What must not change for a resume to continue the same run exactly."""
    model = {k: v for k, v in vars(cfg.model).items() if k != "notes"}
    train = meta.splits["train"]
    pipeline = {"pipeline": pipeline_layout(cfg)} if cfg.parallel.pp > 1 else {}
    return {**pipeline,
        "model": model,
        "data": {"tokenizer_sha256": meta.tokenizer_sha256, "vocab_size": meta.vocab_size,
                 "dtype": meta.dtype, "train_tokens": train.get("tokens"),
                 "train_shards": train["shards"]},
        "seq_len": cfg.seq_len or cfg.model.seq_len,
        "batch_size": cfg.batch_size,
        "micro_batch_size": cfg.micro_batch_size,
        "world_size": world_size,
        "seed": cfg.seed,
        "mixed_precision": cfg.mixed_precision,
    }


def run_identity(fp: dict) -> dict:
    """The part of a fingerprint a resume must match: all of it but the pipeline layout, with
    the data-parallel replicas in place of `world_size` (which, for a pipelined run, counts
    the dp x pp processes): the replicas fix each rank's batches, the layout only the order of
    the sums."""
    pp = fp.get("pipeline", {}).get("pp", 1)
    same = {k: v for k, v in fp.items() if k not in ("pipeline", "world_size")}
    if "world_size" not in fp:  # a fingerprint without it compares on the rest
        return same
    return {**same, "data_parallel": fp["world_size"] // pp}


def describe_layout(fp: dict) -> str:
    """A fingerprint's pipeline layout in words, e.g. 'pp=2 1f1b microbatches=4 blocks per
    stage [2, 2]', or 'no pipeline'."""
    p = fp.get("pipeline")
    if p is None:
        return "no pipeline (pp=1)"
    blocks = p.get("blocks_per_stage") or [
        len(r) for r in block_ranges(fp["model"]["n_layer"], p["pp"] * stages_per_rank(p["schedule"]))]
    return f"pp={p['pp']} {p['schedule']} microbatches={p['microbatches']} blocks per stage {blocks}"


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


def log_changed_settings(saved: dict, cfg) -> None:
    """Log the settings that differ from the checkpoint's run (allowed: lr, steps, logging...)."""
    current = dataclasses.asdict(cfg)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key) and key not in ("resume",):
            log.info(f"resuming with changed setting {key}: {saved.get(key)!r} -> {current.get(key)!r}")


def resume_path(resume: str, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint to resume from: none, the newest valid one (auto), or a given directory."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpointer.latest_valid()
        existing = checkpointer.checkpoints()
        if found is None and existing:  # starting over would replace the run they belong to
            problems = "; ".join(f"{p.name}: {verify_checkpoint(p)}" for p in existing)
            raise ValueError(
                f"resume=auto: none of the {len(existing)} checkpoint(s) in {checkpointer.root} "
                f"verifies ({problems}); nothing was changed. Resume from a good copy with "
                "resume=DIR, or move them away to start over")
        if found is None:
            log.info(f"resume=auto: no checkpoint in {checkpointer.root}, starting fresh")
        return found
    path = Path(resume)
    problem = verify_checkpoint(path) if path.is_dir() else "no such directory"
    if problem:
        raise ValueError(f"resume={resume!r}: {problem} (use resume=auto or resume=none)")
    return path
