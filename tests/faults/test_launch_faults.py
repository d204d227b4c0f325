"""Launch faults: a launch that starts fewer processes than asked for, a launcher killed under
its ranks, and SIGTERM/SIGINT to the launch script (which must exit 75, as documented)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.faults.test_train_faults import launch_args, wait_for_step
from tests.utils import ROOT, run_cmd

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.mark.slow  # an accelerate launch: 5 s: the default tier stays under 3 minutes
def test_accelerate_launch_without_multi_gpu_is_refused(tiny_data, tmp_path):
    """`accelerate launch --num_processes 2` on a CPU host starts ONE process: refused with one
    line saying how to start 2, instead of training alone with exit code 0."""
    result = run_cmd([ACCELERATE, "launch", "--num_processes", "2", "-m", "train",
                      "configs/train/tiny.yaml", f"data_dir={tiny_data}",
                      f"out_dir={tmp_path / 'run'}", "steps=1"], check=False, timeout=300)
    assert result.returncode != 0
    line = ("error: accelerate launch was asked for --num_processes 2 but started 1 process "
            "(without --multi_gpu it starts only one). For 2 CPU processes run "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m train CONFIG, "
            "or NPROC=2 launch/cpu.sh CONFIG")
    assert line in result.stderr.splitlines(), result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def _as_a_foreground_job() -> None:
    """SIGINT and SIGQUIT at their defaults, as a terminal's foreground job has them. A test run
    started in the background (`pytest ... &`, `nohup`) inherits them ignored, and bash cannot
    trap a signal that was ignored when it started: the script would never see the SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def start_script(args, log, nproc):
    """Start launch/cpu.sh with its output in a file (a pipe nobody reads could fill up)."""
    return subprocess.Popen(
        args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_as_a_foreground_job,
        env={**os.environ, "WANDB_MODE": "disabled", "NPROC": str(nproc), "PY": sys.executable},
    )


def wait_for(out, step, script, log):
    """wait_for_step for a script whose output goes to the file `log`."""
    script.stdout = open(log)  # read by wait_for_step when the run ends early
    wait_for_step(out, step, script)


def launcher_and_ranks(script: subprocess.Popen, nproc: int):
    """The accelerate process under the script, and its rank processes once all have started."""
    script_proc = psutil.Process(script.pid)  # the script, or the launcher it exec'd into
    launcher = next(p for p in (script_proc, *script_proc.children(recursive=True))
                    if "launch" in p.cmdline())
    ranks = [p for p in launcher.children() if "train" in p.cmdline()]
    assert len(ranks) == nproc, [p.cmdline() for p in ranks]
    return launcher, ranks


def finished_checkpoints(out):
    return [p for p in sorted((out / "checkpoints").iterdir()) if (p / "manifest.json").is_file()]


def kill_leftovers(script, procs):
    for p in procs:
        if p.is_running():
            p.kill()
    if script.poll() is None:
        os.killpg(script.pid, signal.SIGKILL)
    script.wait()


@pytest.mark.slow
def test_ranks_stop_when_their_launcher_is_killed(tiny_data, tmp_path):
    """SIGKILL to accelerate's process alone: the ranks notice their parent is gone, checkpoint
    at the end of the step and exit 75, instead of training on to the end unwatched."""
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        script = start_script(launch_args(tiny_data, out, "steps=100000", "checkpoint_every=0"),
                              log, 2)
    ranks: list[psutil.Process] = []
    try:
        wait_for(out, 2, script, tmp_path / "log")
        launcher, ranks = launcher_and_ranks(script, 2)
        launcher.kill()
        _, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, (tmp_path / "log").read_text()
        assert script.wait(timeout=60) == 75, (tmp_path / "log").read_text()
        assert len(finished_checkpoints(out)) == 1
        assert "the launcher (pid" in (tmp_path / "log").read_text()
    finally:
        kill_leftovers(script, ranks)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), (2, signal.SIGTERM),
                                        (2, signal.SIGINT)])
def test_signal_to_the_launch_script_exits_75(tiny_data, tmp_path, nproc, sig):
    """SIGTERM (SLURM, `kill`) or SIGINT (Ctrl-C) to launch/cpu.sh: one checkpoint, exit code 75
    from the script itself, and no SignalException traceback from accelerate; with 2 ranks no
    traceback and no ChildFailedError report from torchrun either (it was 20 lines)."""
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        script = start_script(launch_args(tiny_data, out, "steps=100000", "checkpoint_every=0"),
                              log, nproc)
    ranks: list[psutil.Process] = []
    try:
        wait_for(out, 2, script, tmp_path / "log")
        _, ranks = launcher_and_ranks(script, nproc)
        script.send_signal(sig)
        rc = script.wait(timeout=120)
        text = (tmp_path / "log").read_text()
        assert rc == 75, text
        assert "every rank checkpointed and stopped (exit 75)" in text
        assert "SignalException" not in text
        assert "Traceback" not in text and "ChildFailedError" not in text, text
        assert "FAILED" not in text and "torch/distributed/elastic" not in text, text
        assert len(finished_checkpoints(out)) == 1
    finally:
        kill_leftovers(script, ranks)


def script_output(args, nproc, timeout=300):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_as_a_foreground_job,
                          env={**os.environ, "WANDB_MODE": "disabled", "NPROC": str(nproc),
                               "PY": sys.executable})


def lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


@pytest.mark.slow
def test_a_config_error_through_the_launch_script_is_one_line(tiny_data, tmp_path):
    """Every rank finds the bad value: the user sees its one line once, and exit code 2 (it was
    45 lines: each rank's line, torchrun's log lines, accelerate's traceback and the report)."""
    result = script_output(launch_args(tiny_data, tmp_path / "run", "optim.lr=-1"), 2)
    assert result.returncode == 2, result.stderr
    assert lines(result.stdout + result.stderr) == ["error: optim.lr must be > 0, got -1.0"], \
        result.stderr


@pytest.mark.slow
def test_sigkill_of_the_launch_script_stops_the_ranks(tiny_data, tmp_path):
    """`timeout -s KILL` (or any SIGKILL) of launch/cpu.sh: the launcher dies with it, and the
    ranks checkpoint and stop, instead of training on to the end, orphaned."""
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        script = start_script(launch_args(tiny_data, out, "steps=100000", "checkpoint_every=0"),
                              log, 2)
    ranks: list[psutil.Process] = []
    try:
        wait_for(out, 2, script, tmp_path / "log")
        launcher, ranks = launcher_and_ranks(script, 2)
        os.kill(script.pid, signal.SIGKILL)  # the script alone
        script.wait()
        _, alive = psutil.wait_procs([launcher, *ranks], timeout=120)
        assert not alive, (tmp_path / "log").read_text()
        assert len(finished_checkpoints(out)) == 1, (tmp_path / "log").read_text()
        assert not (out / "summary.json").exists()
    finally:
        kill_leftovers(script, ranks)


@pytest.mark.slow
def test_a_second_run_on_a_live_directory_is_refused_and_a_dead_ones_lock_is_not(tiny_data,
                                                                                 tmp_path):
    """Two 2-rank runs on one out_dir: the second is refused in one line naming the first's
    rank 0 (pid, host) and changes nothing; once the first has stopped, resume=auto works."""
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        first = start_script(launch_args(tiny_data, out, "steps=100000", "checkpoint_every=0"),
                             log, 2)
    ranks: list[psutil.Process] = []
    try:
        wait_for(out, 2, first, tmp_path / "log")
        _, ranks = launcher_and_ranks(first, 2)
        rank0 = next(p for p in ranks if p.environ().get("RANK") == "0")
        second = script_output(launch_args(tiny_data, out, "optim.lr=1e-3"), 2)
        assert second.returncode == 2, second.stderr
        said = lines(second.stdout + second.stderr)
        assert len(said) == 1 and said[0].startswith(f"error: {out} is in use by another run "
                                                     f"(pid {rank0.pid} on host "), said
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 75, (tmp_path / "log").read_text()
        assert len(finished_checkpoints(out)) == 1
        steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        assert steps == sorted(set(steps))  # each step once: the second run wrote nothing
    finally:
        kill_leftovers(first, ranks)
    stopped_at = int(finished_checkpoints(out)[0].name.split("_")[1])
    resumed = script_output(launch_args(tiny_data, out, f"steps={stopped_at + 2}",
                                        "resume=auto"), 2)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped_at}" in resumed.stderr


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_in_one_line_naming_it(tiny_data, tmp_path):
    """`kill -STOP` of rank 1: the run used to hang forever, silent. Now rank 0's collective
    gives up after collective_timeout_s, it says in one line that rank 1 stopped answering and
    which checkpoint is the last good one, and the script ends; that checkpoint resumes."""
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        script = start_script(launch_args(tiny_data, out, "steps=100000", "checkpoint_every=3",
                                          "collective_timeout_s=5"), log, 2)
    ranks: list[psutil.Process] = []
    try:
        wait_for(out, 7, script, tmp_path / "log")
        _, ranks = launcher_and_ranks(script, 2)
        rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
        rank1.suspend()
        rc = script.wait(timeout=240)
        text = (tmp_path / "log").read_text()
        assert rc not in (0, 75), text
        errors = [x for x in text.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and "rank 1 stopped answering: no reply within " \
            "collective_timeout_s=5 s" in errors[0], text
        assert "Traceback" not in text and "FAILED" not in text, text
        named = errors[0].split("last good checkpoint: ")[1].split(";")[0]
        assert named == str(finished_checkpoints(out)[-1]), text
    finally:
        for p in ranks:
            if p.is_running():
                p.resume()
        kill_leftovers(script, ranks)
    stopped_at = int(Path(named).name.split("_")[1])
    resumed = script_output(launch_args(tiny_data, out, f"steps={stopped_at + 2}",
                                        "resume=auto"), 2)
    assert resumed.returncode == 0 and f"at step {stopped_at}" in resumed.stderr, resumed.stderr
