"""The local executor's verbs: a shuffle sees every key group whole in one call, whatever the
number of blocks or processes; join and components agree with a plain computation."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from data_prep import load_config
from data_prep.executor import LocalExecutor
from data_prep.minhash import UnionFind

from .conftest import TINY


def _groups_seen(df: pd.DataFrame) -> pd.DataFrame:
    """Per key in this block: its row count (a group split across calls would repeat a key)."""
    counts = df.groupby("k").size()
    return pd.DataFrame({"k": counts.index.to_numpy(), "n": counts.to_numpy()})


@pytest.mark.parametrize("workers,parts", [(1, 1), (1, 7), (2, 3), (2, 50)])
def test_group_by_sees_each_group_whole(workers, parts):
    rng = random.Random(workers * 100 + parts)
    keys = [rng.randrange(40) for _ in range(500)]
    cfg = load_config(TINY, [f"workers={workers}"])
    with LocalExecutor(cfg) as ex:
        got = ex.group_by(pd.DataFrame({"k": keys, "v": range(500)}), "k", _groups_seen, parts)
    assert got["k"].is_unique  # no key reached two calls
    assert dict(zip(got["k"], got["n"], strict=True)) == pd.Series(keys).value_counts().to_dict()


def test_join_and_components():
    cfg = load_config(TINY, ["workers=1"])
    with LocalExecutor(cfg) as ex:
        left = pd.DataFrame({"a": [1, 2, 3, 3], "x": ["p", "q", "r", "s"]})
        right = pd.DataFrame({"g": [3, 1, 9], "t": ["three", "one", "nine"]})
        j = ex.join(left, right, ("a", "g"), {"a": "int64", "x": "object"},
                    {"g": "int64", "t": "object"}, 2)
        assert list(j.columns) == ["a", "x", "t"]
        assert sorted(map(tuple, j.to_numpy().tolist())) == [
            (1, "p", "one"), (3, "r", "three"), (3, "s", "three")]
        rng = random.Random(5)
        edges = [(rng.randrange(60), rng.randrange(60)) for _ in range(45)]
        labels, _ = ex.components(pd.DataFrame({"u": [a for a, _ in edges],
                                                "v": [b for _, b in edges]}), 2)
    uf = UnionFind(60)
    for a, b in edges:
        uf.union(a, b)
    got = dict(zip(labels["node"], labels["comp"], strict=True))
    assert set(got) == {x for e in edges for x in e}
    assert all(got[x] == uf.find(x) for x in got)  # the smallest node of its component
