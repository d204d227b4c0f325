"""data_prep on an object store: a real S3-compatible server (moto's server mode) on a free
localhost port, reached by s3fs over HTTP exactly as a bucket on AWS would be (the endpoint and
credentials come from the standard AWS_* environment variables; the client is not patched).

The pipeline runs from s3:// to s3:// and its output, downloaded, is compared byte for byte with
the same run on local paths; a write that fails or is killed leaves no object, and a stage
prefix without its committed `key` is never trusted by the next run. Every task writes to the
store itself: the driver keeps no local copy of the output.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import storage
from data_prep.__main__ import main as prep_main
from data_prep.config import load_config
from data_prep.pipeline import run

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tokenclock-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on localhost with one empty bucket; yields its endpoint URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto's backends are global to the process: a server started by an earlier module still
    # holds that module's bucket and objects. Its reset API empties them (a fresh, empty store).
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"),
                           timeout=30).close()
    env = {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an old endpoint
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def make_raw(root: Path) -> Path:
    """A small raw corpus from the embedded one: jsonl, jsonl.gz (with a malformed line and an
    exact duplicate) and parquet, under `root/raw/`."""
    import email
    import json as json_mod
    from pydoc_data import topics

    raw = root / "raw"
    (raw / "jsonl").mkdir(parents=True)
    (raw / "parquet").mkdir(parents=True)
    files = sorted(Path(json_mod.__file__).parent.glob("*.py")) + sorted(
        Path(email.__file__).parent.glob("*.py")
    )
    recs = [{"id": p.name, "text": p.read_text(encoding="utf-8")} for p in files]
    half = len(recs) // 2
    with (raw / "jsonl" / "a.jsonl").open("w", encoding="utf-8") as f:
        for r in recs[:half]:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    with gzip.open(raw / "jsonl" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in recs[half:] + recs[:1]:  # the first record again: an exact duplicate
            f.write(json.dumps(r) + "\n")
    names = sorted(t for t in topics.topics if t[0] in "ab")
    pq.write_table(
        pa.table({"text": [topics.topics[t] for t in names], "topic": names}),
        raw / "parquet" / "topics.parquet",
    )
    return raw


def write_config(path: Path, raw: str, out: str, **extra: str) -> Path:
    lines = [
        f"out_dir: {out}",
        "sources:",
        "  - {kind: jsonl, name: code, domain: code, id_field: id, path: " + raw + "/jsonl}",
        "  - {kind: parquet, name: topics, path: " + raw + "/parquet}",
        "tokenizer: {vocab_size: 400}",
        "shards: {shard_tokens: 20000, val_fraction: 0.1}",
        "progress: false",
        "workers: 1",
        *[f"{k}: {v}" for k, v in extra.items()],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def upload_dir(local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.upload(p, storage.join(url, p.relative_to(local).as_posix()))


def download_dir(url: str, local: Path) -> None:
    for u in storage.find(url):
        storage.download(u, local / u[len(url) + 1:])


def comparable(root: Path) -> dict[str, bytes]:
    """Every file of an output folder as bytes, less what names where or when it ran: a stage's
    `key` (it hashes the source paths), the reports (timings), and in a stage's stats.json and
    shard accounting (shards/*.json) and in meta.json the timings (task memory too), paths, keys
    and config."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or p.name in ("key", "report.md", "report.json"):
            continue
        data = p.read_bytes()
        if p.name == "stats.json" or rel.startswith("stages/") and p.suffix == ".json":
            data = json.dumps(_without(json.loads(data), "seconds", "cached", "docs_path", "key",
                                       "task_peak_rss_bytes", "task_peak_rss_bytes_by_task",
                                       "task_rss_rise_bytes_by_task"),
                              sort_keys=True).encode()
        elif rel == "meta.json":
            data = json.dumps(_without(json.loads(data), "created_utc", "config"),
                              sort_keys=True).encode()
        out[rel] = data
    return out


def _without(d: object, *keys: str) -> object:
    """`d` with `keys` and timings (names ending in `_s`) removed from every dict inside it."""
    if isinstance(d, dict):
        return {k: _without(v, *keys) for k, v in d.items()
                if k not in keys and not k.endswith("_s")}
    if isinstance(d, list):
        return [_without(v, *keys) for v in d]
    return d


def assert_same_output(a: Path, b: Path) -> int:
    ca, cb = comparable(a), comparable(b)
    assert sorted(ca) == sorted(cb)
    differ = [k for k in ca if ca[k] != cb[k]]
    assert not differ, f"files differ: {differ}"
    return sum(len(v) for v in ca.values())


# --------------------------------------------------------------------------- the storage layer
def test_failed_write_leaves_no_object(s3):
    """An error inside atomic_write aborts the upload, multipart included: no object appears,
    and an existing object is left as it was."""
    url = f"s3://{BUCKET}/unit/failed.bin"
    storage.write_text(url, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_write(url, block_size=5 << 20) as f:
            f.write(b"x" * (12 << 20))  # two 5 MiB parts uploaded before the error
            raise RuntimeError("boom")
    assert storage.read_bytes(url) == b"old"
    import boto3

    pending = boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert not [u for u in pending if u["Key"] == "unit/failed.bin"]  # aborted, not left over
    new = f"s3://{BUCKET}/unit/never.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_write(new) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not storage.exists(new)


def test_killed_writer_leaves_no_object(s3, tmp_path):
    """A process SIGKILLed in the middle of a multipart upload leaves no object behind."""
    url = f"s3://{BUCKET}/unit/killed.bin"
    script = (
        "import os, signal\n"
        "from data_prep import storage\n"
        f"with storage.atomic_write({url!r}, block_size=5 << 20) as f:\n"
        "    f.write(b'x' * (11 << 20))\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ,
                       "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert not storage.exists(url)
    import boto3

    pending = boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert [u for u in pending if u["Key"] == "unit/killed.bin"]  # started, never completed


def test_commit_moves_a_finished_object(s3):
    """storage.commit on a store without rename: the temporary key is copied into place and
    removed; a reader sees the old object or the whole new one."""
    final, tmp = f"s3://{BUCKET}/unit/final.txt", f"s3://{BUCKET}/unit/.final.txt.tmp"
    storage.write_text(final, "old")
    storage.write_text(tmp, "new")
    storage.commit(tmp, final)
    assert storage.read_bytes(final) == b"new" and not storage.exists(tmp)


def test_remote_inputs_list_like_local_ones(s3, tmp_path):
    """A folder on s3:// and the same folder as a path or a file:// URL give the same relative
    names (hence the same document ids), and an object's cache key is its size and ETag."""
    from data_prep.config import SourceConfig
    from data_prep.paths import expand_paths, file_key, input_path

    raw = make_raw(tmp_path)
    upload_dir(raw, f"s3://{BUCKET}/list")
    names = {}
    for path in (str(raw / "jsonl"), f"file://{raw}/jsonl", f"s3://{BUCKET}/list/jsonl"):
        got = expand_paths(SourceConfig(kind="jsonl", path=path), (".jsonl",))
        names[path] = [rel for rel, _ in got]
    assert list(names.values()) == [["a.jsonl", "b.jsonl.gz"]] * 3
    for _, p in got + expand_paths(SourceConfig(kind="jsonl", path=str(raw)), (".jsonl",)):
        assert input_path(str(p)) == p  # as sent to a task and back
    key = file_key("a.jsonl", f"s3://{BUCKET}/list/jsonl/a.jsonl")
    assert key[1] == (raw / "jsonl" / "a.jsonl").stat().st_size and len(str(key[2])) == 32


def test_hf_urls_route_through_fsspec():
    """hf:// resolves to huggingface_hub's fsspec filesystem (no request is made here)."""
    pytest.importorskip("huggingface_hub")
    fs, path = storage.filesystem("hf://datasets/some-org/some-set/data")
    assert type(fs).__name__ == "HfFileSystem" and path.endswith("some-set/data")


def test_bad_urls_are_one_line(s3, tmp_path, capsys):
    """A missing bucket, for an input or for out_dir, and a protocol whose package is missing
    are one `error:` line naming it."""
    raw = make_raw(tmp_path)
    cfg = write_config(tmp_path / "a.yaml", "s3://no-such-bucket/raw", str(tmp_path / "out"))
    assert prep_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bucket 'no-such-bucket' does not exist" in err
    cfg = write_config(tmp_path / "b.yaml", str(raw), "s3://no-such-bucket/out")
    assert prep_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "s3://no-such-bucket/out" in err
    cfg = write_config(tmp_path / "c.yaml", f"s3://{BUCKET}/nothing-here", str(tmp_path / "o"))
    assert prep_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"s3://{BUCKET}/nothing-here" in err
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        cfg = write_config(tmp_path / "d.yaml", "gs://some-bucket/raw", str(tmp_path / "o2"))
        assert prep_main([str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "needs gcsfs" in err and "gs://some-bucket/raw" in err


# --------------------------------------------------------------------------- the pipeline
@pytest.mark.slow
def test_s3_to_s3_is_byte_identical_to_local(s3, tmp_path):
    """Inputs read from s3://, every output (stages, shards, meta.json, reports) written to
    s3:// by the tasks: downloaded, the same bytes as the run on local paths, and nothing
    written on the local disk (run from an empty folder, with TMPDIR an empty folder: the
    tasks' scratch files are gone once committed). A second run then finds every stage
    committed and skips it."""
    raw = make_raw(tmp_path)
    local = run(load_config(write_config(tmp_path / "local.yaml", str(raw), str(tmp_path / "L"))))
    upload_dir(raw, f"s3://{BUCKET}/in")
    out = f"s3://{BUCKET}/out"
    cfg = write_config(tmp_path / "s3.yaml", f"s3://{BUCKET}/in", out)
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "data_prep", str(cfg)], cwd=cwd, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"prepared dataset: {out}"
    assert not [p for p in (*scratch.rglob("*"), *cwd.rglob("*"))], "local files written"
    got = tmp_path / "got"
    download_dir(out, got)
    n = assert_same_output(local, got)
    assert (got / "meta.json").is_file()
    assert (got / "report.md").read_text().startswith(f"# Prep report: `{out}`")
    assert len(list(got.glob("stages/*/key"))) == len(list(local.glob("stages/*/key")))
    print(f"s3 -> s3 output: {len(comparable(got))} files, {n} bytes, identical to local")

    assert run(load_config(cfg)) == out  # again (from any machine): every stage is committed
    rep = json.loads(storage.read_bytes(f"{out}/report.json"))
    cached = [s["name"] for s in rep["stages"] if s.get("cached")]
    assert len(cached) == len(list(local.glob("stages/*/key"))), rep["stages"]
    again = tmp_path / "again"
    download_dir(out, again)
    assert_same_output(local, again)


@pytest.mark.slow
def test_uncommitted_stage_prefix_is_not_trusted(s3, tmp_path):
    """A stage prefix without its `key` (a run killed before the marker) holds a corrupt
    object and a stray one: the next run does not trust it, runs the stage again, replaces the
    prefix and ends with the same bytes."""
    raw = make_raw(tmp_path)
    upload_dir(raw, f"s3://{BUCKET}/in2")
    out = f"s3://{BUCKET}/out2"
    run(load_config(write_config(tmp_path / "a.yaml", f"s3://{BUCKET}/in2", out)))
    first = tmp_path / "first"
    download_dir(out, first)
    stage = f"{out}/stages/02_filter"
    storage.remove(f"{stage}/key")
    storage.write_text(f"{stage}/docs.parquet", "truncated")
    storage.write_text(f"{stage}/stray.bin", "left by a killed run")
    # the dataset too: meta.json gone, a stale shard beside the committed ones
    storage.remove(f"{out}/meta.json")
    storage.write_text(f"{out}/train_999.bin", "stale")
    run(load_config(write_config(tmp_path / "b.yaml", f"s3://{BUCKET}/in2", out)))
    rep = json.loads(storage.read_bytes(f"{out}/report.json"))
    by_name = {s["name"]: s for s in rep["stages"]}
    assert by_name["filter"]["cached"] is False and by_name["read"]["cached"] is True
    assert not storage.exists(f"{stage}/stray.bin") and storage.exists(f"{stage}/key")
    assert not storage.exists(f"{out}/train_999.bin")
    again = tmp_path / "again"
    download_dir(out, again)
    assert_same_output(first, again)


KILL_DURING_WRITE = """
import os, signal, sys
from data_prep import storage
from data_prep.config import load_config
from data_prep.pipeline import run

real = storage.write_text


def write_text(url, text):  # the process dies half-way through writing this object
    if str(url).endswith(sys.argv[2]):
        with storage.atomic_write(url) as f:
            data = text.encode()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    real(url, text)


storage.write_text = write_text
run(load_config(sys.argv[1]))
"""


@pytest.mark.slow
def test_run_killed_mid_commit_resumes_from_what_was_committed(s3, tmp_path):
    """A prep run SIGKILLed while writing exact_dedup's stats.json (its shards are up, its key
    is not): that stage's prefix is not committed and the object being written does not exist;
    a rerun keeps read..filter, resumes exact_dedup (its complete shards kept) and runs the
    rest, and its output is the same bytes as a run that was never interrupted."""
    raw = make_raw(tmp_path)
    ref = run(load_config(write_config(tmp_path / "ref.yaml", str(raw), str(tmp_path / "ref"))))
    upload_dir(raw, f"s3://{BUCKET}/in4")
    out = f"s3://{BUCKET}/out4"
    cfg = write_config(tmp_path / "a.yaml", f"s3://{BUCKET}/in4", out)
    r = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, str(cfg), "stages/03_exact_dedup/stats.json"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    stage = f"{out}/stages/03_exact_dedup"
    assert storage.find(stage)  # its documents went up before the kill
    assert not storage.exists(f"{stage}/stats.json") and not storage.exists(f"{stage}/key")
    assert storage.exists(f"{out}/stages/02_filter/key") and not storage.exists(f"{out}/meta.json")
    run(load_config(write_config(tmp_path / "b.yaml", f"s3://{BUCKET}/in4", out)))
    rep = json.loads(storage.read_bytes(f"{out}/report.json"))
    cached = {s["name"]: s["cached"] for s in rep["stages"]}
    assert cached["filter"] and not cached["exact_dedup"], cached
    got = tmp_path / "got"
    download_dir(out, got)
    assert_same_output(ref, got)


@pytest.mark.slow
def test_ray_executor_s3_to_s3_matches_local(s3, tmp_path):
    """executor=ray from s3:// to s3:// against the same server: the same dataset bytes as
    the local pool on local paths (the stage folders differ by layout: Ray writes shards)."""
    pytest.importorskip("ray")
    raw = make_raw(tmp_path)
    local = run(load_config(write_config(tmp_path / "l.yaml", str(raw), str(tmp_path / "L"))))
    upload_dir(raw, f"s3://{BUCKET}/in3")
    out = f"s3://{BUCKET}/out3"
    run(load_config(write_config(tmp_path / "r.yaml", f"s3://{BUCKET}/in3", out,
                                 executor="ray")))
    got = tmp_path / "got"
    download_dir(out, got)
    data = {k: v for k, v in comparable(got).items() if not k.startswith("stages/")}
    want = {k: v for k, v in comparable(local).items() if not k.startswith("stages/")}
    assert data == want
