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
from data_prep.store import DocWriter


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def atomic_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` all or nothing (data_prep.storage.write_text)."""
    storage.write_text(path, text)


def shard_file(out: str | Path, kind: str, i: int) -> str:
    """Shard `i`'s file of the stage folder `out`: kind docs, dropped or shards."""
    ext = {"docs": "parquet", "dropped": "jsonl", "shards": "json", "sigs": "parquet"}[kind]
    return storage.join(out, kind, f"{shard_name(i)}.{ext}")


def shard_done(out: str | Path, i: int) -> dict[str, Any] | None:
    """The accounting of shard `i` of the stage folder `out`, or None when it is not complete."""
    p = shard_file(out, "shards", i)
    return json.loads(storage.read_text(p)) if storage.exists(p) else None


class ShardOutput(StageOutput):
    """One output shard: StageOutput's `forward` and `drop`, into local temporary files
    (data_prep.storage.scratch) that `commit` moves into place, the accounting file last. The
    stage folder `out` is a local path or a URL: a task writes to the store itself."""

    def __init__(self, cfg: PrepConfig, out: str | Path, i: int, *stats: StepStats) -> None:
        self.out, self.i, self.stats = out, i, stats
        self.final = shard_file(out, "docs", i)
        self.tmp = storage.scratch(self.final)
        self.docs = DocWriter(self.tmp)
        self.final_dropped = shard_file(out, "dropped", i)
        on = cfg.report.write_dropped
        self.tmp_dropped = storage.scratch(self.final_dropped) if on else None
        self.dropped = DroppedWriter(self.tmp_dropped, on)

    def commit(self, accounting: dict[str, Any]) -> dict[str, Any]:
        self.docs.close()
        self.dropped.close()
        storage.commit(self.tmp, self.final)
        if self.tmp_dropped is not None:
            storage.commit(self.tmp_dropped, self.final_dropped)
        atomic_text(shard_file(self.out, "shards", self.i), json.dumps(accounting))
        return accounting
