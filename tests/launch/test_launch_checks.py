"""The pieces of the launch checks: the process count a launcher asked for, the exit-code file,
and the parent-death watchdog."""

import os
import signal
import time

import pytest

from tests.utils import ROOT
from train import stop
from train.distributed import LaunchError, exit_status, launcher_command, requested_processes


def test_requested_processes_from_the_flag_or_the_config_file():
    assert requested_processes(["--num_processes", "2", "-m", "train", "x.yaml"]) == 2
    assert requested_processes(["--num-processes=3", "-m", "train"]) == 3
    ddp = str(ROOT / "launch/accelerate/cpu_ddp.yaml")
    assert requested_processes(["--config_file", ddp, "-m", "train"]) == 2
    assert requested_processes(["--config_file", ddp, "--num_processes", "4", "-m", "train"]) == 4
    assert requested_processes(["--config_file", "/nonexistent.yaml", "-m", "train"]) is None


def test_this_process_was_not_started_by_a_launcher():
    assert launcher_command(os.getpid()) is None  # pytest
    assert launcher_command(2**22 + 12345) is None  # no such process


def test_exit_status_writes_the_code_and_turns_a_launch_error_into_exit_2(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("TOKENCLOCK_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e, exit_status():
        raise SystemExit(75)
    assert e.value.code == 75 and (tmp_path / "rank_1").read_text() == "75\n"
    with pytest.raises(SystemExit) as e, exit_status():
        raise LaunchError("asked for 2, got 1")
    assert e.value.code == 2 and (tmp_path / "rank_1").read_text() == "2\n"
    assert capsys.readouterr().err == "error: asked for 2, got 1\n"


def test_parent_death_becomes_a_stop_request(monkeypatch):
    """A parent pid that is not (or no longer) this process's parent: the watchdog asks to stop,
    as SIGTERM would. With this process's real parent it does not."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(stop, "WATCH_INTERVAL_S", 0.01)
    try:
        alive = stop.StopRequest(parent=os.getppid())
        gone = stop.StopRequest(parent=2**22 + 12345)
        deadline = time.monotonic() + 10
        while gone.reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone.reason == "launcher died" and gone.signal == signal.SIGTERM
        assert alive.reason is None and alive.signal is None
        assert stop.StopRequest(parent=None).parent is None  # python -m train from a shell
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
