"""No shared disk needed (issue 23, items 1-2): `executor: ray` on two Ray nodes from s3:// to
s3:// (a moto S3 server on localhost, as in test_objstore), every task reading its inputs from
the store and writing its outputs to it.

Each node has its own temp dir and TMPDIR (the scratch a task writes a shard into before its
one upload); the driver runs from an empty folder with its own empty TMPDIR and user cache.
After the run the driver's folders hold no file (the stages and the dataset exist only on the store), the nodes'
scratch folders are empty again, tasks ran on both nodes, and the dataset and every stage's
document shards downloaded from the store are byte for byte those of the local executor on
local paths.

Run: `python -m pytest -q -m slow -s tests/data_prep/test_ray_store.py`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
pytest.importorskip("s3fs")

from data_prep.config import load_config  # noqa: E402
from data_prep.pipeline import run  # noqa: E402
from tests.data_prep.test_objstore import (  # noqa: E402
    BUCKET,
    comparable,
    download_dir,
    make_raw,
    s3,  # noqa: F401 - the fixture
    upload_dir,
    write_config,
)
from tests.data_prep.test_ray_cluster import (  # noqa: E402
    RUN_TIMEOUT,
    TwoNodes,
    executed_tasks,
    log,
    total,
)

SHARD_DOCS = 8  # ~16 read shards of the small corpus: every stage has tasks for both nodes


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_nodes_s3_to_s3_without_a_shared_disk(s3, tmp_path):  # noqa: F811 - fixture
    raw = make_raw(tmp_path)
    local = run(load_config(write_config(tmp_path / "l.yaml", str(raw), str(tmp_path / "L"),
                                         **{"ray": f"{{shard_docs: {SHARD_DOCS}}}"})))
    upload_dir(raw, f"s3://{BUCKET}/nodisk-in")
    out = f"s3://{BUCKET}/nodisk-out"
    cfg = write_config(tmp_path / "r.yaml", f"s3://{BUCKET}/nodisk-in", out)
    cluster = TwoNodes()  # its nodes inherit the AWS_* endpoint the s3 fixture set
    try:
        cluster.start()
        # the driver's own folders: where it runs, its TMPDIR, and its user cache (where an
        # earlier version kept a local working copy of an object-store out_dir)
        driver = [tmp_path / "driver_cwd", tmp_path / "driver_tmp", tmp_path / "driver_cache"]
        for d in driver:
            d.mkdir()
        cmd = [sys.executable, "-m", "data_prep", str(cfg), "executor=ray",
               f"ray.address={cluster.address}", f"ray.shard_docs={SHARD_DOCS}"]
        env = {**cluster.env, "TMPDIR": str(driver[1]), "XDG_CACHE_HOME": str(driver[2])}
        r = subprocess.run(cmd, cwd=driver[0], env=env, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
        assert r.returncode == 0, r.stderr[-3000:]
        counts = {f"{n.role}#{i}": executed_tasks(n.temp) for i, n in enumerate(cluster.nodes)}
        for node, c in counts.items():
            log(f"s3 -> s3: tasks on {node}: {total(c)}")
        assert all(total(c) > 0 for c in counts.values()), counts
        driver_files = [f for d in driver for f in _files(d)]
        scratch_left = {n.role: _files(n.scratch) for n in cluster.nodes}
        log(f"files on the driver's disk: {len(driver_files)}; scratch files left on the "
            f"nodes: {sum(map(len, scratch_left.values()))}")
        assert not driver_files, driver_files
        assert not any(scratch_left.values()), scratch_left
    finally:
        cluster.stop()
    got = tmp_path / "got"
    download_dir(out, got)
    mine, want = comparable(got), comparable(local)
    # the dataset, and every stage's documents and shard accounting; a stage's stats.json
    # differs by the executor's own figures (e.g. connected-component rounds)
    keep = [k for k in want if not k.startswith("stages/") or "/stats.json" not in k]
    stage_files = [k for k in keep if k.startswith("stages/")]
    log(f"store output vs local executor: {len(keep)} files compared ({len(stage_files)} "
        f"stage files), identical: {all(mine.get(k) == want[k] for k in keep)}")
    assert sorted(k for k in mine if k in keep or "/stats.json" not in k) == sorted(keep)
    assert all(mine[k] == want[k] for k in keep), [k for k in keep if mine[k] != want[k]]
