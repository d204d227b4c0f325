"""The run directory: one run at a time (run.lock), no silent restart over an earlier run, and a
full or read-only disk reported in one line naming the path (issue 22, items 1, 2 and 8)."""

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from contracts import lock
from contracts.cli import DEBUG_ENV, NoSpace, NotWritable
from contracts.run import RunDir
from tests.faults.test_config_faults import TRAIN_CONFIG, _one_error_line
from tests.utils import ROOT
from train.checkpoint import Checkpointer, resume_path
from train.rundir import set_aside_earlier_run

HOLD = ("import sys, time; from contracts import lock; lock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding run_dir's lock, as a live run does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_lock_is_refused_naming_the_holder_and_a_dead_ones_is_not(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(lock.LockHeld) as refused:
            lock.acquire(run_dir)
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message, message
        assert message.startswith(f"{run_dir} is in use by another run") and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without a chance to clean up
        holder.wait()
    assert (run_dir / lock.LOCK).is_file()  # the dead run's lock file is still there...
    assert lock.acquire(run_dir) == (run_dir / lock.LOCK).resolve()  # ...and does not block
    assert json.loads((run_dir / lock.LOCK).read_text())["pid"] == os.getpid()
    lock.release(run_dir)
    assert (run_dir / lock.LOCK).read_text() == ""


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch):
    """On a filesystem without flock: a dead pid on this host is stale, a live one holds it,
    and a holder on another host is trusted to be alive (the message says how to clear it)."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = run_dir / lock.LOCK
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    lock.acquire(run_dir)
    lock.release(run_dir)
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                "started": "x"}))
    with pytest.raises(lock.LockHeld, match=f"pid {os.getppid()} on host"):
        lock.acquire(run_dir)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(lock.LockHeld, match="on another host .*if that run is dead, delete"):
        lock.acquire(run_dir)


def fake_checkpoints(run_dir: Path) -> list[Path]:
    """Two checkpoints that do not verify: one without a manifest, one with a changed file."""
    from contracts.checkpoint import write_manifest

    root = RunDir(run_dir).checkpoints
    unfinished, tampered = root / "step_00000003", root / "step_00000006"
    for path in (unfinished, tampered):
        path.mkdir(parents=True)
        (path / "trainer.json").write_text("{}")
    write_manifest(tampered, 6, {})
    (tampered / "trainer.json").write_text('{"step": 999}')
    return [unfinished, tampered]


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_auto_refuses_when_no_checkpoint_verifies(tmp_path):
    run_dir = tmp_path / "run"
    fake_checkpoints(run_dir)
    before = tree_digest(run_dir)
    with pytest.raises(ValueError) as refused:
        resume_path("auto", Checkpointer(run_dir, 3, 0, lambda: None))
    message = str(refused.value)
    assert "none of the 2 checkpoint(s)" in message and "\n" not in message
    assert "step_00000003: no manifest.json" in message
    assert "step_00000006: trainer.json has" in message
    assert tree_digest(run_dir) == before  # nothing changed
    assert resume_path("auto", Checkpointer(tmp_path / "empty", 3, 0, lambda: None)) is None


def test_a_fresh_run_sets_an_earlier_run_aside(tmp_path):
    run = RunDir(tmp_path / "run")
    fake_checkpoints(run.root)
    run.metrics.write_text('{"step": 0}\n')
    (run.root / "config.yaml").write_text("kept: true\n")
    before = tree_digest(run.root)
    moved = set_aside_earlier_run(run)
    assert moved.parent == run.root / "earlier_runs"
    assert not run.metrics.exists() and not run.checkpoints.exists()
    assert tree_digest(moved) == {k: v for k, v in before.items() if k != "config.yaml"}
    assert set_aside_earlier_run(run) is None  # nothing left to set aside


@pytest.fixture
def tmpfs(tmp_path):
    """A real 256 KiB filesystem (tmpfs), unmounted afterwards; skipped where mounting one is
    not allowed (not root, or no mount in the container)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> None:
    """Write until the filesystem is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_full_disk_during_a_metrics_append_names_the_file(tmpfs):
    from train.metrics import MetricsLog

    metrics = MetricsLog(tmpfs / "metrics.jsonl", True, None, None)
    metrics.write({"step": 0, "val_loss": 1.0})
    fill(tmpfs)
    with pytest.raises(NoSpace, match=f"^no space left on device: {tmpfs / 'metrics.jsonl'}"):
        metrics.write({"step": 1, "loss": 1.0, "note": "x" * 8192})


def _train(tiny_data, out, *overrides) -> int:
    from train.__main__ import main

    return main([TRAIN_CONFIG, f"data_dir={tiny_data}", f"out_dir={out}", "tracker=none",
                 "steps=4", "eval_every=2", "eval_batches=1", "sample_tokens=4", *overrides])


def test_out_dir_on_a_read_only_filesystem_is_one_line(tmpfs, tiny_data, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert _train(tiny_data, tmpfs / "run") == 2
    _one_error_line(capsys.readouterr().err, f"cannot write to {tmpfs / 'run'}",
                    "Read-only file system")
    with pytest.raises(NotWritable):  # the same from the lock alone, an existing directory
        from train.rundir import disk_space

        with disk_space(tmpfs, 1):
            lock.acquire(tmpfs)


def test_resume_auto_over_tampered_checkpoints_refuses_and_changes_nothing(tiny_data, tmp_path,
                                                                          capsys, monkeypatch):
    """Every checkpoint tampered with: resume=auto used to start again at step 0, exit 0,
    replace metrics.jsonl and overwrite the checkpoints. Now: one line naming them, exit 2."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    out = tmp_path / "run"
    assert _train(tiny_data, out, "checkpoint_every=2") == 0
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000004"]
    for path in checkpoints:
        trainer = path / "trainer.json"
        trainer.write_text(trainer.read_text().replace('"step": ', '"step": 1'))
    capsys.readouterr()
    before = tree_digest(out)
    assert _train(tiny_data, out, "checkpoint_every=2", "resume=auto") == 2
    err = capsys.readouterr().err
    _one_error_line(err, "resume=auto: none of the 2 checkpoint(s)", "step_00000002: trainer.json",
                    "step_00000004: trainer.json", "nothing was changed")
    after = tree_digest(out)
    assert {k: v for k, v in after.items() if k != lock.LOCK} == \
        {k: v for k, v in before.items() if k != lock.LOCK}
