"""Fault tolerance: exact resume (DDP and FSDP2) after SIGKILL, SIGTERM, corrupt checkpoints,
NaNs, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from model.config import get_preset
from model.transformer import Transformer
from tests.utils import ROOT, run_cmd
from train.checkpoint import Checkpointer, load
from train.load import load_run

# Real training subprocesses: `make test-slow` (CI runs both tiers).
pytestmark = pytest.mark.slow

STEPS = 16
COMMON = ["configs/train/tiny.yaml", f"steps={STEPS}", "checkpoint_every=3", "eval_every=8",
          "keep_checkpoints=2"]


def train_args(data, out, *overrides):
    return [sys.executable, "-m", "train", *COMMON, f"data_dir={data}", f"out_dir={out}", *overrides]


def launch_args(data, out, *overrides):
    return ["launch/cpu.sh", *COMMON, f"data_dir={data}", f"out_dir={out}", *overrides]


def summary(out):
    return json.loads((out / "summary.json").read_text())


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def start(args, env=None):
    return subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})}, start_new_session=True,
    )


def wait_for_step(out, step, proc, timeout=120):
    """Block until metrics.jsonl has `step` (the run is then at a random point of step+1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and step in [json.loads(x)["step"] for x in path.read_text().splitlines()
                                        if x.endswith("}")]:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_run(proc):
    """SIGKILL a run: the launcher first (so it cannot signal the ranks), then every process it
    started. torchrun starts each rank in a session of its own, so killing the launcher's
    process group alone would leave the ranks training on."""
    launcher = psutil.Process(proc.pid)
    ranks = launcher.children(recursive=True)
    for p in (launcher, *ranks):
        p.kill()
    psutil.wait_procs(ranks, timeout=30)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted single-process run of the same length."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cmd(train_args(tiny_data, out))
    return summary(out)


def test_sigkill_at_random_step_then_resume_is_bit_exact(tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    kill_after = random.randint(4, STEPS - 3)
    proc = start(train_args(tiny_data, out))
    wait_for_step(out, kill_after, proc)
    kill_run(proc)
    assert not (out / "summary.json").exists()
    result = run_cmd(train_args(tiny_data, out, "resume=auto"))
    assert "resumed from" in result.stderr
    assert summary(out)["rank_weight_sha256"] == reference["rank_weight_sha256"], kill_after
    assert steps_logged(out) == list(range(STEPS + 1)), kill_after
    assert summary(out)["final_val_loss"] == reference["final_val_loss"]


@pytest.mark.parametrize("tail", [b'{"step": 99, "loss": 1.2', b'{"step": 99, "note": "\xe2\x82\xff'])
def test_torn_last_metrics_line_does_not_block_resume(tiny_data, tmp_path, reference, tail):
    """A crash or a full disk mid-append leaves half a record at the end of metrics.jsonl (cut
    JSON, or bytes that are not UTF-8): the resume warns, drops it and ends bit-identical,
    every step logged once."""
    out = tmp_path / "run"
    kill_after = random.randint(4, STEPS - 3)
    proc = start(train_args(tiny_data, out))
    wait_for_step(out, kill_after, proc)
    kill_run(proc)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(tail)  # half a record, no newline
    result = run_cmd(train_args(tiny_data, out, "resume=auto"))
    assert "last line is torn" in result.stderr and "resumed from" in result.stderr
    assert summary(out)["rank_weight_sha256"] == reference["rank_weight_sha256"], kill_after
    assert steps_logged(out) == list(range(STEPS + 1)), kill_after


def test_two_process_sigkill_then_resume_is_bit_exact(tiny_data, tmp_path):
    env = {"NPROC": "2", "PY": sys.executable}
    ref = tmp_path / "ref"
    run_cmd(launch_args(tiny_data, ref), env=env)
    out = tmp_path / "run"
    kill_after = random.randint(4, STEPS - 3)
    proc = start(launch_args(tiny_data, out), env=env)
    wait_for_step(out, kill_after, proc)
    kill_run(proc)  # the launcher and both ranks
    result = run_cmd(launch_args(tiny_data, out, "resume=auto"), env=env)
    assert "resumed from" in result.stderr and f"at step {STEPS}" not in result.stderr, kill_after
    resumed = summary(out)["rank_weight_sha256"]
    assert len(resumed) == 2 and resumed == summary(ref)["rank_weight_sha256"], kill_after
    assert steps_logged(out) == list(range(STEPS + 1))


def test_fsdp_sigkill_then_resume_past_a_corrupt_checkpoint_is_bit_exact(tiny_data, tmp_path):
    """FSDP2 over 2 processes: each checkpoint holds the DCP shards (one file per rank) beside
    the same trainer state and manifest. A run killed at a random step, whose newest checkpoint
    is then corrupted, resumes from the one before and ends bit-identical to an uninterrupted
    run: the world size is the same, so each rank reads back exactly the slices it wrote and
    DCP reshards nothing."""
    env = {"NPROC": "2", "PY": sys.executable}
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_cmd(launch_args(tiny_data, ref, "fsdp=true"), env=env)
    kill_after = random.randint(7, STEPS - 3)  # at least two finished checkpoints (3 and 6)
    proc = start(launch_args(tiny_data, out, "fsdp=true"), env=env)
    wait_for_step(out, kill_after, proc)
    kill_run(proc)
    *_, before, newest = Checkpointer(out, 0, 0, None).checkpoints()
    files = {p.name for p in newest.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank_00001.pt", "manifest.json"} <= files
    assert "model.safetensors" not in files and json.loads((newest / "trainer.json").read_text())["sharded"]
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_cmd(launch_args(tiny_data, out, "fsdp=true", "resume=auto"), env=env)
    assert f"{newest.name} is unusable (__1_0.distcp has" in result.stderr, kill_after
    assert f"resumed from {before} at step {int(before.name.split('_')[1])}" in result.stderr
    assert summary(out)["rank_weight_sha256"] == summary(ref)["rank_weight_sha256"], kill_after
    assert summary(out)["techniques"]["fsdp"] is True
    trail = [{k: r.get(k) for k in ("step", "loss", "grad_norm", "val_loss")}
             for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert trail == [{k: r.get(k) for k in ("step", "loss", "grad_norm", "val_loss")}
                     for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())]
    assert [r["step"] for r in trail] == list(range(STEPS + 1))
    # the final sharded checkpoint loads in one process (generate, export) as the final weights
    final = load_run(out / "checkpoints" / f"step_{STEPS:08d}").model.state_dict()
    for name, tensor in load_run(out).model.state_dict().items():
        assert torch.equal(final[name], tensor), name


def test_sharded_and_unsharded_checkpoints_are_not_mixed(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=512))
    (tmp_path / "trainer.json").write_text(json.dumps({"fingerprint": {}, "sharded": True}))
    with pytest.raises(ValueError, match="written with fsdp=true, this run has fsdp=false"):
        load(tmp_path, model, torch.optim.AdamW(model.parameters()), 0, {})


def test_sigterm_checkpoints_and_exits_75(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = start(train_args(tiny_data, out, "steps=100000", "checkpoint_every=0"))
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "manifest.json").is_file()
    stopped_at = int(checkpoints[0].name.split("_")[1])
    result = run_cmd(train_args(tiny_data, out, f"steps={stopped_at + 2}", "resume=auto"))
    assert f"at step {stopped_at}" in result.stderr
    assert "changed setting steps" in result.stderr  # a new step budget is allowed and logged
    assert steps_logged(out) == list(range(stopped_at + 3))


def test_truncated_newest_checkpoint_falls_back(tiny_data, tmp_path, reference):
    out = tmp_path / "run"
    run_cmd(train_args(tiny_data, out, "keep_checkpoints=3"))  # keeps steps 12, 15 and 16
    weights = out / "checkpoints" / "step_00000016" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (out / "checkpoints" / "step_00000017.tmp").mkdir()  # as left by a crash during a save
    result = run_cmd(train_args(tiny_data, out, "keep_checkpoints=3", "resume=auto"))
    assert "step_00000016 is unusable (model.safetensors has" in result.stderr
    assert "at step 15" in result.stderr
    assert summary(out)["rank_weight_sha256"] == reference["rank_weight_sha256"]
    assert steps_logged(out) == list(range(STEPS + 1))
    assert not (out / "checkpoints" / "step_00000017.tmp").exists()


def test_nan_step_is_skipped_and_counted(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_cmd(train_args(tiny_data, out, "inject_nan_at_steps=[5]"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[5]["skipped"] is True and not any(r.get("skipped") for r in records[6:])
    assert summary(out)["skipped_steps"] == 1
    assert "step 5: non-finite loss or gradient, update skipped" in result.stderr
    assert np.isfinite(summary(out)["final_val_loss"])


def test_too_many_bad_steps_stop_the_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_cmd(train_args(tiny_data, out, "inject_nan_at_steps=[7,8,9]", "max_bad_steps=3"),
                     check=False)
    assert result.returncode != 0
    assert "3 non-finite steps in a row (up to step 9)" in result.stderr
    assert "step_00000006" in result.stderr  # the last good checkpoint is kept and named
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step_00000006"


def test_resume_with_another_model_shape_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_cmd(train_args(tiny_data, out, "steps=3"))
    result = run_cmd(train_args(tiny_data, out, "resume=auto", "model.n_layer=3"), check=False)
    assert result.returncode != 0
    assert "the run changed: model.n_layer: 2 -> 3" in result.stderr


def test_bad_data_directories_are_reported(tiny_data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(tiny_data, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["vocab_size"] += 7
    (bad / "meta.json").write_text(json.dumps(meta))
    result = run_cmd(train_args(bad, tmp_path / "r1"), check=False)
    assert "the tokenizer does not belong to these shards" in result.stderr
    shutil.rmtree(bad)
    shutil.copytree(tiny_data, bad)
    (bad / "val_000000.bin").unlink()
    result = run_cmd(train_args(bad, tmp_path / "r2"), check=False)
    assert "val_000000.bin listed in meta.json is missing" in result.stderr
    result = run_cmd(train_args(tiny_data, tmp_path / "r3", "micro_batch_size=4096",
                                "batch_size=4096"), check=False)
    assert "too few for micro_batch_size=4096" in result.stderr


def test_time_limit_checkpoints_and_exits_75(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_cmd(train_args(tiny_data, out, "steps=100000", "checkpoint_every=0",
                                "time_limit_s=3"), check=False)
    assert result.returncode == 75, result.stderr
    assert "(time limit); resume with resume=auto" in result.stderr
    assert len(list((out / "checkpoints").iterdir())) == 1
