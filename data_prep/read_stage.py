"""The read stage, as tasks: every source cut into read units (one per input file; the
embedded corpus and `text` with `per: file`, whose files are documents, in chunks of files; a
source with `max_documents`, or a hub dataset, whole), one task per unit writing its own shard
with the per-record checks; then repeated ids found by a shuffle by id (the first occurrence in
reading order stays) and dropped by rewriting the shards that hold them. The driver lists
files and merges per-shard counts; it never sees a document or holds a set of ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from data_prep import storage
from data_prep.config import PrepConfig, SourceConfig, to_dict
from data_prep.document import BadRecord, Document
from data_prep.executor import Executor, empty_frame
from data_prep.paths import expand_paths, input_path
from data_prep.readers import (
    READERS,
    Record,
    embedded_code_files,
    fingerprint,
    read_embedded,
    read_source,
)
from data_prep.shardio import ShardOutput, atomic_text, shard_file
from data_prep.shardops import SHARD_MODULES, accounts, rewrite_shards
from data_prep.stage import Stage, StageResult, new_stats
from data_prep.stats import StepStats
from data_prep.store import num_docs, read_column

FILES_PER_TASK = 256  # documents-as-files per read task (embedded code, text per: file)
SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",), "text": None}


def read_units(src: SourceConfig, chunk: int) -> list[dict[str, Any]]:
    """The read tasks of one source, in reading order: {"files": [[rel, path], ...] or None
    (the whole source), "prose": the embedded prose or not}."""
    if src.max_documents is not None or src.kind == "hub":
        return [{"files": None, "prose": None}]  # counted across files: one task
    if src.kind == "embedded":
        code = [[r, str(p)] for r, p in embedded_code_files(src)] if src.code else []
        units = [{"files": code[k:k + chunk], "prose": False} for k in range(0, len(code), chunk)]
        return units + ([{"files": [], "prose": True}] if src.prose else [])
    files = [[r, str(p)] for r, p in expand_paths(src, SUFFIXES[src.kind])]
    step = chunk if src.kind == "text" and src.per == "file" else 1
    return [{"files": files[k:k + step], "prose": None} for k in range(0, len(files), step)]


def unit_records(src: SourceConfig, unit: dict[str, Any], max_line_bytes: int
                 ) -> Iterator[Record]:
    """The records of one read unit, as `read_source` yields them for those files."""
    if unit["files"] is None:
        yield from read_source(src, max_line_bytes)
        return
    files = [(r, input_path(p)) for r, p in unit["files"]]
    if src.kind == "embedded":
        yield from read_embedded(src, files, unit["prose"])
    elif src.kind == "jsonl":
        yield from READERS["jsonl"](src, max_line_bytes, files)
    else:
        yield from READERS[src.kind](src, files)


def check_record(rec: Record, cfg: PrepConfig) -> tuple[str, str]:
    """(reason, detail) to drop a record as it is read, or ("", "") to keep it. Repeated ids
    are found later, across every task (`Read.run`)."""
    if isinstance(rec, BadRecord):
        return rec.reason, rec.detail
    try:
        n = len(rec.text.encode("utf-8"))
    except UnicodeEncodeError as e:
        return "invalid_utf8", f"lone surrogate in text: {e.reason}"
    if cfg.read.max_doc_bytes and n > cfg.read.max_doc_bytes:
        return "too_large", f"{n} bytes > read.max_doc_bytes={cfg.read.max_doc_bytes}"
    k = len(rec.text.strip())
    if k < cfg.read.min_doc_chars:
        m = cfg.read.min_doc_chars
        return "empty", f"{k} characters once whitespace is stripped < read.min_doc_chars={m}"
    return "", ""


def _unit_dir(out: str, u: int) -> str:
    return storage.join(out, f"u{u:05d}")


def _read_unit(item: dict[str, Any], cfg: PrepConfig, out: str) -> dict[str, list]:
    """One read task: its unit's records checked and written as shards of at most
    `ray.shard_docs` documents into raw/uNNNNN/ (its accounting, `done.json`, written last)."""
    u = int(item["shard"])
    udir = _unit_dir(out, u)
    done = storage.join(udir, "done.json")
    if not storage.exists(done):
        unit = json.loads(item["unit"])
        total = new_stats(cfg, "read")
        j = n = 0
        cur_stats = new_stats(cfg, "read")
        cur = ShardOutput(cfg, udir, j, cur_stats)
        for rec in unit_records(cfg.sources[unit["source"]], unit, cfg.read.max_line_bytes):
            reason, detail = check_record(rec, cfg)
            if reason:
                cur.drop(rec, reason, detail, total)
                continue
            assert isinstance(rec, Document)
            if n >= cfg.ray.shard_docs:  # a full shard: the next document starts a new one
                cur.commit({"total": cur_stats.to_dict()})
                j, n, cur_stats = j + 1, 0, new_stats(cfg, "read")
                cur = ShardOutput(cfg, udir, j, cur_stats)
            cur.forward(rec, total)
            n += 1
        cur.commit({"total": cur_stats.to_dict()})
        atomic_text(done, json.dumps({"shards": j + 1, "total": total.to_dict(),
                                      "source": unit["source"]}))
    return {"shard": [u], "acct": [storage.read_text(done)]}


def _place(item: dict[str, Any], out: str) -> dict[str, list]:
    """A task: read's shard j of the unit folder `sub` moved into place as the stage's shard g
    (a rename locally, a server-side copy and delete on a store), its accounting last."""
    g, sub, j = int(item["shard"]), item["sub"], int(item["j"])
    for kind in ("docs", "dropped", "shards"):
        src = shard_file(sub, kind, j)
        if storage.exists(src):  # a retried task finds the ones already moved gone
            storage.commit(src, shard_file(out, kind, g))
    return {"shard": [g]}


def _id_rows(item: dict[str, Any]) -> dict[str, list]:
    ids = read_column(item["path"], "id")
    i = int(item["shard"])
    return {"id": ids, "shard": [i] * len(ids), "row": list(range(len(ids)))}


def _repeated_ids(df: pd.DataFrame) -> Any:
    """Every occurrence of an id after its first in reading order (shard, row)."""
    df = df[df.duplicated("id", keep=False)].sort_values(["id", "shard", "row"])
    df = df[df.duplicated("id", keep="first")]
    if not len(df):
        return empty_frame(shard="int64", row="int64", detail="object")
    return pd.DataFrame({"shard": df["shard"].to_numpy(np.int64),
                         "row": df["row"].to_numpy(np.int64),
                         "detail": [f"id {i!r} already read" for i in df["id"]]})


def _amend(read: StepStats, rewritten: StepStats) -> None:
    """`read`'s counts with the documents `rewritten` dropped moved from kept to dropped."""
    read.kept = type(read.kept)(rewritten.kept.docs, rewritten.kept.bytes)
    for reason, c in rewritten.dropped.items():
        read.dropped.setdefault(reason, type(c)()).add(c.bytes, c.docs)
    for reason, ex in rewritten.examples.items():
        mine = read.examples.setdefault(reason, [])
        mine.extend(ex[: max(0, read.examples_per_reason - len(mine))])


class Read(Stage):
    """Reads every source into shards (see the module docstring); drops bad records, blank or
    oversized documents and repeated ids, counted for the whole stage and per source."""

    name = "read"
    modules = ("read_stage.py", "readers.py", "paths.py", *SHARD_MODULES)

    def part(self, cfg: PrepConfig) -> Any:
        c = to_dict(cfg)
        return [c["sources"], c["read"], [fingerprint(s) for s in cfg.sources]]

    def run(self, cfg: PrepConfig, ex: Executor, inp: str | None, out: str,
            res: StageResult) -> None:
        raw = storage.join(out, "raw")
        chunk = min(cfg.ray.shard_docs, FILES_PER_TASK)
        units = [{**u, "source": k} for k, src in enumerate(cfg.sources)
                 for u in read_units(src, chunk)]
        units = units or [{"files": [], "prose": False, "source": 0}]
        items = [{"shard": i, "unit": json.dumps(u)} for i, u in enumerate(units)]
        total = new_stats(cfg, self.name)
        per = [new_stats(cfg, f"source{k}:{s.name or s.kind}") for k, s in enumerate(cfg.sources)]
        units_shards: list[tuple[int, int]] = []  # per read unit: (shards, source)
        for acct in accounts(ex.each_shard(items, _read_unit, desc="read", cfg=cfg, out=raw)):
            st = StepStats.from_dict(acct["total"])
            total.merge(st)
            per[acct["source"]].merge(st)
            units_shards.append((acct["shards"], acct["source"]))
        res.total, res.steps = total, per
        # the read shards in reading order: (unit folder, shard in it), and each one's source
        subs = [(_unit_dir(raw, u), j) for u, (n, _) in enumerate(units_shards) for j in range(n)]
        source_of = [src for n, src in units_shards for _ in range(n)]
        files = [shard_file(sub, "docs", j) for sub, j in subs]
        parts = ex.partitions(sum(num_docs(f) for f in files))
        ids = ex.map_shards([{"shard": g, "path": f} for g, f in enumerate(files)], _id_rows)
        drops = ex.materialize(ex.group_by(ids, "id", _repeated_ids, parts))
        if not ex.count(drops) and not storage.files(storage.join(out, "shards")):
            # nothing to rewrite: the shards moved into place by tasks, not by the driver
            for _ in ex.each_shard([{"shard": g, "sub": sub, "j": j}
                                    for g, (sub, j) in enumerate(subs)], _place, out=out):
                pass
        else:
            earlier = [shard_file(sub, "dropped", j) for sub, j in subs]
            _, by_source = rewrite_shards(ex, drops, cfg, files, out, self.name, "duplicate_id",
                                          parts, earlier=earlier, group_of=source_of)
            rewritten = [new_stats(cfg, s.name) for s in per]
            for st, got in zip(rewritten, by_source, strict=False):
                st.merge(got)
            whole = new_stats(cfg, self.name)
            for st in rewritten:
                whole.merge(st)
            _amend(total, whole)
            for st, mine in zip(per, rewritten, strict=True):
                _amend(st, mine)
        storage.remove(raw)  # out/docs and out/dropped hold them now
