"""launch/slurm.sbatch and launch/ray_slurm.sbatch under a real SLURM: a one-node cluster on
this machine (munged, slurmctld and slurmd from Debian's `munge` and `slurm-wlm`, 2 CPUs),
started by the `slurm` fixture with its own slurm.conf and munge key in a temporary folder and
stopped after the module.

What runs: the real scripts through `sbatch`, on one node with 2 CPU ranks (ACCELERATE_USE_CPU=1
and launch/accelerate/cpu_ddp.yaml, the settings launch/cpu.sh uses). What does not: more than
one node, GPUs, a shared filesystem, proctrack/cgroup (this cluster tracks processes by their
parent, proctrack/linuxproc, which also reaches every process of a step).

SLURM holds a requeued job until the job credentials of its last start have expired (its
BeginTime: cred_expire + 1 s, 121 s by default); this cluster sets cred_expire=10, and looks
at its queue every second (sched_interval, bf_interval).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from data_prep.store import read_docs
from tests.utils import ROOT, run_cmd

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
INSTALL = "apt-get update && apt-get install -y slurm-wlm munge"
STEPS = 60
TRAIN = ["configs/train/tiny.yaml", f"steps={STEPS}", "checkpoint_every=0", "eval_every=20",
         "sample_tokens=0"]
# metrics.jsonl fields that must be equal between runs (the rest are timings)
SAME = ("step", "loss", "val_loss", "grad_norm", "lr", "tokens")


def _missing_slurm() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): {INSTALL}"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs its daemons as root; run the slow tier as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=tokenclock-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=30
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A running one-node cluster: its client environment, and the few commands the tests use."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        self.env.update(SLURM_CONF=str(root / "slurm.conf"), WANDB_MODE="disabled")
        self.daemons: list[subprocess.Popen] = []
        self.outputs: list = []
        self.jobs: list[str] = []

    def cmd(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}: {result.stderr}\n{self.logs()}")
        return result.stdout

    def start(self) -> None:
        root = self.root
        for d in ("munge", "state", "spool"):
            (root / d).mkdir(mode=0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "slurm.conf").write_text(SLURM_CONF.format(
            host=socket.gethostname().split(".")[0], root=root, ctld_port=_free_port(),
            d_port=_free_port()))
        munge = [f"--key-file={key}", f"--socket={root}/munge/munge.socket",
                 f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munged.log",
                 f"--seed-file={root}/munge/munged.seed"]
        self._daemon(["munged", "-F", "--force", *munge])
        self._until(lambda: (root / "munge" / "munge.socket").exists(), "munged's socket", 30)
        self._daemon(["slurmctld", "-D", "-i"])
        self._daemon(["slurmd", "-D"])
        self._until(lambda: self.cmd("sinfo", "-h", "-o", "%T", check=False).strip() == "idle",
                    "the node to be idle (sinfo)", 60)

    def _daemon(self, args: list[str]) -> None:
        log = open(self.root / f"{args[0]}.out", "w")
        self.outputs.append(log)
        self.daemons.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True))

    def _until(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for d in self.daemons:
                if d.poll() is not None:
                    raise AssertionError(f"{d.args[0]} exited {d.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout} s for {what}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        """The last lines of each daemon's output (in the foreground they log to it)."""
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in sorted(self.root.glob("*.out")))

    def stop(self) -> None:
        """Cancel the jobs left, wait for their processes, then stop the daemons."""
        for job in self.jobs:
            self.cmd("scancel", job, check=False)
        deadline = time.monotonic() + 60
        while self.cmd("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
            time.sleep(1)
        for d in reversed(self.daemons):
            d.terminate()
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()
        for log in self.outputs:
            log.close()

    def sbatch(self, *args: str) -> str:
        job = self.cmd("sbatch", "--parsable", *args).strip().split(";")[0]
        self.jobs.append(job)
        return job

    def field(self, job: str, name: str) -> str:
        """One field of `scontrol show job` (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "-o", "show", "job", job)
        return re.search(rf"\b{name}=(\S*)", out).group(1)

    def wait_for(self, job: str, ready, what: str, log: Path, timeout: float = 180) -> None:
        """Poll until ready() is true; fail, with the job's log, when the job ends first."""
        deadline = time.monotonic() + timeout
        look = 0.0  # when to look at the job's state next: once a second
        while not ready():
            if time.monotonic() >= look:
                look = time.monotonic() + 1
                state = self.field(job, "JobState")
                if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") or (
                        state == "COMPLETED" and what != "the end"):
                    raise AssertionError(f"job {job} is {state} while waiting for {what}:\n"
                                         f"{_text(log)}\n{self.logs()}")
                if look > deadline:
                    raise AssertionError(f"job {job} ({state}): {what} not seen in {timeout} s:\n"
                                         f"{_text(log)}\n{self.logs()}")
            time.sleep(0.05)

    def wait_requeued(self, job: str, restarts: int, log: Path) -> None:
        """Wait until the job is back in the queue for the `restarts`th time."""
        def requeued():
            shown = self.cmd("scontrol", "-o", "show", "job", job)
            return f" Restarts={restarts} " in shown and " JobState=PENDING " in shown

        self.wait_for(job, requeued, f"requeue {restarts}", log)


@pytest.fixture(scope="module")
def slurm():
    why = _missing_slurm()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why} (.ci/run installs it)")
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))  # short: the munge socket's path
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in SAME if k in r} for r in rows]


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]


def _ranks(out: Path) -> list[psutil.Process]:
    """The training ranks of the run writing to `out`: the children of its accelerate launcher."""
    mine = [p for p in psutil.process_iter(["ppid", "cmdline"])
            if f"out_dir={out}" in (p.info["cmdline"] or [])]
    launchers = {p.pid for p in mine if "launch" in p.info["cmdline"]}
    return [p for p in mine if p.info["ppid"] in launchers]


def _submit_training(cluster: Cluster, data: Path, out: Path, log: Path) -> str:
    """sbatch launch/slurm.sbatch on this node: 1 node, 2 CPUs, 2 CPU ranks, no GPU."""
    cluster.env.update(PY=sys.executable, PROCS_PER_NODE="2", ACCELERATE_USE_CPU="1",
                       CONFIG_FILE=str(ROOT / "launch" / "accelerate" / "cpu_ddp.yaml"))
    job = cluster.sbatch("--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0",
                         "--time=00:15:00", f"--output={log}", "launch/slurm.sbatch",
                         *TRAIN, f"data_dir={data}", f"out_dir={out}")
    print(f"submitted batch job {job}: {out}")
    return job


def _wait_done(cluster: Cluster, job: str, log: Path) -> None:
    cluster.wait_for(job, lambda: cluster.field(job, "JobState") == "COMPLETED", "the end", log,
                     timeout=300)
    assert cluster.field(job, "ExitCode") == "0:0", _text(log)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The same training through launch/cpu.sh with 2 processes, uninterrupted."""
    out = tmp_path_factory.mktemp("cpu") / "run"
    run_cmd(["launch/cpu.sh", *TRAIN, f"data_dir={tiny_data}", f"out_dir={out}"],
            env={"NPROC": "2", "PY": sys.executable})
    return out


def test_sbatch_trains_to_the_end_like_cpu_sh(slurm, tiny_data, reference, tmp_path):
    """Item 11: sbatch launch/slurm.sbatch trains to the end; the weights (file and per-rank
    checksums) and every logged loss equal launch/cpu.sh's."""
    out, log = tmp_path / "run", tmp_path / "slurm.out"
    job = _submit_training(slurm, tiny_data, out, log)
    _wait_done(slurm, job, log)
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["rank_weight_sha256"] == ref["rank_weight_sha256"]
    assert _sha256(out / "model.safetensors") == _sha256(reference / "model.safetensors")
    assert _metrics(out) == _metrics(reference)
    print(f"job {job}: model.safetensors sha256 {_sha256(out / 'model.safetensors')} "
          f"(launch/cpu.sh: {_sha256(reference / 'model.safetensors')})")


def _preempt_at(cluster: Cluster, job: str, out: Path, after_step: int, log: Path, *action: str):
    """Hold the ranks (SIGSTOP) once metrics.jsonl has `after_step`, run the SLURM command
    `action`, and let them go on: the preemption lands mid-run however fast the steps are."""
    cluster.wait_for(job, lambda: len(_ranks(out)) == 2, "the 2 ranks", log)
    ranks = _ranks(out)
    cluster.wait_for(job, lambda: after_step in _steps(out), f"step {after_step}", log)
    for p in ranks:
        p.send_signal(signal.SIGSTOP)
    try:
        cluster.cmd(*action)
    finally:
        for p in ranks:
            if p.is_running():
                p.send_signal(signal.SIGCONT)


def test_preempted_job_requeues_and_resumes_bit_exact(slurm, tiny_data, reference, tmp_path):
    """Item 12: `scancel --signal=TERM` (a preemption notice, as --signal=TERM@120 before the
    time limit) mid-run: the ranks checkpoint and exit 75, the script requeues the job, which
    resumes. Then `scontrol requeue` (SLURM's own requeue, as PreemptMode=REQUEUE does it):
    SIGTERM, checkpoint, requeued, resumed. The final weights equal an uninterrupted run's."""
    out, log = tmp_path / "run", tmp_path / "slurm.out"
    t0 = time.monotonic()

    def phase(what):
        print(f"{time.monotonic() - t0:5.1f} s  {what}")

    job = _submit_training(slurm, tiny_data, out, log)
    _preempt_at(slurm, job, out, 5, log, "scancel", "--signal=TERM", job)
    phase(f"scancel --signal=TERM {job}")
    slurm.wait_requeued(job, 1, log)
    phase(f"requeued by the script (held until {slurm.field(job, 'EligibleTime')})")
    slurm.wait_for(job, lambda: _text(log).count("resumed from") == 1, "the first resume", log)
    first = int(re.search(r"resumed from \S+ at step (\d+)", _text(log)).group(1))
    phase(f"resumed at step {first}")
    _preempt_at(slurm, job, out, first + 5, log, "scontrol", "requeue", job)
    phase(f"scontrol requeue {job}")
    slurm.wait_requeued(job, 2, log)
    phase(f"requeued by SLURM (held until {slurm.field(job, 'EligibleTime')})")
    _wait_done(slurm, job, log)
    phase("completed")

    text = _text(log)
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    stopped = [int(s) for s in re.findall(r"stopping at step (\d+)", text)]
    assert len(resumed) == 2 and 5 <= resumed[0] < resumed[1] < STEPS, text
    assert sorted(set(stopped)) == resumed, text  # each start resumed where the last stopped
    assert text.count("requeueing job") == 1 and "restart 2" in text, text
    assert slurm.field(job, "Restarts") == "2"
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["rank_weight_sha256"] == ref["rank_weight_sha256"], text
    assert _sha256(out / "model.safetensors") == _sha256(reference / "model.safetensors")
    assert _metrics(out) == _metrics(reference)  # every step once, with the same losses
    lines = [ln for ln in text.splitlines()
             if re.search(r"slurm.sbatch:|resumed from|stopping at step|CANCELLED AT", ln)]
    print(f"job {job}:", *lines, sep="\n  ")
    print(f"final model.safetensors sha256 {_sha256(out / 'model.safetensors')}, "
          f"reference (launch/cpu.sh, uninterrupted) {_sha256(reference / 'model.safetensors')}")


def test_ray_slurm_prep_keeps_the_documents_of_the_local_executor(slurm, tiny_data, tmp_path):
    """Item 13: sbatch launch/ray_slurm.sbatch runs data_prep on a Ray cluster started inside
    the allocation (token authentication on); it keeps the same documents, in the same order,
    and trains the same tokenizer as the local executor (the tiny_data fixture)."""
    out, log = tmp_path / "prep", tmp_path / "slurm-prep.out"
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix socket paths
    slurm.env.update(PYTHON=sys.executable, RAY_TMPDIR=ray_tmp)
    job = slurm.sbatch("--nodes=1", "--cpus-per-task=2", "--time=00:15:00", f"--output={log}",
                       "launch/ray_slurm.sbatch", "configs/prep/tiny.yaml", f"out_dir={out}",
                       "progress=false", "ray.shard_docs=10")
    print(f"submitted batch job {job}: {out}")
    try:
        _wait_done(slurm, job, log)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = _text(log)
    assert "ray cluster at" in text and "1 of 1 nodes" in text, text

    def kept(prep: Path):  # the last document stage: a file (local) or a shard folder (Ray)
        stage = prep / "stages" / "05_pii"
        return [(d.id, d.text) for d in read_docs(next(stage.glob("docs*")))]

    docs = kept(out)
    assert docs and docs == kept(tiny_data)
    assert (out / "stages" / "05_pii" / "shards").is_dir()  # written by Ray's shard writer
    assert _sha256(out / "tokenizer.json") == _sha256(tiny_data / "tokenizer.json")
    print(f"job {job}: {len(docs)} documents kept, as by the local executor")
