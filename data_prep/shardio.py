"""Atomic shard I/O: a stage's output as a folder of shards, each complete or absent.

A shard is `docs/part-NNNNN.parquet` (its kept documents), `dropped/part-NNNNN.jsonl` (its
dropped ones, with `report.write_dropped`) and `shards/part-NNNNN.json` (its accounting). Every
file is written under a temporary name and renamed into place (data_prep.storage.commit), the
accounting last, so a shard is complete exactly when its accounting file exists (`shard_done`),
and a re-run keeps it. Any executor writes shards through these; see docs/scaling.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_prep import storage
from data_prep.config import PrepConfig
from data_prep.stage import DroppedWriter, StageOutput
from data_prep.stats import StepStats
from data_prep.storage import tmp_path
from data_prep.store import DocWriter


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def atomic_text(path: Path, text: str) -> None:
    """Write `text` to `path` all or nothing (data_prep.storage.write_text)."""
    storage.write_text(path, text)


def shard_done(out: Path, i: int) -> dict[str, Any] | None:
    """The accounting of shard `i` of the stage folder `out`, or None when it is not complete."""
    p = out / "shards" / f"{shard_name(i)}.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


class ShardOutput(StageOutput):
    """One output shard: StageOutput's `forward` and `drop`, into temporary files that `commit`
    renames into place, the accounting file last."""

    def __init__(self, cfg: PrepConfig, out: Path, i: int, *stats: StepStats) -> None:
        self.out, self.i, self.stats = out, i, stats
        self.final = out / "docs" / f"{shard_name(i)}.parquet"
        self.tmp = tmp_path(self.final)
        self.docs = DocWriter(self.tmp)
        self.final_dropped = out / "dropped" / f"{shard_name(i)}.jsonl"
        self.tmp_dropped = tmp_path(self.final_dropped)
        if cfg.report.write_dropped:
            self.tmp_dropped.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = DroppedWriter(self.tmp_dropped, cfg.report.write_dropped)

    def commit(self, accounting: dict[str, Any]) -> dict[str, Any]:
        self.docs.close()
        self.dropped.close()
        storage.commit(self.tmp, self.final)
        if self.tmp_dropped.exists():
            storage.commit(self.tmp_dropped, self.final_dropped)
        atomic_text(self.out / "shards" / f"{shard_name(self.i)}.json", json.dumps(accounting))
        return accounting
