"""Two Ray nodes on one machine, for real (issue 23, item 3): `executor: ray` on a cluster of a
head and a worker node gives the local executor's dataset byte for byte, its tasks run on both
nodes, and after the worker node is killed half-way through a stage the rerun still gives the
same bytes.

The cluster is two `ray start --block` processes, each in its own process group: a head
(127.0.0.1, 1 CPU, its own object store and temp dir) and a worker raylet that joins it from
127.0.0.2 (another loopback address: Ray sees a second node with its own raylet, object store,
temp dir and workers; the stage shards go to the shared disk as on a cluster with a shared
filesystem). The pipeline runs as a user runs it, `python -m data_prep CONFIG executor=ray
ray.address=HOST:PORT`.

Where the tasks ran comes from Ray's export events (`RAY_enable_export_api_write=1`, the Ray
Export API: https://docs.ray.io/en/latest/ray-observability/user-guides/ray-event-export.html):
every worker process writes the task events it executed to its node's
`<temp dir>/session_*/logs/export_events/event_EXPORT_TASK_<pid>.log`, so a task counts for
the node whose temp dir holds its `task:execute` event. (The state API, `ray list tasks`, needs
the dashboard, which needs `ray[default]`; the export files need nothing.)

Run: `python -m pytest -q -m slow -s tests/data_prep/test_ray_cluster.py` (-s shows the log
lines: task counts per node, the killed worker, the hashes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "prep" / "demo.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
OBJECT_STORE = 150_000_000  # bytes, per node: small, and each node has its own
SHARD_DOCS = 100  # ~9 shards of the demo corpus: a stage is a handful of tasks per node
RUN_TIMEOUT = 480  # s, one pipeline run on the cluster
DATASET = ("tokenizer.json", "meta.json", "train_*.bin", "val_*.bin")
# stages watched for the kill: one task per input shard, so "some shards done" is half-way
KILL_IN = ("filter", "near_dedup", "pii")
NOT_TASKS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def log(msg: str) -> None:
    print(f"[two-node] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD_IP, 0))
        return s.getsockname()[1]


def dataset_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of the prepared dataset; meta.json without `config` (which names
    out_dir and the executor) and `created_utc`, the things that differ on purpose."""
    hashes = {}
    for pattern in DATASET:
        for f in sorted(out.glob(pattern)):
            data = f.read_bytes()
            if f.name == "meta.json":
                meta = json.loads(data)
                meta.pop("config")
                meta.pop("created_utc")
                data = json.dumps(meta, sort_keys=True).encode()
            hashes[f.name] = hashlib.sha256(data).hexdigest()
    assert "tokenizer.json" in hashes and any(k.startswith("train_") for k in hashes), out
    return hashes


def digest(hashes: dict[str, str]) -> str:
    """One sha256 over the per-file hashes: the figure the log prints."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def executed_tasks(temp_dir: Path) -> Counter:
    """Tasks executed by the worker processes of the node whose temp dir this is, by name:
    the distinct (task id, attempt) with a `task:execute` profile event; a task's second and
    later attempts (Ray's retries after a lost worker or object) also count under "retry"."""
    seen: dict[tuple[str, int], str] = {}
    for f in temp_dir.glob("session_*/logs/export_events/event_EXPORT_TASK*.log"):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                data = json.loads(line)["event_data"]
            except (ValueError, KeyError):
                continue  # a line cut by the kill
            events = data.get("profile_events", {}).get("events", [])
            if not any(e.get("event_name") == "task:execute" for e in events):
                continue
            name = next((json.loads(e.get("extra_data") or "{}").get("name", "?")
                         for e in events if e.get("event_name", "").startswith("task::")), "?")
            seen[(data["task_id"], int(data.get("attempt_number", 0)))] = name
    counts = Counter(seen.values())
    counts["retry"] = sum(attempt > 0 for _, attempt in seen)
    return counts


def total(c: Counter) -> int:
    return sum(c.values()) - c["retry"]


class Node:
    """One `ray start --block` in its own process group, with its own temp dir."""

    def __init__(self, role: str, args: list[str], env: dict[str, str]) -> None:
        self.role = role
        self.temp = Path(tempfile.mkdtemp(prefix=f"r{role[0]}", dir="/tmp"))  # short: sockets
        self.log = self.temp / "ray_start.log"
        self.scratch = self.temp / "scratch"  # the node's own TMPDIR (its tasks' scratch files)
        self.scratch.mkdir()
        env = {**env, "TMPDIR": str(self.scratch)}
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [RAY, "start", "--block", "--temp-dir", str(self.temp), "--num-cpus", "1",
                 "--object-store-memory", str(OBJECT_STORE), "--disable-usage-stats", *args],
                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def group(self) -> list[psutil.Process]:
        """The node's processes: its process group and every descendant of `ray start`."""
        out = {}
        try:
            out = {p.pid: p for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.proc.pid:
                    out[p.pid] = p
            except (ProcessLookupError, psutil.Error):
                continue
        return list(out.values())

    def running(self) -> list[str]:
        """Titles of the node's worker processes that are running a task (Ray titles a worker
        `ray::<task>` while it runs one, `ray::IDLE` between tasks; its agents are
        `ray::DashboardAgent` and `ray::RuntimeEnvAgent`)."""
        out = []
        for p in self.group():
            try:
                title = " ".join(p.cmdline()).strip()
            except psutil.Error:
                continue
            if title.startswith("ray::") and title not in NOT_TASKS:
                out.append(title)
        return out

    def kill(self) -> int:
        """SIGKILL to every process of the node (raylet, object store, its workers): a node
        lost, not drained. Returns how many processes died."""
        procs = self.group()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(30)
        psutil.wait_procs(procs, timeout=30)
        return len(procs)

    def stop(self) -> None:
        """SIGTERM to the group (Ray drains and stops), SIGKILL after 30 s; never `ray stop`,
        which stops every Ray process of this user on the machine."""
        if self.proc.poll() is None:
            procs = self.group()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(45)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
            _, alive = psutil.wait_procs(procs, timeout=15)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(15)


class TwoNodes:
    """A Ray head and a worker node on this machine (see the module docstring)."""

    def __init__(self) -> None:
        self.address = f"{HEAD_IP}:{_free_port()}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token",
                    "RAY_enable_export_api_write": "1",
                    # a lost node is declared dead after ~3 s, not Ray's default ~30 s
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[Node] = []

    def start(self) -> None:
        self.head = self._add("head", ["--head", "--port", self.address.split(":")[1],
                                       "--node-ip-address", HEAD_IP, "--include-dashboard",
                                       "false"])
        self._wait(1)
        self.worker = self.add_worker()

    def _add(self, role: str, args: list[str]) -> Node:
        node = Node(role, args, self.env)
        self.nodes.append(node)
        return node

    def add_worker(self) -> Node:
        node = self._add("worker", ["--address", self.address, "--node-ip-address", WORKER_IP])
        self._wait(sum(n.proc.poll() is None for n in self.nodes))
        return node

    def alive_nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(logging_level='ERROR'); print(json.dumps("
                "[{'id': n['NodeID'], 'ip': n['NodeManagerAddress']} for n in ray.nodes() "
                "if n['Alive']]))")
        r = subprocess.run([sys.executable, "-c", code], env={**self.env, "RAY_ADDRESS":
                           self.address}, capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else []

    def _wait(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) < n:
            for node in self.nodes:
                assert node.proc.poll() is None or node.proc.returncode == -signal.SIGKILL, (
                    f"ray start ({node.role}) exited: {node.log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, f"{n} Ray node(s) not up in {timeout:.0f} s"
            time.sleep(1)

    def prep(self, out: Path, tag: str) -> subprocess.Popen:
        """The pipeline on this cluster, as a user starts it; its output in OUT.TAG.log."""
        cmd = [sys.executable, "-m", "data_prep", str(DEMO), f"out_dir={out}", "progress=false",
               "executor=ray", f"ray.address={self.address}", f"ray.shard_docs={SHARD_DOCS}"]
        f = open(out.with_name(f"{out.name}.{tag}.log"), "wb")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        f.close()
        return p

    def tasks_per_node(self) -> dict[str, Counter]:
        time.sleep(3)  # task events are flushed every second
        return {f"{n.role}#{i}": executed_tasks(n.temp) for i, n in enumerate(self.nodes)}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop()
            finally:
                shutil.rmtree(node.temp, ignore_errors=True)


def _wait_run(p: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
        log(f"a run hung past {timeout:.0f} s: killed")
        return -signal.SIGKILL


def _run_ok(p: subprocess.Popen, log_file: Path) -> None:
    rc = _wait_run(p)
    assert rc == 0, f"exit {rc}: {log_file.read_text()[-3000:]}"


def _half_done(out: Path) -> tuple[str, int, int] | None:
    """(stage, shards done, shards in all) of a watched stage that is running with some but
    not all of its shards complete."""
    for stage in KILL_IN:
        for d in (out / "stages").glob(f"*_{stage}"):
            if not (d / "key.pending").exists():
                continue
            done = len(list((d / "shards").glob("part-*.json")))
            prev = sorted((out / "stages").glob("*_*"))
            prev = prev[prev.index(d) - 1] / "docs"
            total = len(list(prev.glob("part-*.parquet")))
            if 0 < done < total:
                return stage, done, total
    return None


@pytest.fixture
def two_nodes():
    cluster = TwoNodes()
    try:
        cluster.start()
        yield cluster
    finally:  # also after a failed start: the nodes started so far
        cluster.stop()


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("local") / "out"
    subprocess.run([sys.executable, "-m", "data_prep", str(DEMO), f"out_dir={out}",
                    "progress=false"], check=True, cwd=REPO, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    return dataset_hashes(out)


@pytest.mark.slow
def test_two_nodes_same_as_local_and_survive_a_lost_worker(two_nodes, local_demo, tmp_path):
    local = local_demo
    log(f"local executor: {len(local)} dataset files, digest {digest(local)}")
    nodes = two_nodes.alive_nodes()
    log(f"cluster at {two_nodes.address}: {len(nodes)} nodes (ip as Ray reports it, node id) "
        + ", ".join(f"{n['ip']} {n['id'][:12]}" for n in nodes))
    assert len(nodes) == 2

    # 1. a clean run on both nodes
    out = tmp_path / "ray"
    _run_ok(two_nodes.prep(out, "clean"), tmp_path / "ray.clean.log")
    ray1 = dataset_hashes(out)
    log(f"two-node run: digest {digest(ray1)}; identical to local: {ray1 == local}")
    counts = two_nodes.tasks_per_node()
    for node, c in counts.items():
        kinds = ", ".join(f"{'.'.join(k.split('.')[-2:])} {v}"
                          for k, v in c.most_common(5) if k != "retry")
        log(f"  tasks on {node}: {total(c)} ({kinds}, ...)")
    assert ray1 == local
    assert all(total(c) > 0 for c in counts.values()), counts

    # 2. the worker node killed half-way through a stage; the run recovers or fails; rerun
    before = two_nodes.tasks_per_node()
    out = tmp_path / "ray_killed"
    p = two_nodes.prep(out, "killed")
    deadline = time.monotonic() + RUN_TIMEOUT
    worker = two_nodes.worker
    where, busy = None, []
    while not busy and p.poll() is None and time.monotonic() < deadline:
        where = _half_done(out)
        busy = worker.running() if where else []
        time.sleep(0.02)
    assert busy, "no watched stage was seen half done with a task on the worker: nothing killed"
    n = worker.kill()
    ran = total(executed_tasks(worker.temp)) - total(before["worker#1"])
    worker_id = next(n["id"] for n in nodes if n["ip"] == WORKER_IP)
    log(f"killed the worker node {WORKER_IP} {worker_id[:12]} (ray start pid {worker.proc.pid}, {n} processes) "
        f"in stage {where[0]} with {where[1]}/{where[2]} shards done, while it ran "
        f"{', '.join(busy)}; it had run {ran} tasks of this run")
    rc = _wait_run(p)
    head = executed_tasks(two_nodes.head.temp)
    log(f"the interrupted run exited {rc}: {'recovered on the head' if rc == 0 else 'failed'}; "
        f"the head ran {total(head) - total(before['head#0'])} of its tasks, "
        f"{head['retry'] - before['head#0']['retry']} of them retries (attempt > 0)")
    if rc == 0:  # recovered: its output is already the local one
        killed = dataset_hashes(out)
        log(f"interrupted run's own output: digest {digest(killed)}; identical to local: "
            f"{killed == local}")
        assert killed == local
    two_nodes.worker = two_nodes.add_worker()  # a replacement node for the rerun
    _run_ok(two_nodes.prep(out, "rerun"), tmp_path / "ray_killed.rerun.log")
    ray2 = dataset_hashes(out)
    resumed = "resuming" in (tmp_path / "ray_killed.rerun.log").read_text()
    log(f"rerun on head + new worker: digest {digest(ray2)}; identical to local: "
        f"{ray2 == local}; resumed complete shards: {resumed}")
    for name, h in sorted(local.items()):
        log(f"  {name} sha256 {h[:16]} local = two-node = after kill: "
            f"{h == ray1[name] == ray2[name]}")
    assert ray2 == local
