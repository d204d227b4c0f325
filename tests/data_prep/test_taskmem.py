"""Each task's own peak memory (data_prep.taskmem), recorded per kind of task in every stage's
stats.json, and the per-shard accounting streamed to the driver in shard order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep import load_config
from data_prep.executor import LocalExecutor
from data_prep.pipeline import run_document_stages
from data_prep.shardops import accounts
from data_prep.stage import StageResult
from data_prep.taskmem import measure, peak_rss, reset_peak, start

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "prep" / "tiny.yaml"
MB = 1_000_000
needs_reset = pytest.mark.skipif(not reset_peak(), reason="no /proc/self/clear_refs here")


def _touch(mb: int) -> int:
    a = np.ones(mb * MB // 8)  # written, so resident
    return int(a[-1])


def big_task(item: dict) -> dict:
    return {"shard": [item["shard"]], "x": [_touch(150)]}


def small_task(item: dict) -> dict:
    return {"shard": [item["shard"]], "x": [_touch(1)]}


@needs_reset
def test_peak_rss_is_the_peak_since_the_reset():
    reset_peak()
    before = peak_rss()
    _touch(150)
    during = peak_rss()
    reset_peak()
    after = peak_rss()
    assert during - before >= 140 * MB
    assert after < during - 100 * MB  # the 150 MB are freed: a new task starts low


@needs_reset
def test_a_tasks_rise_is_what_it_added_to_what_the_process_held():
    held = np.ones(100 * MB // 8)  # what an earlier task left in the worker
    s = start()
    _touch(60)
    peak, rise = measure(s)
    assert peak >= s + 55 * MB and 55 * MB <= rise <= peak - 90 * MB
    del held


@needs_reset
def test_local_pool_records_each_kind_of_tasks_peak(tmp_path):
    """The small tasks run in the same worker processes after the big ones, and still show
    their own (small) peak: the worker's lifetime peak would not."""
    cfg = load_config(TINY, [f"out_dir={tmp_path}", "workers=2"])
    items = [{"shard": i} for i in range(4)]
    with LocalExecutor(cfg) as ex:
        assert ex.count(ex.map_shards(items, big_task)) == 4
        assert ex.count(ex.map_shards(items, small_task)) == 4
        peaks = ex.task_peaks()
        assert ex.task_peaks() == {}  # read once: the next stage starts afresh
    assert set(peaks) == {"big_task", "small_task"}
    assert peaks["big_task"][0] >= 150 * MB and peaks["big_task"][1] >= 140 * MB
    assert peaks["small_task"][0] < peaks["big_task"][0] - 100 * MB
    assert peaks["small_task"][1] < 20 * MB


def test_stats_json_holds_every_stages_task_peaks(tmp_path):
    cfg = load_config(TINY, [f"out_dir={tmp_path}", "progress=false", "workers=2"])
    results = run_document_stages(cfg)
    for r in results:
        if r.extra.get("disabled"):
            continue
        (d,) = (tmp_path / "stages").glob(f"*_{r.name}")
        st = json.loads((d / "stats.json").read_text())
        by_task, rise = st["task_peak_rss_bytes_by_task"], st["task_rss_rise_bytes_by_task"]
        assert by_task and st["task_peak_rss_bytes"] == max(by_task.values()) > 10 * MB, r.name
        assert set(rise) == set(by_task) and all(rise[t] <= by_task[t] for t in rise)
        assert StageResult.from_dict(st).task_peak_rss == {t: [by_task[t], rise[t]]
                                                           for t in by_task}
    normalize = next(r for r in results if r.name == "normalize")
    assert set(normalize.task_peak_rss) == {"steps_shard"}


def test_a_stats_json_without_task_peaks_still_loads():
    d = StageResult("pii").to_dict()
    del d["task_peak_rss_bytes"], d["task_peak_rss_bytes_by_task"]
    del d["task_rss_rise_bytes_by_task"]
    assert StageResult.from_dict(d).task_peak_rss == {}


def test_accounting_must_arrive_in_shard_order():
    rows = [{"shard": 0, "acct": '{"a": 0}'}, {"shard": 2, "acct": '{"a": 2}'}]
    assert list(accounts(iter(rows))) == [{"a": 0}, {"a": 2}]
    with pytest.raises(RuntimeError, match="shard 1's accounting came after shard 2's"):
        list(accounts(iter([*rows, {"shard": 1, "acct": "{}"}])))
