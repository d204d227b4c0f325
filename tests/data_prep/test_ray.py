"""executor: ray gives the same kept documents and the same accounting as executor: local.

The Ray tests share one embedded Ray (2 CPUs) per module; `test_ray_start_cluster` (slow)
starts a real one with `ray start --head` and runs the pipeline with ray.address=auto.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_prep import load_config
from data_prep.labelled import build
from data_prep.minhash import UnionFind
from data_prep.pipeline import run_document_stages
from data_prep.store import read_docs

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "prep" / "tiny.yaml"
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed: pip install -e '.[ray]'")
# timings and where the work ran differ between executors; everything else must be equal
VOLATILE = {"seconds", "key", "cached", "docs_path", "signature_s", "signatures_per_s",
            "lsh_and_clustering_s", "connected_component_rounds", "task_peak_rss_bytes",
            "task_peak_rss_bytes_by_task",
            "task_rss_rise_bytes_by_task"}


# --------------------------------------------------------------------------- config
def test_executor_and_address_are_checked():
    with pytest.raises(ValueError, match="executor='spark'; valid: local, ray"):
        load_config(TINY, ["executor=spark"])
    with pytest.raises(ValueError, match="ray.address='cluster'"):
        load_config(TINY, ["ray.address=cluster"])
    for ok in ("local", "auto", "10.0.0.1:6379", "ray://head:10001"):
        assert load_config(TINY, [f"ray.address={ok}"]).ray.address == ok
    assert load_config(TINY).executor == "local"


def test_executor_ray_without_ray_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ray" else real(n, *a))
    with pytest.raises(ValueError, match=r"pip install -e '\.\[ray\]'"):
        load_config(TINY, ["executor=ray"])


def test_data_prep_imports_without_ray():
    code = "import sys; sys.modules['ray'] = None; import data_prep.pipeline, data_prep.stage"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


# --------------------------------------------------------------------------- helpers
def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _prep(out: Path, overrides: list[str], config: Path = TINY
          ) -> tuple[list[dict], list[tuple[str, str]]]:
    cfg = load_config(config, [f"out_dir={out}", "progress=false", *overrides])
    results = run_document_stages(cfg)
    acct = [json.loads(json.dumps(_strip(r.to_dict()))) for r in results]
    return acct, [(d.id, d.text) for d in read_docs(results[-1].docs_path)]


def _assert_same(tmp: Path, overrides: list[str], config: Path = TINY,
                 shard_docs: int = 40) -> list[dict]:
    local = _prep(tmp / "local", overrides, config)
    ray = _prep(tmp / "ray", [*overrides, "executor=ray", f"ray.shard_docs={shard_docs}",
                              "ray.partitions=3"], config)
    for a, b in zip(local[0], ray[0], strict=True):
        assert a == b, a["name"]
    assert local[1] == ray[1]
    # the ray run really ran on Ray: every document stage wrote shards, accounted per shard
    for stage in ("read", "normalize", "filter", "exact_dedup", "near_dedup", "pii"):
        (d,) = (tmp / "ray" / "stages").glob(f"*_{stage}")
        assert (d / "docs" / "part-00000.parquet").exists() and (d / "shards").is_dir(), stage
    return local[0]


def labelled_corpus(path: Path, bases: int = 40, seed: int = 0) -> Path:
    """data_prep.labelled's near-duplicate clusters, plus exact copies of every 7th document."""
    ls = build(seed=seed, bases=bases)
    rows = [{"id": i, "text": t} for i, t in zip(ls.ids, ls.texts, strict=True)]
    rows += [{"id": f"copy{k}-{r['id']}", "text": r["text"]} for k, r in enumerate(rows[::7])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _source(path: Path) -> str:
    """The corpus, then a second source with bad records and ids the first already used."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:30:3]]
    extra = path.parent / "second" / path.name  # same name: its ids read the same
    extra.parent.mkdir(exist_ok=True)
    extra.write_text(
        "".join(json.dumps({"id": r["id"], "text": r["text"] + " more"}) + "\n" for r in rows)
        + '{"id": "new", "text": "a fresh document of its own"}\n{"broken json\n\n'
        + '{"id": "new", "text": "the same id again"}\n{"id": "blank", "text": "  "}\n',
        encoding="utf-8")
    src = "{{kind: jsonl, name: corpus, path: '{}', id_field: id, domain: code}}"
    return f"sources=[{src.format(path)}, {src.format(extra)}]"


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # as the pipeline with progress=false
    yield ray
    if started:
        ray.shutdown()


# --------------------------------------------------------------------------- ray, embedded
@pytest.mark.slow
@needs_ray
def test_connected_components_match_union_find(ray_local):
    """Chains and stars that take several large-star/small-star rounds, against union-find."""
    import pandas as pd

    from data_prep.ray_verbs import connected_components, to_blocks

    rng = random.Random(3)
    n = 100
    edges = [(i, i + 1) for i in range(0, 24)]  # a chain
    edges += [(rng.randrange(40, n), rng.randrange(40, n)) for _ in range(40)]
    edges = [(a, b) for a, b in edges if a != b]
    rng.shuffle(edges)
    ds = to_blocks(pd.DataFrame({"u": [a for a, _ in edges], "v": [b for _, b in edges]}))
    labels, rounds = connected_components(ds, 3)
    got = {r["node"]: r["comp"] for t in ray_local.get(labels.refs) for r in t.to_pylist()}
    uf = UnionFind(n)
    for a, b in edges:
        uf.union(a, b)
    nodes = {x for e in edges for x in e}
    assert set(got) == nodes
    for x in nodes:  # the label is the smallest node of the component (= union-find's root)
        assert got[x] == uf.find(x)
    assert rounds > 1, rounds


@pytest.mark.slow  # ~27 s: keeps the default tier under 3 minutes
@needs_ray
def test_same_as_local_on_labelled_near_duplicates(ray_local, tmp_path):
    corpus = labelled_corpus(tmp_path / "labelled.jsonl")
    acct = _assert_same(tmp_path, [_source(corpus), "dedup.minhash.verify=true",
                                   "report.write_dropped=true"])
    by = {r["name"]: r for r in acct}
    assert by["read"]["steps"][1]["dropped"]["duplicate_id"]["docs"] == 11
    assert {"malformed_json", "empty"} <= set(by["read"]["total"]["dropped"])
    assert by["exact_dedup"]["total"]["docs_dropped"] > 10  # the copies
    assert by["near_dedup"]["extra"]["clusters"] > 10
    assert by["near_dedup"]["extra"]["pairs_rejected_by_verification"] > 0
    # read's dropped records land where docs/scaling.md says, the same records as local's
    def dropped(files):
        return sorted(line for f in files for line in f.read_text(encoding="utf-8").splitlines())

    (local_read,) = (tmp_path / "local" / "stages").glob("*_read")
    (ray_read,) = (tmp_path / "ray" / "stages").glob("*_read")
    got = dropped(sorted((ray_read / "dropped").glob("part-*.jsonl")))
    assert got == dropped(sorted((local_read / "dropped").glob("part-*.jsonl")))
    assert len(got) >= 14
    assert not (ray_read / "raw").exists()


@pytest.mark.slow
@needs_ray
@pytest.mark.parametrize("mode", [["dedup.minhash.verify=false", "ray.max_blocks=3"],
                                  ["dedup.minhash.verify=true", "dedup.minhash.linkage=single"]])
def test_same_as_local_without_verification_and_single_linkage(ray_local, tmp_path, mode):
    """(The first also runs every per-shard map in 3 tasks of consecutive shards.)"""
    corpus = labelled_corpus(tmp_path / "labelled.jsonl")
    acct = _assert_same(tmp_path, [_source(corpus), *mode])
    assert {r["name"]: r for r in acct}["near_dedup"]["extra"]["clusters"] > 10


@pytest.mark.slow
@needs_ray
def test_same_as_local_on_the_embedded_corpus(ray_local, tmp_path):
    """The whole embedded corpus through configs/prep/demo.yaml's cleaning and dedup."""
    acct = _assert_same(tmp_path, ["workers=2"], REPO / "configs" / "prep" / "demo.yaml", 300)
    by = {r["name"]: r for r in acct}
    assert by["read"]["total"]["docs_in"] > 500
    assert by["exact_dedup"]["total"]["docs_dropped"] > 0
    assert by["near_dedup"]["extra"]["clusters"] > 0


@pytest.mark.slow
@needs_ray
def test_rerun_resumes_an_interrupted_stage(ray_local, tmp_path):
    """A stage killed half-way (key.pending, some shards complete) keeps its complete shards."""
    corpus = labelled_corpus(tmp_path / "labelled.jsonl", bases=15)
    ov = [_source(corpus), "executor=ray", "ray.shard_docs=20", "ray.partitions=2"]
    acct, docs = _prep(tmp_path / "out", ov)
    stage = next((tmp_path / "out" / "stages").glob("*_near_dedup"))
    key = (stage / "key").read_text()
    (stage / "key").unlink()
    (stage / "stats.json").unlink()
    (stage / "key.pending").write_text(key)  # what a killed run leaves
    kept = stage / "docs" / "part-00000.parquet"
    (stage / "shards" / "part-00001.json").unlink()  # shard 1 was not finished
    (stage / "docs" / "part-00001.parquet").unlink()
    before = kept.stat().st_mtime_ns
    acct2, docs2 = _prep(tmp_path / "out", ov)
    assert kept.stat().st_mtime_ns == before  # complete shard skipped
    assert (stage / "docs" / "part-00001.parquet").exists()
    assert not (stage / "key.pending").exists()
    assert acct2 == acct and docs2 == docs


# --------------------------------------------------------------------------- ray start
CLUSTER_DRIVER = """
import json, sys
from pathlib import Path
from data_prep import load_config
from data_prep.pipeline import run_document_stages
from data_prep.store import read_docs
out = Path(sys.argv[1])
cfg = load_config(sys.argv[2], [f"out_dir={out}", "progress=false", *sys.argv[4:]])
res = run_document_stages(cfg)
volatile = set(json.loads(sys.argv[3]))
def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in volatile}
    return [strip(v) for v in x] if isinstance(x, list) else x
acct = json.loads(json.dumps([strip(r.to_dict()) for r in res]))
docs = [(d.id, d.text) for d in read_docs(res[-1].docs_path)]
out.with_suffix(".json").write_text(json.dumps([acct, docs]), encoding="utf-8")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_ray
def test_ray_start_cluster(tmp_path):
    """`ray start --head` with 2 CPUs, the pipeline with ray.address=auto, then the cluster is
    stopped. `ray start --block` runs in its own process group, and stopping is a SIGTERM to
    that group: `ray stop` would kill every Ray process of this user on the machine."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix socket paths
    address = f"127.0.0.1:{_free_port()}"
    # token authentication (Ray's default for a new cluster) on both sides: ~/.ray/auth_token
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    corpus = labelled_corpus(tmp_path / "labelled.jsonl", bases=20)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus", "2",
         "--port", address.split(":")[1], "--node-ip-address", "127.0.0.1",
         "--temp-dir", str(temp), "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([ray_bin, "status", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(2)
        ov = [_source(corpus), "dedup.minhash.verify=true"]
        local = _prep(tmp_path / "local", ov)
        # the driver is a fresh process (Ray reads RAY_AUTH_MODE when it is imported)
        subprocess.run([sys.executable, "-c", CLUSTER_DRIVER, str(tmp_path / "ray"), str(TINY),
                        json.dumps(sorted(VOLATILE)), *ov,
                        "executor=ray", "ray.address=auto", "ray.shard_docs=40"],
                       check=True, env=env, cwd=REPO, timeout=600)
        acct, docs = json.loads((tmp_path / "ray.json").read_text(encoding="utf-8"))
        assert acct == _strip(local[0]) and [tuple(d) for d in docs] == local[1]
        assert (tmp_path / "ray" / "stages" / "04_near_dedup" / "shards").is_dir()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("key", ["ray.shard_docs=0", "ray.shuffle_docs=0", "ray.partitions=-1",
                                 "ray.window_tasks=-1", "ray.inline_bytes=-1",
                                 "ray.max_blocks=-1"])
def test_ray_sizes_out_of_range_are_refused_in_one_line(key):
    """ray.shuffle_docs (reducers of an automatic shuffle) is range-checked like shard_docs."""
    from data_prep.config import load_config

    with pytest.raises(ValueError, match=key.split("=")[0].replace(".", r"\.")) as e:
        load_config(Path(__file__).resolve().parents[2] / "configs" / "prep" / "demo.yaml", [key])
    assert "\n" not in str(e.value)


@pytest.mark.slow
@needs_ray
def test_each_shard_streams_in_item_order_with_a_window(ray_local, tmp_path):
    """`each_shard` with 2 tasks in flight: every item's rows, in item order, and the tasks'
    peak RSS recorded under their function's name."""
    from data_prep.document import Document
    from data_prep.ray_verbs import each_shard, task_peaks
    from data_prep.read_stage import _id_rows
    from data_prep.store import DocWriter

    items = []
    for i in range(7):
        path = tmp_path / f"part-{i}.parquet"
        w = DocWriter(path)
        for k in range(i % 3 + 1):
            w.write(Document(f"d{i}-{k}", f"text {i} {k}", "s"))
        w.close()
        items.append({"shard": i, "path": str(path)})
    task_peaks()
    got = [(r["shard"], r["id"]) for r in each_shard(items, _id_rows, 2)]
    assert got == [(i, f"d{i}-{k}") for i in range(7) for k in range(i % 3 + 1)]
    peak, rise = task_peaks()["id_rows"]
    assert peak > 10_000_000 and 0 <= rise <= peak
