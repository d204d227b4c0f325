"""The Ray executor's verbs over Ray Data: the session, a shuffle by key (`grouped`), a join
(`join`), connected components (`connected_components`, large-star / small-star), and rewriting
the shards of a stage without the rows a shuffle named (`rewrite_shards`). Stage runners
(data_prep.ray_exec, data_prep.ray_near) say what happens per shard or key group; these place it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.config import PrepConfig
from data_prep.shardio import (
    ShardOutput,
    shard_done,
    shard_name,
)
from data_prep.stage import (
    new_stats,
    worker_count,
)
from data_prep.stats import StepStats
from data_prep.store import doc_files, read_docs

log = logging.getLogger("data_prep")


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


def partitions(cfg: PrepConfig, n_docs: int) -> int:
    """Blocks of each shuffle: ray.partitions, else enough for about one shard's documents per
    block (so a task's memory does not grow with the corpus) and at least 2 per CPU."""
    import ray

    if cfg.ray.partitions:
        return cfg.ray.partitions
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(2, 2 * cpus, -(-n_docs // cfg.ray.shard_docs))


def shards_in(inp: Path) -> list[str]:
    return [str(p) for p in doc_files(inp)]


def shard_items(inp: Path) -> Any:
    """A Dataset of one row per input shard (its index and path), one block each."""
    import ray.data

    files = shards_in(inp)
    items = [{"shard": i, "path": p} for i, p in enumerate(files)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def collect(ds: Any) -> list[dict[str, Any]]:
    """The per-shard accounting rows of `ds` (one small row per shard), in shard order."""
    rows = ds.take_all()
    return [json.loads(r["acct"]) for r in sorted(rows, key=lambda r: r["shard"])]


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
    return map_blocks(ds.repartition(parts).sort(key), fn, fmt, **fn_kwargs)


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a new run of equal values starts in the sorted `keys`."""
    if not len(keys):
        return np.empty(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))


_TYPES = {"int64": "int64", "object": "string", "bytes": "binary", "float": "float64",
          "bool": "bool"}


def empty_frame(**cols: str) -> Any:
    """An empty block with these columns ("int64", "object" = string, "bytes", "float")."""
    import pyarrow as pa

    return pa.table({c: pa.array([], _TYPES[t]) for c, t in cols.items()})


def to_arrow(block: Any) -> Any:
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
    """`fn(block, **kw)` with its result made an Arrow table by `to_arrow`."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = fn.__name__

    def __call__(self, df: Any, **kw: Any) -> Any:
        return to_arrow(self.fn(df, **kw))


def map_blocks(ds: Any, fn: Callable, fmt: str = "pandas", **fn_kwargs: Any) -> Any:
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
    tagged = map_blocks(left, _tag, key=on[0], side=0, cols=cols).union(
        map_blocks(right, _tag, key=on[1], side=1, cols=cols))
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


def rewrite_shards(drops: Any, cfg: PrepConfig, inp: Path, out: Path, name: str, reason: str,
             parts: int, earlier: Path | None = None) -> tuple[StepStats, list[dict[str, Any]]]:
    """Shuffle the drops (shard, row, detail) by shard, with one marker row per shard, and
    rewrite every shard; returns the stage's merged accounting and each shard's. `earlier`: see
    `_apply_drops`."""
    import ray.data

    inputs = shards_in(inp)
    markers = ray.data.from_items(
        [{"shard": i, "row": -1, "detail": ""} for i in range(len(inputs))]
    )
    ds = grouped(drops.union(markers) if drops is not None else markers, "shard", _apply_drops,
                 parts, cfg=cfg, out=str(out), inputs=inputs, name=name, reason=reason,
                 earlier=str(earlier) if earlier else None)
    total = new_stats(cfg, name)
    accts = collect(ds)
    for acct in accts:
        total.merge(StepStats.from_dict(acct["total"]))
    return total, accts


def _top(df: pd.DataFrame, k: int, by: list[str], ascending: list[bool]) -> pd.DataFrame:
    return df.sort_values(by, ascending=ascending).head(k)


def take_top(ds: Any, k: int, by: list[str], ascending: list[bool]) -> list[dict[str, Any]]:
    """The first `k` rows of `ds` in the order `by`: k per block, then k overall."""
    if k <= 0:
        return []
    rows = map_blocks(ds, _top, k=k, by=by, ascending=ascending).take_all()
    return _top(pd.DataFrame(rows), k, by, ascending).to_dict("records") if rows else []


# --------------------------------------------------------------------------- components
def _both_ways(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"u": np.concatenate([u, v]), "v": np.concatenate([v, u])})


def _large_star(df: pd.DataFrame) -> pd.DataFrame:
    """For each node u with neighbours N: link every neighbour v > u to m = min(N + {u})."""
    df = df.drop_duplicates().sort_values(["u", "v"])
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    st = group_starts(u)
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
    st = group_starts(u)
    if not len(st):
        return empty_frame(u="int64", v="int64")
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
    e = map_blocks(edges, _toward_smaller).materialize()
    rounds = 0
    while True:
        rounds += 1
        e = grouped(map_blocks(e, _both_ways), "u",
                    _large_star, parts)
        e = grouped(map_blocks(e, _toward_smaller), "u",
                    _small_star, parts).materialize()
        bad = grouped(map_blocks(e, _roles), "node",
                      _not_star, parts).sum("bad")
        log.info("near_dedup: connected components, round %d: %s nodes off star form",
                 rounds, bad)
        if not bad:
            break
    return grouped(map_blocks(e, _labels), "node",
                   _first_label, parts), rounds


def _labels(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"node": np.concatenate([u, v]), "comp": np.concatenate([v, v])})


def _first_label(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("node")


def drop_frame(drops: list[tuple[int, int, str]]) -> pd.DataFrame:
    """(shard, row, detail) of each dropped document, as the frame the drop shuffle takes."""
    if not drops:
        return empty_frame(shard="int64", row="int64", detail="object")
    return pd.DataFrame(drops, columns=["shard", "row", "detail"])
