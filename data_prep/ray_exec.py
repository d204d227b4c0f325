"""`executor: ray`: the document stages as Ray Data jobs over sharded stage outputs.

Under Ray every document stage writes a folder of shards, `docs/part-00000.parquet`, ... (at
most `ray.shard_docs` documents each), and every shard is written atomically: into a temporary
name, then renamed; its accounting (`shards/part-00000.json`) is renamed into place last, so a
shard is complete exactly when that file exists. A re-run after a killed worker or driver keeps
the complete shards of an unfinished stage and computes only the others (`run_stage` keeps the
folder when its pending key matches).

What runs where:

* **read**: the sources are streamed on the driver as under the local executor (one pass; the
  per-record checks), into shards, one source per shard; repeated ids are then found by a
  shuffle by id (the first occurrence in reading order stays, as locally), not by a set of
  every id on the driver, and each shard is rewritten by one task. The streaming pass is
  redone on a re-run; the rewritten shards are kept.
* **normalize, filter, pii** (a `StepsStage`): `map_batches` over the input shards, one task a
  shard, each running the stage's Steps and writing its output shard; the driver merges the
  small per-shard StepStats in shard order, so counts and examples equal the local ones.
* **exact_dedup**: a shuffle by the xxh3-128 hash of the text; each hash group keeps its
  smallest id (the local rule). The drops are shuffled again by shard, and each shard is
  rewritten by the task that received its drops.
* **near_dedup**, the usual distributed MinHash LSH (Leskovec, Rajaraman, Ullman, *Mining of
  Massive Datasets*, ch. 3): signatures in a map (written as resumable shards); one row per
  (band, band values) key, shuffled so that a bucket meets in one group, which emits the pairs
  (first member, other member); the pairs shuffled again to drop repeats; with `verify`, the
  texts joined onto both ends of each pair and the exact Jaccard checked; the connected
  components of the pairs by large-star / small-star (Kiveris et al., "Connected Components in
  MapReduce and Beyond", SoCC 2014), each round two shuffles of the edge list; then one group
  per component, which applies complete linkage (`dedup.merge_verified`, exact because merges
  never cross components) and the survivor rule (`minhash.survivor` via `dedup.cluster_of`).
* **tokenizer, pack**: on the driver, reading the shards in order (as under `local`).

The driver holds only per-shard accounting, counts and the `report.clusters_shown` largest
groups, never a list of documents, pairs or labels.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.config import PrepConfig, to_dict
from data_prep.dedup import (
    ExactDedup,
    NearDedup,
    cluster_of,
    merge_verified,
    text_hash,
    verified_edge,
)
from data_prep.document import BadRecord, Document
from data_prep.minhash import (
    MinHasher,
    UnionFind,
    choose_bands_rows,
    choose_bands_rows_for_recall,
    jaccard,
    shingle_hashes,
)
from data_prep.stage import (
    DroppedWriter,
    Stage,
    StageOutput,
    StageResult,
    StepsStage,
    new_stats,
    worker_count,
)
from data_prep.stats import StepStats
from data_prep.steps import run_steps
from data_prep.store import DocWriter, doc_files, num_docs, read_docs

log = logging.getLogger("data_prep")
MODULES = ("ray_exec.py",)  # hashed into the key of every stage run under Ray


# --------------------------------------------------------------------------- the Ray session
@contextmanager
def session(cfg: PrepConfig) -> Iterator[None]:
    """Connect to Ray for the run: reuse a session already started in this process, else start
    an embedded one (`ray.address=local`) or join a cluster (`auto` or an address) and shut it
    down at the end. On a cluster, data_prep and contracts travel as `py_modules`."""
    import ray

    if ray.is_initialized():
        _quiet(cfg)
        yield
        return
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                          "log_to_driver": False}
    if cfg.ray.address == "local":
        kw["num_cpus"] = cfg.ray.num_cpus or worker_count(cfg)
        kw["address"] = "local"
    else:
        kw["address"] = cfg.ray.address
        if cfg.ray.ship_code:
            import contracts
            import data_prep

            kw["runtime_env"] = {"py_modules": [data_prep, contracts]}
    log.info("ray: connecting to %s", cfg.ray.address)
    ray.init(**kw)
    try:
        _quiet(cfg)
        yield
    finally:
        ray.shutdown()


def _quiet(cfg: PrepConfig) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _partitions(cfg: PrepConfig, n_docs: int) -> int:
    """Blocks of each shuffle: ray.partitions, else enough for about one shard's documents per
    block (so a task's memory does not grow with the corpus) and at least 2 per CPU."""
    import ray

    if cfg.ray.partitions:
        return cfg.ray.partitions
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(2, 2 * cpus, -(-n_docs // cfg.ray.shard_docs))


# --------------------------------------------------------------------------- atomic shards
def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
        self.tmp = _tmp(self.final)
        self.docs = DocWriter(self.tmp)
        self.final_dropped = out / "dropped" / f"{shard_name(i)}.jsonl"
        self.tmp_dropped = _tmp(self.final_dropped)
        if cfg.report.write_dropped:
            self.tmp_dropped.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = DroppedWriter(self.tmp_dropped, cfg.report.write_dropped)

    def commit(self, accounting: dict[str, Any]) -> dict[str, Any]:
        self.docs.close()
        self.dropped.close()
        os.replace(self.tmp, self.final)
        if self.tmp_dropped.exists():
            os.replace(self.tmp_dropped, self.final_dropped)
        atomic_text(self.out / "shards" / f"{shard_name(self.i)}.json", json.dumps(accounting))
        return accounting


class RollingOutput:
    """StageOutput's interface for the driver-side read: a new ShardOutput every `shard_docs`
    forwarded documents and at every new source (`start_source`), so each shard holds one
    source's documents; its accounting file names that source."""

    def __init__(self, cfg: PrepConfig, out: Path, *stats: StepStats) -> None:
        self.cfg, self.out, self.stats = cfg, out, stats
        self.n = self.i = self.source = 0
        self.cur = ShardOutput(cfg, out, 0)

    def _next(self) -> None:
        self.cur.commit({"docs": self.n, "source": self.source})
        self.i, self.n = self.i + 1, 0
        self.cur = ShardOutput(self.cfg, self.out, self.i)

    def start_source(self, i: int) -> None:
        if i > 0:
            self._next()
        self.source = i

    def forward(self, doc: Document, *also: StepStats) -> None:
        if self.n >= self.cfg.ray.shard_docs:
            self._next()
        for s in self.stats:
            s.count_in(doc.nbytes)
            s.keep(doc.nbytes)
        self.cur.forward(doc, *also)
        self.n += 1

    def drop(self, rec: Document | BadRecord, reason: str, detail: str, *also: StepStats) -> None:
        for s in self.stats:
            s.count_in(rec.nbytes)
            s.drop(rec, reason, detail)
        self.cur.drop(rec, reason, detail, *also)

    def __enter__(self) -> RollingOutput:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.cur.commit({"docs": self.n, "source": self.source})


def _shards_in(inp: Path) -> list[str]:
    return [str(p) for p in doc_files(inp)]


def _shard_items(inp: Path) -> Any:
    """A Dataset of one row per input shard (its index and path), one block each."""
    import ray.data

    files = _shards_in(inp)
    items = [{"shard": i, "path": p} for i, p in enumerate(files)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def _collect(ds: Any) -> list[dict[str, Any]]:
    """The per-shard accounting rows of `ds` (one small row per shard), in shard order."""
    rows = ds.take_all()
    return [json.loads(r["acct"]) for r in sorted(rows, key=lambda r: r["shard"])]


# --------------------------------------------------------------------------- step stages
_STEPS_CACHE: dict[str, Any] = {}


def _steps_shard(batch: dict[str, np.ndarray], stage: StepsStage, cfg: PrepConfig, out: str,
                 name: str) -> dict[str, list]:
    rep = cfg.report
    shards, accts = [], []
    for i, path in zip(batch["shard"].tolist(), batch["path"].tolist(), strict=True):
        acct = shard_done(Path(out), i)
        if acct is None:
            key = f"{name} {cfg!r}"  # Ray workers outlive a run: a new config, new steps
            steps = _STEPS_CACHE.get(key)
            if steps is None:
                _STEPS_CACHE.clear()
                steps = _STEPS_CACHE[key] = stage.build(cfg)
            total = StepStats(name, rep.examples_per_reason, rep.snippet_chars)
            per = {s.name: StepStats(s.name, rep.examples_per_reason, rep.snippet_chars)
                   for s in steps}
            dropped: list[tuple[Document, str, str]] = []
            o = ShardOutput(cfg, Path(out), i)
            for d in run_steps(steps, read_docs(path), total, per, dropped):
                o.docs.write(d)
            for d, reason, detail in dropped:  # counted by run_steps; written for the report
                o.dropped.write(d, reason, detail)
            acct = o.commit({"total": total.to_dict(),
                             "steps": [s.to_dict() for s in per.values()]})
        shards.append(i)
        accts.append(json.dumps(acct))
    return {"shard": shards, "acct": accts}


def run_steps_stage(stage: StepsStage, cfg: PrepConfig, inp: Path, out: Path,
                    res: StageResult) -> None:
    ds = _shard_items(inp).map_batches(
        _steps_shard, batch_size=1,
        fn_kwargs={"stage": stage, "cfg": cfg, "out": str(out), "name": res.name},
    )
    total = new_stats(cfg, res.name)
    per = {s.name: new_stats(cfg, s.name) for s in stage.build(cfg)}
    for acct in _collect(ds):
        total.merge(StepStats.from_dict(acct["total"]))
        for s in acct["steps"]:
            per[s["name"]].merge(StepStats.from_dict(s))
    res.total, res.steps = total, list(per.values())


# --------------------------------------------------------------------------- shuffles
def grouped(ds: Any, key: str, fn: Callable, parts: int, fmt: str = "pandas",
            **fn_kwargs: Any) -> Any:
    """A shuffle with a vectorised reduce: a distributed sort by `key` (range-partitioned, so
    rows with equal keys land in one block, the mechanism Ray's own `groupby().map_groups`
    uses under the sort shuffle), then `fn(block_as_pandas, **fn_kwargs)` once per block,
    seeing every group whole. `parts`: blocks the input is cut into first (its parallelism)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    # task-based sort shuffles: the default hash shuffle starts a pool of aggregator actors for
    # every shuffle (seconds each on a small machine), and near_dedup runs a dozen shuffles
    DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return _map(ds.repartition(parts).sort(key), fn, fmt, **fn_kwargs)


def _starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a new run of equal values starts in the sorted `keys`."""
    if not len(keys):
        return np.empty(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))


_TYPES = {"int64": "int64", "object": "string", "bytes": "binary", "float": "float64",
          "bool": "bool"}


def _empty(**cols: str) -> Any:
    """An empty block with these columns ("int64", "object" = string, "bytes", "float")."""
    import pyarrow as pa

    return pa.table({c: pa.array([], _TYPES[t]) for c, t in cols.items()})


def _arrow(block: Any) -> Any:
    """`block` (pandas or Arrow) as an Arrow table with plain string/binary columns, so the
    blocks of one shuffle agree on their schema whatever produced them."""
    import pyarrow as pa

    t = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
    fields = []
    for f in t.schema:
        ty = f.type
        if pa.types.is_large_string(ty):
            ty = pa.string()
        elif pa.types.is_large_binary(ty):
            ty = pa.binary()
        fields.append(pa.field(f.name, ty))
    return t.cast(pa.schema(fields))


class _Block:
    """`fn(block, **kw)` with its result made an Arrow table by `_arrow`."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = fn.__name__

    def __call__(self, df: Any, **kw: Any) -> Any:
        return _arrow(self.fn(df, **kw))


def _map(ds: Any, fn: Callable, fmt: str = "pandas", **fn_kwargs: Any) -> Any:
    """map_batches of `fn` over whole blocks, as pandas (or `fmt`) (see _Block)."""
    return ds.map_batches(_Block(fn), batch_size=None, batch_format=fmt, fn_kwargs=fn_kwargs)


def join(left: Any, right: Any, on: tuple[str, str], lcols: dict[str, str],
         rcols: dict[str, str], parts: int) -> Any:
    """Inner join of the rows with left[on[0]] == right[on[1]] (int64 keys), as a shuffle:
    both sides tagged into one schema (`_k`, `_side`, every column of both, null where a side
    has none; `lcols`/`rcols`: column -> "int64" | "object" | "bytes" | "float" | "bool"),
    sorted by `_k` so that a key's rows share a block (`grouped`), then joined block by block.
    The result has left's columns and right's except its key. (Ray's own Dataset.join needs
    polars and a pool of aggregator actors per join.)"""
    rc = {c: t for c, t in rcols.items() if c != on[1]}
    cols = {**lcols, **rc}
    tagged = _map(left, _tag, key=on[0], side=0, cols=cols).union(
        _map(right, _tag, key=on[1], side=1, cols=cols))
    return grouped(tagged, "_k", _join_block, parts, fmt="pyarrow", lnames=list(lcols),
                   rnames=list(rc))


def _tag(df: pd.DataFrame, key: str, side: int, cols: dict[str, str]) -> Any:
    import pyarrow as pa

    n = len(df)
    data = {"_k": pa.array(df[key].to_numpy(np.int64)),
            "_side": pa.array(np.full(n, side, np.int8))}
    for c, t in cols.items():
        data[c] = pa.array(df[c] if c in df else [None] * n, _TYPES[t])
    return pa.table(data)


def _join_block(t: Any, lnames: list[str], rnames: list[str]) -> Any:
    import pyarrow.compute as pc

    left = t.filter(pc.equal(t["_side"], 0)).select(["_k", *lnames])
    right = t.filter(pc.equal(t["_side"], 1)).select(["_k", *rnames])
    return left.join(right, "_k", join_type="inner").drop_columns(["_k"])


def _apply_drops(df: pd.DataFrame, cfg: PrepConfig, out: str, inputs: list[str], name: str,
                 reason: str, earlier: str | None = None) -> pd.DataFrame:
    """Per shard of this block: rewrite it without the rows named (row >= 0; row -1 marks a
    shard with no drops), each drop counted under `reason` with its detail. `earlier`: a
    folder of drops already written per input shard (dropped/part-NNNNN.jsonl), which lead the
    shard's own dropped file (committed with it)."""
    rep = cfg.report
    shards, accts = [], []
    for i, g in df.groupby("shard", sort=True):
        i = int(i)
        acct = shard_done(Path(out), i)
        if acct is None:
            drops = {int(r): d for r, d in zip(g["row"], g["detail"], strict=True) if r >= 0}
            total = StepStats(name, rep.examples_per_reason, rep.snippet_chars)
            o = ShardOutput(cfg, Path(out), i, total)
            before = Path(earlier or "") / "dropped" / f"{shard_name(i)}.jsonl"
            if earlier and o.dropped.f is not None and before.exists():
                o.dropped.f.write(before.read_text(encoding="utf-8"))
            for row, d in enumerate(read_docs(inputs[i])):
                if row in drops:
                    o.drop(d, reason, drops[row])
                else:
                    o.forward(d)
            acct = o.commit({"total": total.to_dict()})
        shards.append(i)
        accts.append(json.dumps(acct))
    return pd.DataFrame({"shard": shards, "acct": accts})


def _rewrite(drops: Any, cfg: PrepConfig, inp: Path, out: Path, name: str, reason: str,
             parts: int, earlier: Path | None = None) -> tuple[StepStats, list[dict[str, Any]]]:
    """Shuffle the drops (shard, row, detail) by shard, with one marker row per shard, and
    rewrite every shard; returns the stage's merged accounting and each shard's. `earlier`: see
    `_apply_drops`."""
    import ray.data

    inputs = _shards_in(inp)
    markers = ray.data.from_items(
        [{"shard": i, "row": -1, "detail": ""} for i in range(len(inputs))]
    )
    ds = grouped(drops.union(markers) if drops is not None else markers, "shard", _apply_drops,
                 parts, cfg=cfg, out=str(out), inputs=inputs, name=name, reason=reason,
                 earlier=str(earlier) if earlier else None)
    total = new_stats(cfg, name)
    accts = _collect(ds)
    for acct in accts:
        total.merge(StepStats.from_dict(acct["total"]))
    return total, accts


def _top(df: pd.DataFrame, k: int, by: list[str], ascending: list[bool]) -> pd.DataFrame:
    return df.sort_values(by, ascending=ascending).head(k)


def _take_top(ds: Any, k: int, by: list[str], ascending: list[bool]) -> list[dict[str, Any]]:
    """The first `k` rows of `ds` in the order `by`: k per block, then k overall."""
    if k <= 0:
        return []
    rows = _map(ds, _top, k=k, by=by, ascending=ascending).take_all()
    return _top(pd.DataFrame(rows), k, by, ascending).to_dict("records") if rows else []


# --------------------------------------------------------------------------- read
def _id_rows(batch: dict[str, np.ndarray]) -> dict[str, list]:
    out: dict[str, list] = {"id": [], "shard": [], "row": []}
    for i, path in zip(batch["shard"].tolist(), batch["path"].tolist(), strict=True):
        for row, d in enumerate(read_docs(path)):
            out["id"].append(d.id)
            out["shard"].append(i)
            out["row"].append(row)
    return out


def _repeated_ids(df: pd.DataFrame) -> pd.DataFrame:
    """Every occurrence of an id after its first in reading order (shard, row)."""
    df = df[df.duplicated("id", keep=False)].sort_values(["id", "shard", "row"])
    df = df[df.duplicated("id", keep="first")]
    if not len(df):
        return _empty(shard="int64", row="int64", detail="object")
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


def run_read(stage: Stage, cfg: PrepConfig, out: Path, res: StageResult) -> None:
    """The sources streamed on the driver into shards (out/raw), without a set of every id;
    then repeated ids found by a shuffle by id and dropped as the local read does (the first
    occurrence in reading order stays), each shard rewritten into out/docs by one task, its
    dropped file (out/dropped/) the source's bad records then the repeated ids."""
    raw = out / "raw"
    stage.run(cfg, None, raw, res, output=RollingOutput, check_ids=False)
    inp = raw / "docs"
    files = _shards_in(inp)
    source_of = [shard_done(raw, i)["source"] for i in range(len(files))]  # type: ignore[index]
    parts = _partitions(cfg, num_docs(inp))
    ids = _shard_items(inp).map_batches(_id_rows, batch_size=1)
    total, accts = _rewrite(grouped(ids, "id", _repeated_ids, parts), cfg, inp, out, res.name,
                            "duplicate_id", parts, earlier=raw)
    assert res.total is not None
    _amend(res.total, total)
    for k, st in enumerate(res.steps):  # one StepStats per source, in source order
        mine = new_stats(cfg, st.name)
        for acct, src in zip(accts, source_of, strict=True):
            if src == k:
                mine.merge(StepStats.from_dict(acct["total"]))
        _amend(st, mine)
    shutil.rmtree(raw)  # out/docs and out/dropped hold them now


# --------------------------------------------------------------------------- exact dedup
def _hash_rows(batch: dict[str, np.ndarray]) -> dict[str, list]:
    out: dict[str, list] = {"h": [], "id": [], "shard": [], "row": []}
    for i, path in zip(batch["shard"].tolist(), batch["path"].tolist(), strict=True):
        for row, d in enumerate(read_docs(path)):
            out["h"].append(f"{text_hash(d.text):032x}")
            out["id"].append(d.id)
            out["shard"].append(i)
            out["row"].append(row)
    return out


def _exact_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Each hash group of 2+ documents: its survivor (smallest id) and the others."""
    df = df[df.duplicated("h", keep=False)].sort_values(["h", "id"])
    rows: dict[str, list] = {"keep": [], "size": [], "members": []}
    for _, g in df.groupby("h", sort=False):
        ids = g["id"].tolist()
        rows["keep"].append(ids[0])
        rows["size"].append(len(ids))
        rows["members"].append(json.dumps(
            [[int(s), int(r), x] for s, r, x in zip(g["shard"], g["row"], ids, strict=True)][1:]
        ))
    if not rows["keep"]:
        return _empty(keep="object", size="int64", members="object")
    return pd.DataFrame(rows)


def _drop_frame(drops: list[tuple[int, int, str]]) -> pd.DataFrame:
    """(shard, row, detail) of each dropped document, as the frame the drop shuffle takes."""
    if not drops:
        return _empty(shard="int64", row="int64", detail="object")
    return pd.DataFrame(drops, columns=["shard", "row", "detail"])


def _exact_drop_rows(df: pd.DataFrame) -> pd.DataFrame:
    return _drop_frame([(s, r, f"same text as {keep}")
                        for keep, members in zip(df["keep"], df["members"], strict=True)
                        for s, r, _ in json.loads(members)])


def run_exact(cfg: PrepConfig, inp: Path, out: Path, res: StageResult) -> None:
    parts = _partitions(cfg, num_docs(inp))
    hashes = _shard_items(inp).map_batches(_hash_rows, batch_size=1)
    groups = grouped(hashes, "h", _exact_groups, parts).materialize()
    n_groups = groups.count()
    shown = _take_top(_map(groups, _group_order),
                      cfg.report.clusters_shown, ["neg_size", "keep"], [True, True])
    drops = _map(groups, _exact_drop_rows)
    res.total, _ = _rewrite(drops if n_groups else None, cfg, inp, out, res.name,
                            ExactDedup.reason, parts)
    res.extra = {
        "groups": n_groups,
        "groups_shown": [[r["keep"], *(m[2] for m in json.loads(r["members"]))] for r in shown],
    }


def _group_order(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(neg_size=-df["size"])


# --------------------------------------------------------------------------- near dedup
def _sig_shard(batch: dict[str, np.ndarray], out: str, hasher: MinHasher,
               offsets: list[int]) -> dict[str, list]:
    """Signatures of each input shard into sigs/part-i.parquet (skipped when it exists):
    global index g, id, bytes, has-shingles, the signature as num_perm*4 bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    res: dict[str, list] = {"shard": [], "seconds": []}
    for i, path in zip(batch["shard"].tolist(), batch["path"].tolist(), strict=True):
        final = Path(out) / "sigs" / f"{shard_name(i)}.parquet"
        t = time.perf_counter()
        if not final.exists():
            docs = list(read_docs(path))
            sig, has = hasher.signatures([d.text for d in docs])
            table = pa.table({
                "g": pa.array(np.arange(len(docs), dtype=np.int64) + offsets[i]),
                "id": pa.array([d.id for d in docs], pa.string()),
                "nbytes": pa.array([d.nbytes for d in docs], pa.int64()),
                "has": pa.array(has),
                "sig": pa.array([r.tobytes() for r in sig], pa.binary()),
            })
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp(final)
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        res["shard"].append(i)
        res["seconds"].append(time.perf_counter() - t)
    return res


def _read_sigs(batch: dict[str, np.ndarray], out: str) -> Any:
    """The signature shards of these input shards (pyarrow directly: Ray's read_parquet would
    list the files through fsspec)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([
        pq.read_table(Path(out) / "sigs" / f"{shard_name(i)}.parquet")
        for i in batch["shard"].tolist()
    ])


def _band_rows(df: pd.DataFrame, bands: int, rows: int, num_perm: int) -> pd.DataFrame:
    """One row per (document with shingles, band): key = band number + that band's values."""
    df = df[df["has"]]
    if not len(df):
        return _empty(key="object", g="int64")
    sig = np.frombuffer(b"".join(df["sig"].tolist()), np.uint32).reshape(len(df), num_perm)
    keys, gs = [], []
    g = df["g"].to_numpy()
    for band in range(bands):
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        prefix = band.to_bytes(2, "little")
        keys.extend(prefix + block[j].tobytes() for j in range(len(df)))
        gs.append(g)
    return pd.DataFrame({"key": keys, "g": np.concatenate(gs)})


def _bucket_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Per LSH bucket (equal key): the pairs (first = lowest g, other), as `band_candidates`."""
    df = df.sort_values(["key", "g"])
    keys = df["key"].to_numpy()
    g = df["g"].to_numpy()
    st = _starts(keys)
    if not len(st):
        return _empty(p="int64")
    first = np.repeat(g[st], np.diff(np.append(st, len(g))))
    dup = np.ones(len(g), bool)
    dup[st] = False
    return pd.DataFrame({"p": (first[dup] << 32) | g[dup]})


def _unique_pairs(df: pd.DataFrame) -> pd.DataFrame:
    p = np.unique(df["p"].to_numpy())
    return pd.DataFrame({"a": p >> 32, "b": p & 0xFFFFFFFF})


def _text_rows(batch: dict[str, np.ndarray], offsets: list[int]) -> dict[str, list]:
    out: dict[str, list] = {"g": [], "text": []}
    for i, path in zip(batch["shard"].tolist(), batch["path"].tolist(), strict=True):
        for row, d in enumerate(read_docs(path)):
            out["g"].append(offsets[i] + row)
            out["text"].append(d.text)
    return out


def _verify(df: pd.DataFrame, ngram: int, threshold: float) -> pd.DataFrame:
    """The candidate pairs whose exact Jaccard (of their shingle sets) reaches `threshold`."""
    s = np.asarray([jaccard(shingle_hashes(x, ngram), shingle_hashes(y, ngram))
                    for x, y in zip(df["text_a"], df["text_b"], strict=True)], float)
    ok = s >= threshold
    return pd.DataFrame({"a": df["a"].to_numpy()[ok], "b": df["b"].to_numpy()[ok], "s": s[ok]})


# large-star / small-star (Kiveris et al. 2014) on an edge list with columns u, v
def _both_ways(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"u": np.concatenate([u, v]), "v": np.concatenate([v, u])})


def _large_star(df: pd.DataFrame) -> pd.DataFrame:
    """For each node u with neighbours N: link every neighbour v > u to m = min(N + {u})."""
    df = df.drop_duplicates().sort_values(["u", "v"])
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    st = _starts(u)
    m = np.minimum(np.repeat(v[st], np.diff(np.append(st, len(u)))), u)  # v sorted: v[st] = min
    keep = v > u
    return pd.DataFrame({"u": v[keep], "v": m[keep]}).drop_duplicates()


def _toward_smaller(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"u": np.maximum(u, v), "v": np.minimum(u, v)})


def _small_star(df: pd.DataFrame) -> pd.DataFrame:
    """For each node u with its smaller neighbours N: link u and every v in N to m = min(N)."""
    df = df[df["u"] != df["v"]].drop_duplicates().sort_values(["u", "v"])
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    st = _starts(u)
    if not len(st):
        return _empty(u="int64", v="int64")
    m = np.repeat(v[st], np.diff(np.append(st, len(u))))
    nodes = np.concatenate([v, u[st]])
    mins = np.concatenate([m, m[st]])
    keep = nodes != mins
    return pd.DataFrame({"u": nodes[keep], "v": mins[keep]}).drop_duplicates()


def _roles(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()  # u > v: u is a child, v its parent
    return pd.DataFrame({"node": np.concatenate([u, v]),
                         "parent": np.concatenate([v, np.full(len(v), -1)])})


def _not_star(df: pd.DataFrame) -> pd.DataFrame:
    """Nodes that break star form: a child with two parents, or a parent that is a child."""
    d = df.drop_duplicates()
    child = d[d["parent"] >= 0]
    two_parents = int((child.groupby("node").size() > 1).sum())
    parent_and_child = int(child["node"].drop_duplicates().isin(d["node"][d["parent"] < 0]).sum())
    return pd.DataFrame({"bad": [two_parents + parent_and_child]})


def connected_components(edges: Any, parts: int) -> Any:
    """(node, comp) for every node of the edge list (u, v): comp = the smallest node of its
    component, by alternating large-star and small-star until every component is a star."""
    e = _map(edges, _toward_smaller).materialize()
    rounds = 0
    while True:
        rounds += 1
        e = grouped(_map(e, _both_ways), "u",
                    _large_star, parts)
        e = grouped(_map(e, _toward_smaller), "u",
                    _small_star, parts).materialize()
        bad = grouped(_map(e, _roles), "node",
                      _not_star, parts).sum("bad")
        log.info("near_dedup: connected components, round %d: %s nodes off star form",
                 rounds, bad)
        if not bad:
            break
    return grouped(_map(e, _labels), "node",
                   _first_label, parts), rounds


def _labels(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"node": np.concatenate([u, v]), "comp": np.concatenate([v, v])})


def _first_label(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("node")


def _component(df: pd.DataFrame, cfg: PrepConfig, offsets: list[int]) -> pd.DataFrame:
    """Per component (its nodes, with id, bytes, signature and text; its verified edges): the
    clusters, by complete linkage when configured, and each cluster's survivor and drops."""
    m = cfg.dedup.minhash
    out: dict[str, list] = {"survivor": [], "size": [], "members": [], "blocked": []}
    off = np.asarray(offsets)
    for _, g in df.groupby("comp", sort=False):
        nodes = g[g["kind"] == 0].sort_values("g")
        es = g[g["kind"] == 1]
        gs = nodes["g"].to_numpy()
        ids = nodes["id"].tolist()
        local = {int(x): k for k, x in enumerate(gs)}
        nbytes = nodes["nbytes"].tolist()
        sig = np.frombuffer(b"".join(nodes["sig"].tolist()), np.uint32).reshape(len(gs), -1)
        uf = UnionFind(len(gs))
        blocked = 0
        if m.verify and m.linkage == "complete":
            texts = nodes["text"].tolist()
            shingles: dict[int, np.ndarray] = {}

            def exact(a: int, b: int, texts: list = texts, shingles: dict = shingles) -> float:
                for i in (a, b):
                    if i not in shingles:
                        shingles[i] = shingle_hashes(texts[i], m.ngram)
                return jaccard(shingles[a], shingles[b])

            edges = [verified_edge(s, ids, local[int(a)], local[int(b)])
                     for a, b, s in zip(es["a"], es["b"], es["s"], strict=True)]
            blocked = merge_verified(edges, uf, exact, m.threshold, m.linkage)
        else:
            for k in range(1, len(gs)):
                uf.union(0, k)
        clusters: dict[int, list[int]] = {}
        for k in range(len(gs)):
            clusters.setdefault(uf.find(k), []).append(k)
        first = True
        for group in clusters.values():
            if len(group) < 2:
                continue
            c = cluster_of(group, nbytes, ids, sig)
            where = {ids[k]: int(gs[k]) for k in group}
            members = []
            for mid, s in c["members"]:
                x = where[mid]
                shard = int(np.searchsorted(off, x, side="right")) - 1
                members.append([mid, s, shard, x - int(off[shard])])
            out["survivor"].append(c["survivor"])
            out["size"].append(c["size"])
            out["members"].append(json.dumps(members))
            out["blocked"].append(blocked if first else 0)
            first = False
        if first and blocked:
            out["survivor"].append("")
            out["size"].append(0)
            out["members"].append("[]")
            out["blocked"].append(blocked)
    if not out["survivor"]:
        return _empty(survivor="object", size="int64", members="object", blocked="int64")
    return pd.DataFrame(out)


def _near_drop_rows(df: pd.DataFrame) -> pd.DataFrame:
    return _drop_frame([(shard, row, f"near-duplicate of {keep} (estimated Jaccard {s:.2f})")
                        for keep, members in zip(df["survivor"], df["members"], strict=True)
                        for _, s, shard, row in json.loads(members)])


def _node_rows(df: pd.DataFrame) -> pd.DataFrame:
    n = len(df)
    return pd.DataFrame({
        "comp": df["comp"], "kind": np.zeros(n, np.int8), "g": df["node"], "id": df["id"],
        "nbytes": df["nbytes"], "sig": df["sig"],
        "text": df["text"] if "text" in df else [""] * n,
        "a": np.full(n, -1), "b": np.full(n, -1), "s": np.zeros(n),
    })


def _edge_rows(df: pd.DataFrame) -> pd.DataFrame:
    n = len(df)
    return pd.DataFrame({
        "comp": df["comp"], "kind": np.ones(n, np.int8), "g": np.full(n, -1),
        "id": [""] * n, "nbytes": np.zeros(n, np.int64), "sig": [b""] * n, "text": [""] * n,
        "a": df["a"], "b": df["b"], "s": df["s"],
    })


def _as_uv(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"u": df["a"], "v": df["b"]})


PAIR = {"a": "int64", "b": "int64"}
LABEL = {"node": "int64", "comp": "int64"}
SIG = {"g": "int64", "id": "object", "nbytes": "int64", "has": "bool", "sig": "bytes"}


def run_near(cfg: PrepConfig, inp: Path, out: Path, res: StageResult) -> None:

    m = cfg.dedup.minhash
    parts = _partitions(cfg, num_docs(inp))
    if m.bands and m.rows:
        bands, rows = m.bands, m.rows
    elif m.verify:
        bands, rows = choose_bands_rows_for_recall(m.threshold, m.num_perm, m.fp_budget)
    else:
        bands, rows = choose_bands_rows(m.threshold, m.num_perm, m.fp_weight, m.fn_weight)
    files = _shards_in(inp)
    sizes = [num_docs(f) for f in files]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    hasher = MinHasher(num_perm=m.num_perm, ngram=m.ngram, seed=m.seed)
    t0 = time.perf_counter()
    _shard_items(inp).map_batches(
        _sig_shard, batch_size=1, fn_kwargs={"out": str(out), "hasher": hasher, "offsets": offsets}
    ).materialize()
    sig_s = time.perf_counter() - t0
    log.info("near_dedup: signatures of %d shards in %.1fs", len(files), sig_s)
    t1 = time.perf_counter()
    sigs = _shard_items(inp).map_batches(_read_sigs, batch_size=1, fn_kwargs={"out": str(out)})
    n_docs = sum(sizes)
    n_has = int(sigs.sum("has") or 0) if n_docs else 0
    bucket = _map(sigs, _band_rows, bands=bands, rows=rows, num_perm=m.num_perm)
    pairs = grouped(grouped(bucket, "key", _bucket_pairs, parts), "p", _unique_pairs,
                    parts).materialize()
    n_pairs = pairs.count()
    log.info("near_dedup: %d candidate pairs after %.1fs", n_pairs, time.perf_counter() - t1)
    rejected = 0
    comps: list[dict[str, Any]] = []
    rounds = 0
    clusters = None
    if n_pairs:
        if m.verify:
            texts = _shard_items(inp).map_batches(_text_rows, batch_size=1,
                                                  fn_kwargs={"offsets": offsets})
            ta = texts.rename_columns({"text": "text_a"})
            tb = texts.rename_columns({"text": "text_b"})
            with_a = join(pairs, ta, ("a", "g"), PAIR, {"g": "int64", "text_a": "object"}, parts)
            joined = join(with_a, tb, ("b", "g"), {**PAIR, "text_a": "object"},
                          {"g": "int64", "text_b": "object"}, parts)
            edges = _map(joined, _verify, ngram=m.ngram, threshold=m.threshold)
            edges = edges.materialize()
            rejected = n_pairs - edges.count()
            log.info("near_dedup: %d pairs verified after %.1fs", n_pairs - rejected,
                     time.perf_counter() - t1)
        else:
            edges = _map(pairs, _with_s)
        if edges.count():
            labels, rounds = connected_components(
                _map(edges, _as_uv), parts)
            labels = labels.materialize()
            log.info("near_dedup: components in %d rounds after %.1fs", rounds,
                     time.perf_counter() - t1)
            nodes = join(labels, sigs, ("node", "g"), LABEL, SIG, parts)
            if m.verify and m.linkage == "complete":
                texts = _shard_items(inp).map_batches(_text_rows, batch_size=1,
                                                      fn_kwargs={"offsets": offsets})
                nodes = join(nodes, texts, ("node", "g"), {**LABEL, **SIG},
                             {"g": "int64", "text": "object"}, parts)
            nodes = _map(nodes, _node_rows)
            tagged = _map(join(edges, labels, ("a", "node"), {**PAIR, "s": "float"}, LABEL,
                               parts), _edge_rows)
            clusters = grouped(nodes.union(tagged), "comp", _component, parts, cfg=cfg,
                               offsets=offsets).materialize()
    if clusters is not None and clusters.count():
        real = _map(clusters, _real)
        n_clusters = real.count()
        in_clusters = int(real.sum("size") or 0) if n_clusters else 0
        blocked = int(clusters.sum("blocked") or 0)
        comps = _take_top(_map(real, _group_order_near), cfg.report.clusters_shown, ["neg_size", "survivor"], [True, True])
        drops = _map(real, _near_drop_rows)
    else:
        n_clusters = in_clusters = blocked = 0
        drops = None
    lsh_s = time.perf_counter() - t1
    res.total, _ = _rewrite(drops if n_clusters else None, cfg, inp, out, res.name,
                            NearDedup.reason, parts)
    res.extra = {
        "bands": bands,
        "rows": rows,
        "documents": n_docs,
        "documents_without_shingles": n_docs - n_has,
        "candidate_pairs": n_pairs,
        "pairs_rejected_by_verification": rejected,
        "merges_blocked_by_linkage": blocked,
        "clusters": n_clusters,
        "documents_in_clusters": in_clusters,
        "signature_s": round(sig_s, 4),
        "signatures_per_s": round(n_docs / sig_s, 1) if sig_s > 0 else None,
        "lsh_and_clustering_s": round(lsh_s, 4),
        "connected_component_rounds": rounds,
        "clusters_shown": [
            {"survivor": c["survivor"], "size": int(c["size"]),
             "members": [[x[0], x[1]] for x in json.loads(c["members"])]}
            for c in comps
        ],
    }


def _real(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["size"] > 0]


def _with_s(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(s=np.ones(len(df)))


def _group_order_near(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(neg_size=-df["size"])


# --------------------------------------------------------------------------- dispatch
def run(stage: Stage, cfg: PrepConfig, inp: Path | None, out: Path, res: StageResult) -> None:
    """Run `stage` under Ray into the shard folder out/docs (read: on the driver)."""
    from data_prep.readers import Read

    if isinstance(stage, Read):
        run_read(stage, cfg, out, res)
        return
    assert inp is not None
    if isinstance(stage, StepsStage):
        run_steps_stage(stage, cfg, inp, out, res)
    elif isinstance(stage, ExactDedup):
        run_exact(cfg, inp, out, res)
    elif isinstance(stage, NearDedup):
        run_near(cfg, inp, out, res)
    else:
        stage.run(cfg, inp, out, res)


def ray_part(cfg: PrepConfig) -> Any:
    """What of the config the layout of a Ray stage output depends on (for its key)."""
    return ["ray", to_dict(cfg)["ray"]["shard_docs"]]
