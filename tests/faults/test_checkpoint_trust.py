"""Reading a checkpoint or run directory checks its files first (issue 15 items 2 and 3).

A sharded (DCP) checkpoint's `.metadata` is a pickle: a crafted one runs code when unpickled,
so nothing may reach torch.distributed.checkpoint before the files matched their manifest.
A flipped byte in `model.safetensors` runs no code but changes the model: generate and export
must refuse it rather than answer with another model. Everything here is in-process or a
short CLI call (default tier).
"""

import dataclasses
import json
import pathlib
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from contracts.checkpoint import SHARDED_INDEX, write_manifest
from contracts.run import write_run_manifest
from model.transformer import Transformer
from tests.train.test_generate import CFG, make_run_dir, random_model
from tests.utils import run_cmd
from train.checkpoint import Checkpointer, resume_path
from train.config import TrainConfig
from train.fsdp import load_sharded
from train.load import load_run


class Payload:
    """Unpickling it touches `marker`: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def config_dict(tokenizer_dir: Path) -> dict:
    return dataclasses.asdict(TrainConfig(model=CFG, data_dir=str(tokenizer_dir), fsdp=True))


def crafted_checkpoint(root: Path, tiny_data: Path, manifest: str) -> tuple[Path, Path]:
    """RUN/checkpoints/step_00000010/ claiming to be sharded, whose `.metadata` is a Payload;
    manifest: "none", "stale" (written before .metadata was swapped), "unlisted" (written
    before .metadata existed) or "forged" (written over the crafted files: it matches them).
    Returns (checkpoint, marker)."""
    run = root / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_data / "tokenizer.json", run / "tokenizer.json")
    trainer = {"format": 1, "sharded": True, "step": 10, "config": config_dict(tiny_data),
               "fingerprint": {}}
    (ckpt / "trainer.json").write_text(json.dumps(trainer))
    marker = root / "payload_ran"
    if manifest == "unlisted":
        write_manifest(ckpt, 10, {})
    if manifest == "stale":
        (ckpt / SHARDED_INDEX).write_bytes(b"an honest index")
        write_manifest(ckpt, 10, {})
    (ckpt / SHARDED_INDEX).write_bytes(pickle.dumps(Payload(marker)))
    if manifest == "forged":
        write_manifest(ckpt, 10, {})
    return ckpt, marker


def test_the_payload_is_live(tmp_path):
    """The crafted .metadata does run its payload when unpickled: the tests below mean something."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").is_file()


@pytest.mark.parametrize("manifest", ["none", "stale", "unlisted"])
def test_crafted_sharded_checkpoint_is_refused_before_unpickling(tmp_path, tiny_data, manifest):
    ckpt, marker = crafted_checkpoint(tmp_path, tiny_data, manifest)
    expected = {"none": "no manifest.json", "stale": r"\.metadata (does not match|has \d+ bytes)",
                "unlisted": ".metadata is not listed in manifest.json"}[manifest]
    with pytest.raises(ValueError, match=expected):
        load_run(ckpt)
    model = Transformer(CFG)  # FSDP resume's loader and resume=PATH refuse it too
    with pytest.raises(ValueError, match=expected):
        load_sharded(ckpt, model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match=expected):
        resume_path(str(ckpt), Checkpointer(tmp_path / "run", 0, 0, lambda: None))
    assert not marker.exists()


def cli(*args: str):
    return run_cmd([sys.executable, *args], check=False)


def assert_one_line_refusal(result, names: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load"), result.stderr
    assert names in lines[0]


@pytest.mark.slow  # two CLIs on a 2-rank FSDP run's checkpoint: 9 s: the default tier stays under 3 minutes
def test_generate_and_export_refuse_a_crafted_sharded_checkpoint(tmp_path, tiny_data):
    ckpt, marker = crafted_checkpoint(tmp_path / "a", tiny_data, "none")
    assert_one_line_refusal(cli("-m", "train.generate", str(ckpt), "--threads", "1"),
                            "manifest.json")
    assert_one_line_refusal(cli("-m", "train.export", str(ckpt), str(tmp_path / "hf")),
                            "manifest.json")
    stale, stale_marker = crafted_checkpoint(tmp_path / "b", tiny_data, "stale")
    assert_one_line_refusal(cli("-m", "train.generate", str(stale), "--threads", "1"), ".metadata")
    assert_one_line_refusal(cli("-m", "train.export", str(stale), str(tmp_path / "hf")),
                            ".metadata")
    assert not marker.exists() and not stale_marker.exists() and not (tmp_path / "hf").exists()


def real_checkpoint(root: Path, tiny_data: Path) -> Path:
    """A checkpoint as training writes it (Checkpointer.save, one process, unsharded)."""
    run = root / "run"
    run.mkdir(parents=True)
    shutil.copy(tiny_data / "tokenizer.json", run / "tokenizer.json")
    model = random_model()
    config = dataclasses.asdict(TrainConfig(model=CFG, data_dir=str(tiny_data)))
    trainer = {"step": 10, "tokens": 0, "config": config, "fingerprint": {"seed": 0}}
    return Checkpointer(run, 0, 0, lambda: None).save(
        10, model, torch.optim.AdamW(model.parameters()), trainer, {"step": 10})


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # in the tensor data: safetensors still parses it, as a different model
    path.write_bytes(bytes(data))


def test_generate_and_export_refuse_a_flipped_byte_in_a_checkpoint(tmp_path, tiny_data):
    ckpt = real_checkpoint(tmp_path, tiny_data)
    assert torch.equal(load_run(ckpt).model.tok_emb.weight, random_model().tok_emb.weight)
    flip_a_byte(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256"):
        load_run(ckpt)
    assert_one_line_refusal(cli("-m", "train.generate", str(ckpt), "--threads", "1"),
                            "model.safetensors")
    assert_one_line_refusal(cli("-m", "train.export", str(ckpt), str(tmp_path / "hf")),
                            "model.safetensors")
    assert not (tmp_path / "hf").exists()


def test_a_run_dir_with_a_manifest_is_verified(tmp_path, tiny_data):
    """A finished run's manifest.json (written last by the trainer) covers the files generate
    and export read; a run directory without one (written before it existed) still loads."""
    run = make_run_dir(tmp_path / "run", random_model(), tiny_data / "tokenizer.json")
    load_run(run)
    write_run_manifest(run)
    load_run(run)
    flip_a_byte(run / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256"):
        load_run(run)
    assert_one_line_refusal(cli("-m", "train.export", str(run), str(tmp_path / "hf")),
                            "model.safetensors")
    assert not (tmp_path / "hf").exists()


def test_a_forged_manifest_no_longer_lets_a_pickle_run(tmp_path, tiny_data):
    """A manifest written over the crafted files matches them: the check that catches
    corruption cannot catch this. generate and export now refuse any sharded checkpoint
    without consolidated safetensors, in one line naming the risk and the flag; only
    --trust-pickle (a user who wrote the checkpoint) reads its DCP files."""
    ckpt, marker = crafted_checkpoint(tmp_path, tiny_data, "forged")
    with pytest.raises(ValueError, match=r"\.metadata is a pickle, which can run code .*--trust-pickle"):
        load_run(ckpt)
    for args in (["-m", "train.generate", str(ckpt), "--threads", "1"],
                 ["-m", "train.export", str(ckpt), str(tmp_path / "hf")]):
        assert_one_line_refusal(cli(*args), "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "hf").exists()
    # The flag does what it says: DCP unpickles the payload, which returns no index, so the
    # read then fails (where depends on which DCP call reads .metadata first).
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises((AttributeError, CheckpointException)):
        load_run(ckpt, trust_pickle=True)
    assert marker.exists()


def test_a_consolidated_sharded_checkpoint_loads_without_pickle(tmp_path, tiny_data):
    """The last checkpoint of a finished FSDP run holds model.safetensors beside its shards
    (Checkpointer.consolidate): generate and export read that, no flag needed, whatever the
    DCP files hold."""
    ckpt, marker = crafted_checkpoint(tmp_path, tiny_data, "forged")
    (ckpt / "trainer.json").write_text(json.dumps({**json.loads((ckpt / "trainer.json").read_text()),
                                                   "fingerprint": {"seed": 0}}))
    write_manifest(ckpt, 10, {"seed": 0})
    model = random_model()
    assert Checkpointer(tmp_path / "run", 0, 0, lambda: None).consolidate(10, model) == ckpt
    assert "model.safetensors" in json.loads((ckpt / "manifest.json").read_text())["files"]
    loaded = load_run(ckpt)
    assert torch.equal(loaded.model.tok_emb.weight, model.tok_emb.weight)
    assert not marker.exists()
    export = cli("-m", "train.export", str(ckpt), str(tmp_path / "hf"))
    assert export.returncode == 0, export.stderr
    assert not marker.exists()
