"""Large-star / small-star (Kiveris et al., "Connected Components in MapReduce and Beyond",
SoCC 2014) as plain pandas steps on an edge list (u, v), one block at a time: the reduce
functions `data_prep.ray_verbs.connected_components` shuffles between. No Ray here."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.executor import empty_frame, group_starts


def both_ways(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"u": np.concatenate([u, v]), "v": np.concatenate([v, u])})


def large_star(df: pd.DataFrame) -> pd.DataFrame:
    """For each node u with neighbours N: link every neighbour v > u to m = min(N + {u})."""
    df = df.drop_duplicates().sort_values(["u", "v"])
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    st = group_starts(u)
    m = np.minimum(np.repeat(v[st], np.diff(np.append(st, len(u)))), u)  # v sorted: v[st] = min
    keep = v > u
    return pd.DataFrame({"u": v[keep], "v": m[keep]}).drop_duplicates()


def toward_smaller(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"u": np.maximum(u, v), "v": np.minimum(u, v)})


def small_star(df: pd.DataFrame) -> pd.DataFrame:
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


def roles(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()  # u > v: u is a child, v its parent
    return pd.DataFrame({"node": np.concatenate([u, v]),
                         "parent": np.concatenate([v, np.full(len(v), -1)])})


def not_star(df: pd.DataFrame) -> pd.DataFrame:
    """Nodes that break star form: a child with two parents, or a parent that is a child."""
    d = df.drop_duplicates()
    child = d[d["parent"] >= 0]
    two_parents = int((child.groupby("node").size() > 1).sum())
    parent_and_child = int(child["node"].drop_duplicates().isin(d["node"][d["parent"] < 0]).sum())
    return pd.DataFrame({"bad": [two_parents + parent_and_child]})


def labels(df: pd.DataFrame) -> pd.DataFrame:
    u, v = df["u"].to_numpy(), df["v"].to_numpy()
    return pd.DataFrame({"node": np.concatenate([u, v]), "comp": np.concatenate([v, v])})


def first_label(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("node")
