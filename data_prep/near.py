"""near_dedup: MinHash LSH over the shards, written once against data_prep.executor's verbs.

The usual distributed plan (Leskovec, Rajaraman, Ullman, *Mining of Massive Datasets*, ch. 3):
signatures in a map, one task per shard (written as resumable shards, `sigs/`); one row per
(band, band values) key, shuffled so that a bucket meets in one group, which emits the pairs
(first member, other member); the pairs shuffled again to drop repeats; with `verify`, the
texts joined onto both ends of each pair and the exact Jaccard checked; the connected
components of the pairs (union-find locally; large-star / small-star under Ray, Kiveris et al.,
"Connected Components in MapReduce and Beyond", SoCC 2014); then one group per component, which
applies complete linkage (`dedup.merge_verified`, exact because merges never cross components)
and the survivor rule (`minhash.survivor` via `dedup.cluster_of`); last every shard is
rewritten without the dropped rows. The driver holds counts and the `report.clusters_shown`
largest clusters, never a list of documents, pairs or labels.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from data_prep import storage
from data_prep.config import PrepConfig, to_dict
from data_prep.dedup import cluster_of, merge_verified, neg_size, verified_edge
from data_prep.executor import Executor, drop_frame, empty_frame, group_starts
from data_prep.minhash import (
    MinHasher,
    UnionFind,
    choose_bands_rows,
    choose_bands_rows_for_recall,
    jaccard,
    shingle_hashes,
)
from data_prep.shardio import shard_file
from data_prep.shardops import SHARD_MODULES, rewrite_shards, shard_items, take_top
from data_prep.stage import Stage, StageResult
from data_prep.store import num_docs, parquet, read_docs

log = logging.getLogger("data_prep")


def _sig_shard(item: dict[str, Any], out: str, hasher: MinHasher, offsets: list[int]) -> Any:
    """Signatures of one input shard into sigs/part-i.parquet (skipped when it exists), and
    the table itself: global index g, id, bytes, has-shingles, the signature as bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = int(item["shard"])
    final = shard_file(out, "sigs", i)
    if storage.exists(final):
        return parquet(final).read()
    docs = list(read_docs(item["path"]))
    sig, has = hasher.signatures([d.text for d in docs])
    table = pa.table({
        "g": pa.array(np.arange(len(docs), dtype=np.int64) + offsets[i]),
        "id": pa.array([d.id for d in docs], pa.string()),
        "nbytes": pa.array([d.nbytes for d in docs], pa.int64()),
        "has": pa.array(has, pa.bool_()),
        "sig": pa.array([r.tobytes() for r in sig], pa.binary()),
    })
    tmp = storage.scratch(final)
    pq.write_table(table, tmp)
    storage.commit(tmp, final)
    return table


def _band_rows(df: pd.DataFrame, bands: int, rows: int, num_perm: int) -> pd.DataFrame:
    """One row per LSH bucket (band number + that band's values) met in this block's documents
    with shingles: `key`, `g` = the lowest member here, `more` = the other members here (their
    g as int64 bytes). A map-side combine: a bucket crosses the shuffle as one row per block,
    not one per member, so a bucket that grows with the corpus (the synthetic corpus draws
    from a fixed paragraph pool) no longer lands whole, a row per member, in one reducer, nor
    fills the shuffle's key sample and merges its ranges."""
    df = df[df["has"]]
    if not len(df):
        return empty_frame(key="object", g="int64", more="bytes")
    g = df["g"].to_numpy(np.int64)
    order = np.argsort(g, kind="stable")  # members ascending: each bucket's first is its lowest
    g = g[order]
    sig = np.frombuffer(b"".join(df["sig"].tolist()), np.uint32).reshape(len(df), num_perm)[order]
    keys: list[bytes] = []
    firsts, mores = [], []
    for band in range(bands):
        vals = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        vals = vals.view(np.dtype((np.void, 4 * rows))).ravel()
        _, first, inv, counts = np.unique(vals, return_index=True, return_inverse=True,
                                          return_counts=True)
        members = g[np.argsort(inv.ravel(), kind="stable")]  # by bucket, ascending g in each
        ends = np.cumsum(counts)
        prefix = band.to_bytes(2, "little")
        keys.extend(prefix + vals[i].tobytes() for i in first.tolist())
        firsts.append(g[first])
        mores.extend(members[e - c + 1:e].tobytes() if c > 1 else b""
                     for e, c in zip(ends.tolist(), counts.tolist(), strict=True))
    return pd.DataFrame({"key": keys, "g": np.concatenate(firsts), "more": mores})


def _bucket_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Per LSH bucket (equal key: the executor hands the rows sorted by key, one row per block
    the bucket met, see `_band_rows`): the pairs (first = the bucket's lowest g, each other
    member), as `band_candidates` makes them. Members cost 8 bytes each here, not a row."""
    keys = df["key"].to_numpy()
    g = df["g"].to_numpy(np.int64)
    st = group_starts(keys)
    if not len(st):
        return empty_frame(p="int64")
    per_row = np.diff(np.append(st, len(g)))
    first = np.repeat(np.minimum.reduceat(g, st), per_row)  # each row's bucket's lowest g
    more = df["more"].tolist()
    n_more = np.fromiter((len(b) for b in more), np.int64, len(more)) // 8
    others = np.concatenate([g[g != first], np.frombuffer(b"".join(more), np.int64)])
    firsts = np.concatenate([first[g != first], np.repeat(first, n_more)])
    return pd.DataFrame({"p": (firsts << 32) | others})


def _unique_pairs(df: pd.DataFrame) -> pd.DataFrame:
    p = np.unique(df["p"].to_numpy())
    return pd.DataFrame({"a": p >> 32, "b": p & 0xFFFFFFFF})


def _with_shard(df: pd.DataFrame, key: str, offsets: list[int]) -> pd.DataFrame:
    """`df` with `_shard`: the input shard of the document its column `key` (g) names."""
    g = df[key].to_numpy(np.int64)
    return df.assign(_shard=np.searchsorted(np.asarray(offsets), g, side="right") - 1)


def _attach(df: pd.DataFrame, by: str, files: list[str], offsets: list[int],
            cols: dict[str, str]) -> pd.DataFrame:
    """The rows of `df` (those of some shards, grouped by `_shard`) with the columns `cols`
    (file column -> new name) of the document each one's column `by` names, read from its shard's
    file (`files[shard]`: a document shard or a signature shard, one row per document in
    order), one shard at a time: only the documents named travel, never a whole shard's."""
    import pyarrow as pa

    g = df[by].to_numpy(np.int64)
    shard = df["_shard"].to_numpy(np.int64)
    got: dict[str, list] = {new: [None] * len(df) for new in cols.values()}
    for i in np.unique(shard):
        sel = np.flatnonzero(shard == i)
        t = parquet(files[int(i)]).read(columns=list(cols))
        rows = pa.array(g[sel] - offsets[int(i)])
        for col, new in cols.items():
            vals = t[col].take(rows).to_pylist()
            out = got[new]
            for k, v in zip(sel.tolist(), vals, strict=True):
                out[k] = v
    return df.drop(columns=["_shard"]).assign(**got)


def attach(ex: Executor, rows: Any, key: str, files: list[str], offsets: list[int],
           cols: dict[str, str], parts: int) -> Any:
    """`rows` with the columns `cols` of the documents their `key` names (see `_attach`): a
    shuffle by the shard that holds each document, whose reducers read the shards' files. (A
    join with a map over every document, which this replaces, held every document's text in
    the shuffle and a block per shard in the driver.)"""
    return ex.group_by(ex.map_blocks(rows, _with_shard, key=key, offsets=offsets), "_shard",
                       _attach, parts, by=key, files=files, offsets=offsets, cols=cols)


def _verify(df: pd.DataFrame, ngram: int, threshold: float) -> pd.DataFrame:
    """The candidate pairs whose exact Jaccard (of their shingle sets) reaches `threshold`."""
    s = np.asarray([jaccard(shingle_hashes(x, ngram), shingle_hashes(y, ngram))
                    for x, y in zip(df["text_a"], df["text_b"], strict=True)], float)
    ok = s >= threshold
    return pd.DataFrame({"a": df["a"].to_numpy()[ok], "b": df["b"].to_numpy()[ok], "s": s[ok]})


# large-star / small-star (Kiveris et al. 2014) on an edge list with columns u, v
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
        return empty_frame(survivor="object", size="int64", members="object", blocked="int64")
    return pd.DataFrame(out)


def _near_drop_rows(df: pd.DataFrame) -> pd.DataFrame:
    return drop_frame([(shard, row, f"near-duplicate of {keep} (estimated Jaccard {s:.2f})")
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


class NearDedup(Stage):
    """Near duplicates by MinHash LSH (see the module docstring); the survivor of each cluster
    stays, the others are dropped under `near_duplicate`."""

    name = "near_dedup"
    reason = "near_duplicate"
    modules = ("near.py", "dedup.py", "minhash.py", *SHARD_MODULES)

    def part(self, cfg: PrepConfig) -> Any:
        return to_dict(cfg)["dedup"]["minhash"]

    def enabled(self, cfg: PrepConfig) -> bool:
        return cfg.dedup.minhash.enabled

    def run(self, cfg: PrepConfig, ex: Executor, inp: str | None, out: str,
            res: StageResult) -> None:
        assert inp is not None
        res.extra = run_near(cfg, ex, inp, out, res)


def bands_rows(cfg: PrepConfig) -> tuple[int, int]:
    m = cfg.dedup.minhash
    if m.bands and m.rows:
        return m.bands, m.rows
    if m.verify:
        return choose_bands_rows_for_recall(m.threshold, m.num_perm, m.fp_budget)
    return choose_bands_rows(m.threshold, m.num_perm, m.fp_weight, m.fn_weight)


def run_near(cfg: PrepConfig, ex: Executor, inp: str, out: str,
             res: StageResult) -> dict[str, Any]:
    """The plan of the module docstring; fills res.total, returns the report's extras."""
    m = cfg.dedup.minhash
    parts = ex.partitions(num_docs(inp))
    bands, rows = bands_rows(cfg)
    items = shard_items(inp)
    sizes = [num_docs(it["path"]) for it in items]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    hasher = MinHasher(num_perm=m.num_perm, ngram=m.ngram, seed=m.seed)
    t0 = time.perf_counter()
    sigs = ex.materialize(ex.map_shards(items, _sig_shard, desc="near_dedup signatures", out=out, hasher=hasher,
                                        offsets=offsets))
    sig_s = time.perf_counter() - t0
    log.info("near_dedup: signatures of %d shards in %.1fs", len(items), sig_s)
    t1 = time.perf_counter()
    n_docs = sum(sizes)
    n_has = ex.sum(sigs, "has") if n_docs else 0
    bucket = ex.map_blocks(sigs, _band_rows, bands=bands, rows=rows, num_perm=m.num_perm)
    pairs = ex.materialize(ex.group_by(ex.group_by(bucket, "key", _bucket_pairs, parts), "p",
                                       _unique_pairs, parts))
    n_pairs = ex.count(pairs)
    log.info("near_dedup: %d candidate pairs after %.1fs", n_pairs, time.perf_counter() - t1)
    rejected = rounds = 0
    clusters = None
    if n_pairs:
        docs = [it["path"] for it in items]
        if m.verify:
            with_a = attach(ex, pairs, "a", docs, offsets, {"text": "text_a"}, parts)
            joined = attach(ex, with_a, "b", docs, offsets, {"text": "text_b"}, parts)
            edges = ex.materialize(ex.map_blocks(joined, _verify, ngram=m.ngram,
                                                 threshold=m.threshold))
            rejected = n_pairs - ex.count(edges)
            log.info("near_dedup: %d pairs verified after %.1fs", n_pairs - rejected,
                     time.perf_counter() - t1)
        else:
            edges = ex.map_blocks(pairs, _with_s)
        if ex.count(edges):
            labels, rounds = ex.components(ex.map_blocks(edges, _as_uv), parts)
            labels = ex.materialize(labels)
            log.info("near_dedup: components in %d rounds after %.1fs", rounds,
                     time.perf_counter() - t1)
            sig_files = [shard_file(out, "sigs", i) for i in range(len(items))]
            nodes = attach(ex, labels, "node", sig_files, offsets,
                           {c: c for c in SIG if c != "g"}, parts)
            if m.verify and m.linkage == "complete":
                nodes = attach(ex, nodes, "node", docs, offsets, {"text": "text"}, parts)
            nodes = ex.map_blocks(nodes, _node_rows)
            tagged = ex.map_blocks(ex.join(edges, labels, ("a", "node"),
                                           {**PAIR, "s": "float"}, LABEL, parts), _edge_rows)
            clusters = ex.materialize(ex.group_by(ex.union(nodes, tagged), "comp", _component,
                                                  parts, cfg=cfg, offsets=offsets))
    comps: list[dict[str, Any]] = []
    n_clusters = in_clusters = blocked = 0
    drops = None
    if clusters is not None and ex.count(clusters):
        real = ex.materialize(ex.map_blocks(clusters, _real))
        n_clusters = ex.count(real)
        in_clusters = ex.sum(real, "size") if n_clusters else 0
        blocked = ex.sum(clusters, "blocked")
        comps = take_top(ex, ex.map_blocks(real, neg_size), cfg.report.clusters_shown,
                         ["neg_size", "survivor"], [True, True])
        drops = ex.map_blocks(real, _near_drop_rows) if n_clusters else None
    lsh_s = time.perf_counter() - t1
    res.total, _ = rewrite_shards(ex, drops, cfg, inp, out, res.name, NearDedup.reason, parts)
    return {
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
