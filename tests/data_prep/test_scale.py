"""data_prep.scale: the scale bench's corpus and memory sampling, and the Ray-overhead
comparison (`python -m data_prep.bench --overhead`) on the tiny config."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from data_prep.bench import main
from data_prep.scale import MemorySampler, synthetic_corpus

from .conftest import TINY


def test_synthetic_corpus_is_deterministic_with_copies(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    kinds = synthetic_corpus(a, 300, seed=1)
    assert synthetic_corpus(b, 300, seed=1) == kinds
    assert a.read_bytes() == b.read_bytes()
    assert sum(kinds.values()) == 300 and kinds["copy"] > 0 and kinds["near"] > 0
    texts = [json.loads(line)["text"] for line in a.read_text(encoding="utf-8").splitlines()]
    assert len(set(texts)) < len(texts)  # the exact copies are there


def test_memory_sampler_sees_the_local_pool_and_the_driver():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50_000_000); "
                              "time.sleep(30)"])
    try:
        with MemorySampler("local", interval=0.05) as mem:
            for _ in range(100):  # until the child has its 50 MB
                mem.sample()
                if mem.peak_worker_rss > 50_000_000:
                    break
                mem._stop.wait(0.05)
    finally:
        child.kill()
        child.wait()
    assert child.pid in mem.workers_seen
    assert mem.peak_worker_rss > 50_000_000 and mem.peak_driver > 10_000_000
    # an embedded Ray's workers are the driver's descendants titled ray::; this child is not
    ray_mem = MemorySampler("ray", embedded=True)
    assert ray_mem._workers() == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_overhead_on_tiny(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert main([str(TINY), "--overhead", "--rounds", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["stage_median_s"]) == ["read", "normalize", "filter", "exact_dedup",
                                           "near_dedup", "pii", "tokenizer", "pack"]
    assert res["docs"] > 0 and set(res["ratio"]) == {"ray", "ray_warm"}
    assert all(len(v) == 1 and v[0] > 0 for v in res["seconds"].values())
    assert set(res["ray_fixed_costs_s"]) == {"init_s", "first_task_s", "task_s", "put_get_s",
                                             "map_s", "shuffle_s", "shutdown_s"}
    assert all(v > 0 for v in res["ray_fixed_costs_s"].values())
    assert "ray / local:" in text and "Ray's fixed costs here" in text and text.startswith("# data_prep: Ray's overhead")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_a_second_ray_session_does_not_wait_on_the_first_sessions_tasks():
    """The tasks' memory meters (ray_verbs._meter) are refs of one Ray session: two sessions
    in one process (the bench's repeats) failed with Ray's 'owner is unknown' until a
    session's end forgot them."""
    from data_prep.scale import ray_fixed_costs

    costs = ray_fixed_costs(num_cpus=2, repeats=2)
    assert all(v > 0 for v in costs.values())
