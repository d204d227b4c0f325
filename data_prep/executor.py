"""Executors: where a stage's tasks run. A stage never sees which one it has.

A stage (data_prep.stage) is written once against the verbs below: what happens per input
shard (`map_shards`), per block of rows (`map_blocks`), per group of rows sharing a key
(`group_by`, a shuffle), a `join` on an integer key, and the `components` of an edge list.
Rows travel as a handle the executor owns (a pandas DataFrame here, object refs to Arrow blocks under Ray);
the functions a stage passes take and return plain pandas frames (or Arrow tables), and are
module-level so that a process pool or a Ray worker can receive them pickled.

`LocalExecutor` runs the tasks in a process pool on this machine (`workers` processes), with
the shuffles as sorts of one in-memory frame cut at group boundaries; `data_prep.ray_verbs`'s
`RayExecutor` runs the same definitions as plain Ray tasks. (datatrove's `executor/base.py` is
the example: a step is called with its rank and world size and never sees the executor.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep.config import PrepConfig
from data_prep.minhash import UnionFind
from data_prep.taskmem import measure, merge_peaks, start, task_name

_TYPES = {"int64": "int64", "object": "string", "bytes": "binary", "float": "float64",
          "bool": "bool"}


def worker_count(cfg: PrepConfig) -> int:
    """Processes for parallel work: cfg.workers, or every core when it is 0."""
    return cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)


def empty_frame(**cols: str) -> Any:
    """An empty block with these columns ("int64", "object" = string, "bytes", "float")."""
    import pyarrow as pa

    return pa.table({c: pa.array([], _TYPES[t]) for c, t in cols.items()})


def to_arrow(block: Any) -> Any:
    """`block` (pandas, Arrow or a dict of columns) as an Arrow table with plain string/binary
    columns, so the blocks of one shuffle agree on their schema whatever produced them."""
    import pyarrow as pa

    if isinstance(block, dict):
        block = pd.DataFrame(block)
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


def to_pandas(block: Any) -> pd.DataFrame:
    """`block` (pandas, Arrow or a dict of columns) as a pandas DataFrame."""
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):
        return pd.DataFrame(block)
    return block.to_pandas()


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a new run of equal values starts in the sorted `keys`."""
    if not len(keys):
        return np.empty(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))


def drop_frame(drops: list[tuple[int, int, str]]) -> Any:
    """(shard, row, detail) of each dropped document, as the frame the drop shuffle takes."""
    if not drops:
        return empty_frame(shard="int64", row="int64", detail="object")
    return pd.DataFrame(drops, columns=["shard", "row", "detail"])


class Executor(Protocol):
    """The verbs a stage is written against (see the module docstring). `Rows` is the
    executor's own handle; a stage only passes it from verb to verb."""

    name: str
    modules: tuple[str, ...]  # its code files, hashed into the key of every stage it runs

    def partitions(self, n_docs: int) -> int: ...

    def map_shards(self, items: list[dict[str, Any]], fn: Callable, desc: str = "",
                   **kw: Any) -> Any: ...

    def map_blocks(self, data: Any, fn: Callable, fmt: str = "pandas", **kw: Any) -> Any: ...

    def group_by(self, data: Any, key: str, fn: Callable, parts: int, fmt: str = "pandas",
                 **kw: Any) -> Any: ...

    def join(self, left: Any, right: Any, on: tuple[str, str], lcols: dict[str, str],
             rcols: dict[str, str], parts: int) -> Any: ...

    def components(self, edges: Any, parts: int) -> tuple[Any, int]: ...

    def from_items(self, items: list[dict[str, Any]]) -> Any: ...

    def union(self, a: Any, b: Any) -> Any: ...

    def rename(self, rows: Any, names: dict[str, str]) -> Any: ...

    def materialize(self, rows: Any) -> Any: ...

    def count(self, rows: Any) -> int: ...

    def sum(self, rows: Any, col: str) -> int: ...

    def rows(self, rows: Any) -> list[dict[str, Any]]: ...

    def iter_rows(self, rows: Any) -> Iterator[dict[str, Any]]: ...

    def each_shard(self, items: list[dict[str, Any]], fn: Callable, desc: str = "",
                   **kw: Any) -> Iterator[dict[str, Any]]: ...

    def task_peaks(self) -> dict[str, list[int]]: ...


# --------------------------------------------------------------------------- local
def _call(job: tuple[Callable, Any, dict[str, Any]]) -> tuple[pd.DataFrame, tuple[int, int]]:
    """One task in the pool: its frame and its (peak RSS, rise) (data_prep.taskmem)."""
    fn, arg, kw = job
    started = start()
    out = to_pandas(fn(arg, **kw))
    return out, measure(started)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f.columns)]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


class LocalExecutor:
    """This machine: tasks in a pool of `workers` processes (in this process when 1), rows as
    one pandas frame. Use as a context manager; the pool starts at the first parallel task."""

    name = "local"
    modules = ("executor.py",)

    def __init__(self, cfg: PrepConfig) -> None:
        self.workers, self.progress = worker_count(cfg), cfg.progress
        self._pool: ProcessPoolExecutor | None = None
        self._peaks: dict[str, list[int]] = {}

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _map(self, fn: Callable, args: list[Any], kw: dict[str, Any],
             desc: str = "") -> list[pd.DataFrame]:
        jobs = [(fn, a, kw) for a in args]
        if self.workers <= 1 or len(jobs) <= 1:
            done = map(_call, jobs)
        else:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers)
            done = self._pool.map(_call, jobs)
        bar = tqdm(done, desc=desc, total=len(jobs), unit="shard",
                   disable=not (self.progress and desc))
        out = []
        for frame, peak in bar:
            merge_peaks(self._peaks, task_name(fn), peak)
            out.append(frame)
        return out

    def task_peaks(self) -> dict[str, list[int]]:
        """[peak RSS, rise] of each kind of task (by function name) since the last call, in
        bytes (data_prep.taskmem)."""
        peaks, self._peaks = self._peaks, {}
        return peaks

    def partitions(self, n_docs: int) -> int:
        return max(1, 2 * self.workers)

    def map_shards(self, items: list[dict[str, Any]], fn: Callable, desc: str = "",
                   **kw: Any) -> pd.DataFrame:
        """`fn(item, **kw)` per item, one task each; `desc`: a progress bar over the tasks."""
        return _concat(self._map(fn, items, kw, desc))

    def map_blocks(self, data: pd.DataFrame, fn: Callable, fmt: str = "pandas",
                   **kw: Any) -> pd.DataFrame:
        return to_pandas(fn(to_arrow(data) if fmt == "pyarrow" else data, **kw))

    def group_by(self, data: pd.DataFrame, key: str, fn: Callable, parts: int,
                 fmt: str = "pandas", **kw: Any) -> pd.DataFrame:
        """Sorted by `key`, cut into about `parts` blocks at group boundaries, `fn` per block
        (in the pool): every group is seen whole by one call, as under Ray."""
        if not len(data):
            return self.map_blocks(data, fn, fmt, **kw)
        rows = data.sort_values(key, kind="stable", ignore_index=True)
        starts = group_starts(rows[key].to_numpy())
        cuts = sorted({int(starts[k]) for k in range(0, len(starts),
                                                      max(1, -(-len(starts) // parts)))})
        bounds = [*cuts[1:], len(rows)]
        blocks = [rows.iloc[a:b] for a, b in zip(cuts, bounds, strict=True)]
        if fmt == "pyarrow":
            blocks = [to_arrow(b) for b in blocks]
        return _concat(self._map(fn, blocks, kw))

    def join(self, left: pd.DataFrame, right: pd.DataFrame, on: tuple[str, str],
             lcols: dict[str, str], rcols: dict[str, str], parts: int) -> pd.DataFrame:
        rc = [c for c in rcols if c != on[1]]
        if not len(left) or not len(right):
            return to_pandas(empty_frame(**lcols, **{c: rcols[c] for c in rc}))
        # a column named but absent is null, as in Ray's tagged union
        left = left.assign(**{c: None for c in lcols if c not in left})
        r = right[[on[1], *rc]].rename(columns={on[1]: "_k"})
        out = left[list(lcols)].merge(r, left_on=on[0], right_on="_k", how="inner")
        return out[[*lcols, *rc]]

    def components(self, edges: pd.DataFrame, parts: int) -> tuple[pd.DataFrame, int]:
        """(node, comp) for every node of the edges (u, v); comp = its component's smallest
        node (union-find over the nodes in increasing order)."""
        u, v = edges["u"].to_numpy(np.int64), edges["v"].to_numpy(np.int64)
        nodes = np.unique(np.concatenate([u, v]))
        uf = UnionFind(len(nodes))
        for a, b in zip(np.searchsorted(nodes, u), np.searchsorted(nodes, v), strict=True):
            uf.union(int(a), int(b))
        comp = nodes[[uf.find(k) for k in range(len(nodes))]]
        return pd.DataFrame({"node": nodes, "comp": comp}), 0

    def from_items(self, items: list[dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame(items)

    def union(self, a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
        return _concat([a, b])

    def rename(self, rows: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
        return rows.rename(columns=names)

    def materialize(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows

    def count(self, rows: pd.DataFrame) -> int:
        return len(rows)

    def sum(self, rows: pd.DataFrame, col: str) -> int:
        return int(rows[col].sum()) if len(rows) else 0

    def rows(self, rows: pd.DataFrame) -> list[dict[str, Any]]:
        return rows.to_dict("records")

    def iter_rows(self, rows: pd.DataFrame) -> Iterator[dict[str, Any]]:
        return iter(rows.to_dict("records"))

    def each_shard(self, items: list[dict[str, Any]], fn: Callable, desc: str = "",
                   **kw: Any) -> Iterator[dict[str, Any]]:
        """`fn(item, **kw)` per item, one task each; their rows in item order."""
        for frame in self._map(fn, items, kw, desc):
            yield from frame.to_dict("records")
