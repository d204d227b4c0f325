"""`executor: ray`: the verbs of data_prep.executor over Ray Data (`RayExecutor`), and the Ray
session. A shuffle by key is a distributed sort (`grouped`), a join is a shuffle of both sides
tagged into one schema (`join`), connected components are large-star / small-star
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
from data_prep.executor import _TYPES, empty_frame, group_starts, to_arrow, worker_count

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


# --------------------------------------------------------------------------- the executor
class _PerItem:
    """map_batches over item rows: `fn(item_dict, **kw)` per row, the results as one table."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = fn.__name__

    def __call__(self, batch: dict[str, np.ndarray], **kw: Any) -> Any:
        import pyarrow as pa

        cols = {k: v.tolist() for k, v in batch.items()}
        n = len(next(iter(cols.values()))) if cols else 0
        tables = [to_arrow(self.fn({k: v[j] for k, v in cols.items()}, **kw)) for j in range(n)]
        tables = [t for t in tables if t.num_columns]
        return pa.concat_tables(tables) if tables else pa.table({})


class RayExecutor:
    """data_prep.executor.Executor on Ray Data (in a `session`)."""

    name = "ray"
    modules = ("ray_verbs.py", "executor.py")

    def __init__(self, cfg: PrepConfig) -> None:
        self.cfg = cfg

    def partitions(self, n_docs: int) -> int:
        return partitions(self.cfg, n_docs)

    def map_shards(self, items: list[dict[str, Any]], fn: Callable, desc: str = "",
                   **kw: Any) -> Any:  # Ray Data shows its own progress bars
        import ray.data

        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        return ds.map_batches(_PerItem(fn), batch_size=1, fn_kwargs=kw)

    def map_blocks(self, data: Any, fn: Callable, fmt: str = "pandas", **kw: Any) -> Any:
        return map_blocks(data, fn, fmt, **kw)

    def group_by(self, data: Any, key: str, fn: Callable, parts: int, fmt: str = "pandas",
                 **kw: Any) -> Any:
        return grouped(data, key, fn, parts, fmt, **kw)

    def join(self, left: Any, right: Any, on: tuple[str, str], lcols: dict[str, str],
             rcols: dict[str, str], parts: int) -> Any:
        return join(left, right, on, lcols, rcols, parts)

    def components(self, edges: Any, parts: int) -> tuple[Any, int]:
        return connected_components(edges, parts)

    def from_items(self, items: list[dict[str, Any]]) -> Any:
        import ray.data

        return ray.data.from_items(items)

    def union(self, a: Any, b: Any) -> Any:
        return a.union(b)

    def rename(self, rows: Any, names: dict[str, str]) -> Any:
        return rows.rename_columns(names)

    def materialize(self, rows: Any) -> Any:
        return rows.materialize()

    def count(self, rows: Any) -> int:
        return rows.count()

    def sum(self, rows: Any, col: str) -> int:
        return int(rows.sum(col) or 0) if rows.count() else 0

    def rows(self, rows: Any) -> list[dict[str, Any]]:
        return rows.take_all()
