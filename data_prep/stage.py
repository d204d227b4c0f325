"""The stage framework: a stage is a small object with one job, run once and cached on disk.

A `Stage` reads the previous stage's documents (a folder of shards, `docs/part-NNNNN.parquet`)
and writes its own into `OUT/stages/<nn>_<name>/`, with its accounting (`stats.json`, a
`StageResult`) and last a `key` file. The key hashes the stage's part of the config, the source
code of the modules that implement it (and of the executor's) and the key of its input, so
`run_stage` skips a stage whose key is unchanged and re-runs exactly the stages a config or code
change affects (and everything downstream of them).

A stage is written once, against the verbs of `data_prep.executor.Executor` (its map per shard,
its shuffle keys, its reduce); the executor it is handed (the local process pool or Ray) only
decides where those tasks run. Every stage counts what it forwarded and dropped, by reason, in
StepStats, and `run_stage` checks in = kept + dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep import storage
from data_prep.config import PrepConfig
from data_prep.document import BadRecord, Document
from data_prep.executor import Executor, LocalExecutor
from data_prep.stats import AccountingError, StepStats, printable
from data_prep.store import DocWriter

log = logging.getLogger("data_prep")
PKG = Path(__file__).resolve().parent
# modules every document stage runs besides its own (globs under data_prep/)
STEP_MODULES = ("stage.py", "steps.py", "stats.py", "store.py", "document.py")


def new_stats(cfg: PrepConfig, name: str) -> StepStats:
    return StepStats(name, cfg.report.examples_per_reason, cfg.report.snippet_chars)


# --------------------------------------------------------------------------- stages
@dataclass
class StageResult:
    """What a stage did: totals, per-step accounting and anything else worth reporting."""

    name: str
    key: str = ""
    cached: bool = False
    seconds: float = 0.0
    total: StepStats | None = None
    steps: list[StepStats] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    docs_path: str | None = None  # documents after this stage
    # [peak RSS, rise over its start] of each kind of task the stage ran, the largest of any
    # one task, bytes (by function name; data_prep.taskmem)
    task_peak_rss: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "total": self.total.to_dict() if self.total else None,
            "steps": [s.to_dict() for s in self.steps],
            "extra": self.extra,
            "docs_path": self.docs_path,
            "task_peak_rss_bytes": max((p for p, _ in self.task_peak_rss.values()), default=0),
            "task_peak_rss_bytes_by_task": {k: v[0] for k, v in sorted(self.task_peak_rss.items())},
            "task_rss_rise_bytes_by_task": {k: v[1] for k, v in sorted(self.task_peak_rss.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        return cls(
            d["name"],
            d["key"],
            True,
            d["seconds"],
            StepStats.from_dict(d["total"]) if d["total"] else None,
            [StepStats.from_dict(s) for s in d["steps"]],
            d["extra"],
            d["docs_path"],
            {k: [v, d["task_rss_rise_bytes_by_task"][k]]  # absent before 2026-12-07
             for k, v in d.get("task_peak_rss_bytes_by_task", {}).items()},
        )


class Stage:
    """One stage of the pipeline. Subclasses set `name` and `modules` and implement `run`."""

    name: str = "stage"
    modules: tuple[str, ...] = STEP_MODULES  # files (globs under data_prep/) whose code it runs

    def part(self, cfg: PrepConfig) -> Any:
        """The part of the config that affects this stage (hashed into its key)."""
        return None

    def enabled(self, cfg: PrepConfig) -> bool:
        return True

    def run(self, cfg: PrepConfig, ex: Executor, inp: str | None, out: str,
            res: StageResult) -> None:
        """Read documents from `inp`, write into the folder `out` with the tasks `ex` runs,
        fill in `res`. Both are local paths or URLs (data_prep.storage): tasks read and write
        them themselves."""
        raise NotImplementedError  # pragma: no cover - interface


class DroppedWriter:
    """Writes every dropped document of a stage to dropped.jsonl when report.write_dropped."""

    def __init__(self, path: Path | None, enabled: bool) -> None:
        self.f = open(path, "w", encoding="utf-8") if enabled else None

    def write(self, rec: Document | BadRecord, reason: str, detail: str) -> None:
        if self.f is None:
            return
        text = rec.text if isinstance(rec, Document) else rec.snippet
        row = {"id": rec.id, "source": rec.source, "reason": reason, "detail": detail, "text": text}
        row = {k: printable(v) for k, v in row.items()}
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class StageOutput:
    """Documents (a Parquet file) and drops (a jsonl file): `forward` writes a kept document
    and `drop` a dropped one, each counted in `stats` (and any extra StepStats given). Stages
    write through its atomic subclass, one per shard (data_prep.shardio.ShardOutput)."""

    def __init__(self, cfg: PrepConfig, out: Path, *stats: StepStats) -> None:
        self.stats = stats
        self.dropped = DroppedWriter(out / "dropped.jsonl", cfg.report.write_dropped)
        self.docs = DocWriter(out / "docs.parquet")

    def forward(self, doc: Document, *also: StepStats) -> None:
        for s in (*self.stats, *also):
            s.count_in(doc.nbytes)
            s.keep(doc.nbytes)
        self.docs.write(doc)

    def drop(self, rec: Document | BadRecord, reason: str, detail: str, *also: StepStats) -> None:
        for s in (*self.stats, *also):
            s.count_in(rec.nbytes)
            s.drop(rec, reason, detail)
        self.dropped.write(rec, reason, detail)

    def __enter__(self) -> StageOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.docs.close()
        self.dropped.close()


# --------------------------------------------------------------------------- the cache
def _code_hash(modules: Iterable[str]) -> str:
    h = hashlib.sha256()
    for m in modules:
        for p in sorted(PKG.glob(m)):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def stage_key(name: str, part: Any, modules: Iterable[str], input_key: str) -> str:
    blob = json.dumps([name, part, _code_hash(modules), input_key], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _report_part(cfg: PrepConfig) -> Any:
    r = cfg.report
    return [r.examples_per_reason, r.snippet_chars, r.write_dropped, r.clusters_shown]


def out_root(cfg: PrepConfig) -> str:
    """out_dir as tasks write it: a local path (`~` expanded, `file://` dropped) or a URL."""
    return cfg.out_dir if storage.is_remote(cfg.out_dir) else str(storage.local_path(cfg.out_dir))


def stage_dir(cfg: PrepConfig, index: int, name: str) -> str:
    """The folder of stage `index`: under out_dir itself, local or on an object store."""
    return storage.join(out_root(cfg), "stages", f"{index:02d}_{name}")


def _text(url: str) -> str | None:
    return storage.read_text(url) if storage.exists(url) else None


def run_stage(cfg: PrepConfig, stage: Stage, index: int, inp: StageResult | None,
              executor: Executor | None = None) -> StageResult:
    """Run `stage` as stage number `index` on `inp`'s documents, its tasks placed by `executor`
    (a local process pool when None), or load its result from the cache when its key is
    unchanged. A disabled stage forwards its input untouched. A stage that did not finish
    leaves `key.pending`; a re-run with the same key keeps its complete shards."""
    if executor is None:
        with LocalExecutor(cfg) as ex:
            return run_stage(cfg, stage, index, inp, ex)
    out = stage_dir(cfg, index, stage.name)
    input_key = inp.key if inp else ""
    if not stage.enabled(cfg):
        assert inp is not None and inp.total is not None
        st = new_stats(cfg, stage.name)
        st.seen.add(inp.total.kept.bytes, inp.total.kept.docs)
        st.kept.add(inp.total.kept.bytes, inp.total.kept.docs)
        return StageResult(
            stage.name, input_key, False, 0.0, st, [], {"disabled": True}, inp.docs_path
        )
    # the shard layout (read's shard size) is part of every stage's output
    part = [stage.part(cfg), _report_part(cfg), ["layout", cfg.ray.shard_docs]]
    modules = (*stage.modules, *executor.modules)
    key = stage_key(stage.name, part, modules, input_key)
    stats = storage.join(out, "stats.json")
    if _text(storage.join(out, "key")) == key and storage.exists(stats):
        res = StageResult.from_dict(json.loads(storage.read_text(stats)))
        res.cached = True
        if res.docs_path:  # in this folder, even when it was moved or copied elsewhere
            res.docs_path = storage.join(out, res.docs_path.rstrip("/").rsplit("/", 1)[-1])
        log.info("stage %s: up to date (key %s), skipped", stage.name, key)
        return res
    pending = storage.join(out, "key.pending")
    if _text(pending) == key:
        log.info("stage %s: resuming (key %s): complete shards are kept", stage.name, key)
    else:
        storage.remove(storage.join(out, "key"))  # un-commit first, then the rest
        storage.remove(out)
        storage.mkdirs(out)
        storage.write_text(pending, key)
    res = StageResult(stage.name, key)
    t = time.perf_counter()
    log.info("stage %s: running (key %s) on %s", stage.name, key, executor.name)
    executor.task_peaks()  # from here on: this stage's tasks
    stage.run(cfg, executor, inp.docs_path if inp else None, out, res)
    res.task_peak_rss = executor.task_peaks()
    res.seconds = time.perf_counter() - t
    if storage.files(storage.join(out, "docs")):
        res.docs_path = storage.join(out, "docs")
    for s in [res.total, *res.steps]:
        if s is not None:
            s.check()
    # the marker last: a folder (on a store: a prefix) is trusted only with its `key`
    storage.write_text(stats, json.dumps(res.to_dict(), indent=1, ensure_ascii=False))
    storage.write_text(storage.join(out, "key"), key)
    storage.remove(pending)
    return res


def check_invariant(results: list[StageResult]) -> dict[str, int]:
    """Records read = documents that left the last stage + everything dropped anywhere."""
    read = results[0].total
    assert read is not None
    last = [r for r in results if r.total is not None][-1].total
    assert last is not None
    dropped = sum(r.total.dropped_docs for r in results if r.total is not None)
    inv = {"records_in": read.seen.docs, "documents_out": last.kept.docs, "dropped": dropped}
    if inv["records_in"] != inv["documents_out"] + inv["dropped"]:
        raise AccountingError(f"documents went missing: {inv}")
    return inv
