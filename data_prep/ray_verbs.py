"""`executor: ray`: the verbs of data_prep.executor as plain Ray tasks (`RayExecutor`), and the
Ray session. Rows are `Blocks` (object refs to Arrow tables). A shuffle by key is a
range-partitioned exchange with a stable sort in each reducer (`grouped`), a join is a
shuffle of both sides tagged into one schema (`join`), connected components are large-star /
small-star
(`connected_components`). The stages (data_prep.stage, data_prep.dedup, data_prep.near,
data_prep.read_stage) say what happens per shard or key group; this module only places it.
Every Ray import is inside a function, so data_prep imports without Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

from data_prep.config import PrepConfig
from data_prep.executor import _TYPES, to_arrow, worker_count
from data_prep.stars import (
    both_ways,
    first_label,
    labels,
    large_star,
    not_star,
    roles,
    small_star,
    toward_smaller,
)
from data_prep.taskmem import measure, merge_peaks, start, task_name

log = logging.getLogger("data_prep")


# --------------------------------------------------------------------------- the Ray session
@contextmanager
def session(cfg: PrepConfig) -> Iterator[None]:
    """Connect to Ray for the run: reuse a session already started in this process, else start
    an embedded one (`ray.address=local`) or join a cluster (`auto` or an address) and shut it
    down at the end. On a cluster, data_prep and contracts travel as `py_modules`."""
    import ray

    if ray.is_initialized():
        yield
        return
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                          "log_to_driver": False}
    if cfg.ray.address == "local":
        kw["num_cpus"] = cfg.ray.num_cpus or worker_count(cfg)
        kw["address"] = "local"
        # no lineage kept for reconstruction: one node, so an object is lost only with the
        # whole session (which a rerun resumes from the committed shards); lineage held every
        # task spec of a stage's chain of shuffles (P^2 pieces each) while its output lived
        kw["_system_config"] = {"lineage_pinning_enabled": False}
        if cfg.ray.inline_bytes:  # small blocks in the object store, not in the driver
            kw["_system_config"]["max_direct_call_object_size"] = cfg.ray.inline_bytes
    else:
        kw["address"] = cfg.ray.address
        if cfg.ray.ship_code:
            import contracts
            import data_prep

            kw["runtime_env"] = {"py_modules": [data_prep, contracts]}
    log.info("ray: connecting to %s", cfg.ray.address)
    ray.init(**kw)
    try:
        yield
    finally:
        shutdown()


def partitions(cfg: PrepConfig, n_docs: int) -> int:
    """Reducers of each shuffle: ray.partitions, else one per `ray.shuffle_docs` documents and
    at least 2 per CPU. A shuffle's rows are keys, hashes and pairs, not documents, so a reducer
    holding `shuffle_docs` documents' rows stays small; and since `grouped` cuts the map side
    into as many runs, the driver owns at most parts^2 pieces per shuffle. (One reducer per
    shard's documents made that (docs / shard_docs)^2: a million object refs at 2M documents,
    4.3 GB in the driver.)"""
    import ray

    if cfg.ray.partitions:
        return cfg.ray.partitions
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(2, 2 * cpus, -(-n_docs // cfg.ray.shuffle_docs))


# --------------------------------------------------------------------------- tasks
# Rows under Ray are `Blocks`: a list of object refs to Arrow tables, each with a ref to its row
# count. Every verb submits plain Ray tasks at once (no Ray Data plan, no streaming executor,
# no actors): on a small machine a Ray Data sort costs a plan, a sample stage and a streaming
# executor start per shuffle, and near_dedup runs a dozen shuffles (issue 23, item 5).
class Blocks:
    """The Ray executor's rows: `refs[i]` an Arrow table, `lens[i]` a ref to its row count and
    the memory of the task that made it, `(rows, (peak RSS, rise))` (data_prep.taskmem)."""

    def __init__(self, refs: list[Any], lens: list[Any]) -> None:
        self.refs, self.lens = refs, lens

    def sizes(self) -> list[int]:
        import ray

        return [n for n, _ in ray.get(self.lens)]


# Every task reports its peak RSS (data_prep.taskmem) in a small object; the driver reads the
# ones that are ready whenever it submits more, so it holds them only while their tasks run.
# It looks at the oldest `_HARVEST_WINDOW` only: waiting on every outstanding ref at every
# submit cost O(outstanding) each time, unbounded in a stage with thousands of blocks.
_METERS: list[tuple[str, Any]] = []
_PEAKS: dict[str, list[int]] = {}
_HARVEST_WINDOW = 256


def _meter(name: str, refs: list[Any]) -> None:
    """Watch these `(rows, (peak, rise))` refs of tasks of `name`; read those already done."""
    _METERS.extend((name, r) for r in refs)
    _harvest(0.0, _HARVEST_WINDOW)


def _harvest(timeout: float | None, window: int | None = None) -> None:
    """Read the meters that are done among the oldest `window` (all: None), waiting up to
    `timeout` (forever: None) for all of them."""
    import ray

    global _METERS
    if not _METERS:
        return
    head = _METERS if window is None else _METERS[:window]
    refs = [r for _, r in head]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if not ready:
        return
    done = set(ready)
    got = dict(zip(ready, ray.get(ready), strict=True))
    for name, r in head:
        if r in done:
            merge_peaks(_PEAKS, name, got[r][1])
    _METERS = [(name, r) for name, r in head if r not in done] + _METERS[len(head):]


def shutdown() -> None:
    """End this process's Ray session, first dropping the refs `_meter` watches: they belong
    to that session, and a later one cannot wait on them (Ray: 'owner is unknown')."""
    import ray

    global _METERS, _PEAKS
    _METERS, _PEAKS = [], {}
    ray.shutdown()


def task_peaks() -> dict[str, list[int]]:
    """Each kind of task's [peak RSS, rise] (bytes, by function name) since the last call;
    waits for the tasks still running."""
    global _PEAKS
    _harvest(None)
    peaks, _PEAKS = _PEAKS, {}
    return peaks


_REMOTE: dict[str, Any] = {}


def _task(fn: Callable, num_returns: int = 2) -> Any:
    """`fn` as a Ray task (made once per process and return count), spread over the nodes."""
    import ray

    name = f"{fn.__name__}/{num_returns}"
    if name not in _REMOTE:
        _REMOTE[name] = ray.remote(num_returns=num_returns, scheduling_strategy="SPREAD")(fn)
    return _REMOTE[name]


def _as(t: Any, fmt: str) -> Any:
    return t if fmt == "pyarrow" else t.to_pandas()


def _concat(tables: list[Any]) -> Any:
    import pyarrow as pa

    """Tables as one; empty ones (whose column types pandas may have guessed) only when all are."""
    full = [t for t in tables if t.num_rows] or [t for t in tables if t.num_columns][:1]
    if not full:
        return pa.table({})
    return pa.concat_tables(full, promote_options="default") if len(full) > 1 else full[0]


def _apply(fn: Callable, arg: Any, kw: dict[str, Any], fmt: str
           ) -> tuple[Any, tuple[int, tuple[int, int]]]:
    """One task: `fn(arg, **kw)` on an item (a dict) or a block (as `fmt`), as Arrow."""
    started = start()
    if not isinstance(arg, dict) and not arg.num_rows:
        return arg, (0, measure(started))  # an empty block stays empty, as under a map
    t = to_arrow(fn(arg if isinstance(arg, dict) else _as(arg, fmt), **kw))
    return t, (t.num_rows, measure(started))


def _apply_items(fn: Callable, items: list[dict[str, Any]], kw: dict[str, Any]
                 ) -> tuple[Any, tuple[int, tuple[int, int]]]:
    """One task over consecutive items: `fn(item, **kw)` for each, as one Arrow block in order."""
    started = start()
    t = _concat([to_arrow(fn(item, **kw)) for item in items])
    return t, (t.num_rows, measure(started))


def _sample(t: Any, key: str, k: int) -> Any:
    """Up to `k` evenly spaced keys of a block, sorted (the shuffle's range boundaries)."""
    keys = np.sort(t[key].to_numpy(zero_copy_only=False))
    return keys[np.linspace(0, len(keys) - 1, min(k, len(keys))).astype(np.int64)]


def _split(key: str, bounds: Any, *blocks: Any) -> tuple[Any, ...]:
    """Consecutive blocks, as one in input order, cut by key range into len(bounds) + 1 pieces
    (one per reducer), and the task's `(0, (peak RSS, rise))` last."""
    started = start()
    t = _concat(list(blocks))
    keys = t[key].to_numpy(zero_copy_only=False)
    part = np.searchsorted(bounds, keys, side="right")
    order = np.argsort(part, kind="stable")
    cuts = np.searchsorted(part[order], np.arange(len(bounds) + 2))
    pieces = tuple(t.take(order[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    return (*pieces, (0, measure(started)))


def _reduce(fn: Callable, kw: dict[str, Any], fmt: str, key: str, *pieces: Any
            ) -> tuple[Any, tuple[int, tuple[int, int]]]:
    """One reducer: its pieces in input order, stably sorted by key (every group whole and in
    input order, as the local executor's stable sort), then `fn` once."""
    started = start()
    t = _concat(list(pieces))
    t = to_arrow(fn(_as(t.sort_by(key), fmt), **kw))
    return t, (t.num_rows, measure(started))


def _put_kw(kw: dict[str, Any]) -> Any:
    import ray

    return ray.put(kw)


def map_blocks(data: Blocks, fn: Callable, fmt: str = "pandas", **kw: Any) -> Blocks:
    """`fn(block as pandas (or fmt), **kw)` once per block, one task each."""
    task, kref = _task(_apply), _put_kw(kw)
    out = [task.remote(fn, r, kref, fmt) for r in data.refs]
    _meter(task_name(fn), [n for _, n in out])
    return Blocks([r for r, _ in out], [n for _, n in out])


def grouped(data: Blocks, key: str, fn: Callable, parts: int, fmt: str = "pandas",
            **kw: Any) -> Blocks:
    """A shuffle with a vectorised reduce: the blocks, in at most `parts` runs of consecutive
    blocks, cut by key range (boundaries from a sample of every block's keys) into `parts`
    pieces, then one reducer per range sorts its pieces by `key` and calls `fn(block, **kw)`,
    seeing every group whole."""
    import ray

    live = [r for r, n in zip(data.refs, data.sizes(), strict=True) if n]
    if not live:
        return Blocks([], [])
    # about 64 keys per reducer in all (at least 4 a block): a sample of 8 * parts keys from
    # every block grew as blocks x parts, 320,000 keys in the driver at 2M documents
    k = min(8 * parts, max(4, -(-64 * parts // len(live))))
    sample = np.sort(np.concatenate(ray.get([_task(_sample, 1).remote(r, key, k)
                                             for r in live])))
    bounds = np.unique(sample[np.linspace(0, len(sample) - 1, parts + 1).astype(np.int64)[1:-1]])
    n_out = len(bounds) + 1
    split = _task(_split, n_out + 1)
    step = -(-len(live) // parts)  # at most `parts` map tasks: the pieces stay <= parts^2
    pieces = [split.remote(key, bounds, *live[k:k + step]) for k in range(0, len(live), step)]
    _meter("shuffle_split", [p[-1] for p in pieces])
    task, kref = _task(_reduce), _put_kw(kw)
    out = [task.remote(fn, kref, fmt, key, *[p[j] for p in pieces]) for j in range(n_out)]
    del pieces
    _meter(task_name(fn), [n for _, n in out])
    return Blocks([r for r, _ in out], [n for _, n in out])


def join(left: Blocks, right: Blocks, on: tuple[str, str], lcols: dict[str, str],
         rcols: dict[str, str], parts: int) -> Blocks:
    """Inner join of the rows with left[on[0]] == right[on[1]] (int64 keys), as a shuffle:
    both sides tagged into one schema (`_k`, `_side`, every column of both, null where a side
    has none; `lcols`/`rcols`: column -> "int64" | "object" | "bytes" | "float" | "bool"),
    range-partitioned by `_k` so that a key's rows share a block (`grouped`), then joined block
    by block. The result has left's columns and right's except its key."""
    rc = {c: t for c, t in rcols.items() if c != on[1]}
    cols = {**lcols, **rc}
    a = map_blocks(left, _tag, key=on[0], side=0, cols=cols)
    b = map_blocks(right, _tag, key=on[1], side=1, cols=cols)
    return grouped(Blocks(a.refs + b.refs, a.lens + b.lens), "_k", _join_block, parts,
                   fmt="pyarrow", lnames=list(lcols), rnames=list(rc))


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


# --------------------------------------------------------------------------- components
def connected_components(edges: Blocks, parts: int) -> tuple[Blocks, int]:
    """(node, comp) for every node of the edge list (u, v): comp = the smallest node of its
    component, by alternating large-star and small-star until every component is a star."""
    e = map_blocks(edges, toward_smaller)
    rounds = 0
    while True:
        rounds += 1
        e = grouped(map_blocks(e, both_ways), "u", large_star, parts)
        e = grouped(map_blocks(e, toward_smaller), "u", small_star, parts)
        bad = column_sum(grouped(map_blocks(e, roles), "node", not_star, parts), "bad")
        log.info("near_dedup: connected components, round %d: %s nodes off star form",
                 rounds, bad)
        if not bad:
            break
    return grouped(map_blocks(e, labels), "node", first_label, parts), rounds


def _col_sum(t: Any, col: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(t[col]).as_py() or 0) if t.num_rows else 0


def iter_rows(rows: Blocks) -> Iterator[dict[str, Any]]:
    """Every row of `rows` as a dict, block by block in order; each block's refs are dropped
    (and so freed, with their lineage) once its rows are read, so read `rows` only once."""
    import ray

    for i in range(len(rows.refs)):
        t = ray.get(rows.refs[i])
        rows.refs[i] = rows.lens[i] = None
        yield from t.to_pylist()


def window(cfg: PrepConfig) -> int:
    """Tasks in flight in `each_shard`: ray.window_tasks, else 4 per CPU of the cluster."""
    import ray

    if cfg.ray.window_tasks:
        return cfg.ray.window_tasks
    return max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))


def max_blocks(cfg: PrepConfig) -> int:
    """Blocks of a per-shard map: ray.max_blocks, else max(128, 8 per CPU of the cluster)."""
    import ray

    if cfg.ray.max_blocks:
        return cfg.ray.max_blocks
    return max(128, 8 * int(ray.cluster_resources().get("CPU", 1)))


def each_shard(items: list[dict[str, Any]], fn: Callable, limit: int,
               **kw: Any) -> Iterator[dict[str, Any]]:
    """`fn(item, **kw)` per item, one task each, with at most `limit` tasks submitted beyond the
    first item not yet read (`ray.wait` backpressure); yields each task's rows in item order.
    A task's result and its refs are dropped once its rows are yielded, so the driver holds
    at most `limit` results, whatever the number of items."""
    import ray

    task, kref, name = _task(_apply), _put_kw(kw), task_name(fn)
    running: dict[Any, int] = {}  # result ref -> item index
    meters: dict[int, Any] = {}
    ready: dict[int, Any] = {}
    nxt = sub = 0
    while nxt < len(items):
        while sub < len(items) and sub < nxt + limit:
            r, n = task.remote(fn, dict(items[sub]), kref, "pandas")
            running[r], meters[sub] = sub, n
            sub += 1
        if nxt not in ready:
            done, _ = ray.wait(list(running), num_returns=1)
            for r in done:
                i = running.pop(r)
                ready[i] = ray.get(r)
                merge_peaks(_PEAKS, name, ray.get(meters.pop(i))[1])
            continue
        t = ready.pop(nxt)
        nxt += 1
        yield from t.to_pylist()


def column_sum(rows: Blocks, col: str) -> int:
    """The sum of `col` over every block (0 when there are no rows)."""
    import ray

    return sum(ray.get([_task(_col_sum, 1).remote(r, col) for r in rows.refs]))


def to_blocks(table: Any) -> Blocks:
    """An Arrow table (or pandas frame) as one block in the object store."""
    import ray

    t = to_arrow(table)
    return Blocks([ray.put(t)], [ray.put((t.num_rows, (0, 0)))])  # no task: no memory


def _renamed(t: Any, names: dict[str, str]) -> Any:
    return t.rename_columns([names.get(c, c) for c in t.column_names])


# --------------------------------------------------------------------------- the executor
class RayExecutor:
    """data_prep.executor.Executor on plain Ray tasks (in a `session`); rows are `Blocks`."""

    name = "ray"
    modules = ("ray_verbs.py", "stars.py", "executor.py")

    def __init__(self, cfg: PrepConfig) -> None:
        self.cfg = cfg

    def partitions(self, n_docs: int) -> int:
        return partitions(self.cfg, n_docs)

    def map_shards(self, items: list[dict[str, Any]], fn: Callable, desc: str = "",
                   **kw: Any) -> Blocks:
        """`fn(item, **kw)` per item, in at most `max_blocks(cfg)` tasks of consecutive items,
        each returning one block: the driver's refs (and the task entries Ray keeps for them,
        about 10 KB each) stay bounded however many shards a corpus has."""
        task, kref = _task(_apply_items), _put_kw(kw)
        step = max(1, -(-len(items) // max_blocks(self.cfg)))
        out = [task.remote(fn, [dict(it) for it in items[a:a + step]], kref)
               for a in range(0, len(items), step)]
        _meter(task_name(fn), [n for _, n in out])
        return Blocks([r for r, _ in out], [n for _, n in out])

    def map_blocks(self, data: Blocks, fn: Callable, fmt: str = "pandas", **kw: Any) -> Blocks:
        return map_blocks(data, fn, fmt, **kw)

    def group_by(self, data: Blocks, key: str, fn: Callable, parts: int, fmt: str = "pandas",
                 **kw: Any) -> Blocks:
        return grouped(data, key, fn, parts, fmt, **kw)

    def join(self, left: Blocks, right: Blocks, on: tuple[str, str], lcols: dict[str, str],
             rcols: dict[str, str], parts: int) -> Blocks:
        return join(left, right, on, lcols, rcols, parts)

    def components(self, edges: Blocks, parts: int) -> tuple[Blocks, int]:
        return connected_components(edges, parts)

    def from_items(self, items: list[dict[str, Any]]) -> Blocks:
        return to_blocks(pd.DataFrame(items)) if items else Blocks([], [])

    def union(self, a: Blocks, b: Blocks) -> Blocks:
        return Blocks(a.refs + b.refs, a.lens + b.lens)

    def rename(self, rows: Blocks, names: dict[str, str]) -> Blocks:
        return map_blocks(rows, _renamed, "pyarrow", names=names)

    def materialize(self, rows: Blocks) -> Blocks:
        return rows  # every verb has already submitted its tasks

    def count(self, rows: Blocks) -> int:
        return sum(rows.sizes())

    def sum(self, rows: Blocks, col: str) -> int:
        return column_sum(rows, col)

    def rows(self, rows: Blocks) -> list[dict[str, Any]]:
        import ray

        return _concat(ray.get(rows.refs)).to_pylist()

    def iter_rows(self, rows: Blocks) -> Iterator[dict[str, Any]]:
        return iter_rows(rows)

    def each_shard(self, items: list[dict[str, Any]], fn: Callable, desc: str = "",
                   **kw: Any) -> Iterator[dict[str, Any]]:
        """`fn(item, **kw)` per item, at most `window(cfg)` tasks ahead of the rows read;
        the rows in item order (`each_shard`)."""
        return each_shard(items, fn, window(self.cfg), **kw)

    def task_peaks(self) -> dict[str, list[int]]:
        return task_peaks()
