"""near_dedup under `executor: ray`: distributed MinHash LSH over the shards (see data_prep.ray_exec's
docstring for the plan), built on the verbs of data_prep.ray_verbs."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.config import PrepConfig
from data_prep.dedup import (
    NearDedup,
    cluster_of,
    merge_verified,
    verified_edge,
)
from data_prep.minhash import (
    MinHasher,
    UnionFind,
    choose_bands_rows,
    choose_bands_rows_for_recall,
    jaccard,
    shingle_hashes,
)
from data_prep.ray_verbs import (
    connected_components,
    drop_frame,
    empty_frame,
    group_starts,
    grouped,
    join,
    map_blocks,
    partitions,
    rewrite_shards,
    shard_items,
    shards_in,
    take_top,
)
from data_prep.shardio import (
    shard_name,
    tmp_path,
)
from data_prep.stage import StageResult
from data_prep.store import num_docs, read_docs

log = logging.getLogger("data_prep")


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
            tmp = tmp_path(final)
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
        return empty_frame(key="object", g="int64")
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
    st = group_starts(keys)
    if not len(st):
        return empty_frame(p="int64")
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


def run_near(cfg: PrepConfig, inp: Path, out: Path, res: StageResult) -> None:

    m = cfg.dedup.minhash
    parts = partitions(cfg, num_docs(inp))
    if m.bands and m.rows:
        bands, rows = m.bands, m.rows
    elif m.verify:
        bands, rows = choose_bands_rows_for_recall(m.threshold, m.num_perm, m.fp_budget)
    else:
        bands, rows = choose_bands_rows(m.threshold, m.num_perm, m.fp_weight, m.fn_weight)
    files = shards_in(inp)
    sizes = [num_docs(f) for f in files]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    hasher = MinHasher(num_perm=m.num_perm, ngram=m.ngram, seed=m.seed)
    t0 = time.perf_counter()
    shard_items(inp).map_batches(
        _sig_shard, batch_size=1, fn_kwargs={"out": str(out), "hasher": hasher, "offsets": offsets}
    ).materialize()
    sig_s = time.perf_counter() - t0
    log.info("near_dedup: signatures of %d shards in %.1fs", len(files), sig_s)
    t1 = time.perf_counter()
    sigs = shard_items(inp).map_batches(_read_sigs, batch_size=1, fn_kwargs={"out": str(out)})
    n_docs = sum(sizes)
    n_has = int(sigs.sum("has") or 0) if n_docs else 0
    bucket = map_blocks(sigs, _band_rows, bands=bands, rows=rows, num_perm=m.num_perm)
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
            texts = shard_items(inp).map_batches(_text_rows, batch_size=1,
                                                  fn_kwargs={"offsets": offsets})
            ta = texts.rename_columns({"text": "text_a"})
            tb = texts.rename_columns({"text": "text_b"})
            with_a = join(pairs, ta, ("a", "g"), PAIR, {"g": "int64", "text_a": "object"}, parts)
            joined = join(with_a, tb, ("b", "g"), {**PAIR, "text_a": "object"},
                          {"g": "int64", "text_b": "object"}, parts)
            edges = map_blocks(joined, _verify, ngram=m.ngram, threshold=m.threshold)
            edges = edges.materialize()
            rejected = n_pairs - edges.count()
            log.info("near_dedup: %d pairs verified after %.1fs", n_pairs - rejected,
                     time.perf_counter() - t1)
        else:
            edges = map_blocks(pairs, _with_s)
        if edges.count():
            labels, rounds = connected_components(
                map_blocks(edges, _as_uv), parts)
            labels = labels.materialize()
            log.info("near_dedup: components in %d rounds after %.1fs", rounds,
                     time.perf_counter() - t1)
            nodes = join(labels, sigs, ("node", "g"), LABEL, SIG, parts)
            if m.verify and m.linkage == "complete":
                texts = shard_items(inp).map_batches(_text_rows, batch_size=1,
                                                      fn_kwargs={"offsets": offsets})
                nodes = join(nodes, texts, ("node", "g"), {**LABEL, **SIG},
                             {"g": "int64", "text": "object"}, parts)
            nodes = map_blocks(nodes, _node_rows)
            tagged = map_blocks(join(edges, labels, ("a", "node"), {**PAIR, "s": "float"}, LABEL,
                               parts), _edge_rows)
            clusters = grouped(nodes.union(tagged), "comp", _component, parts, cfg=cfg,
                               offsets=offsets).materialize()
    if clusters is not None and clusters.count():
        real = map_blocks(clusters, _real)
        n_clusters = real.count()
        in_clusters = int(real.sum("size") or 0) if n_clusters else 0
        blocked = int(clusters.sum("blocked") or 0)
        comps = take_top(map_blocks(real, _group_order_near), cfg.report.clusters_shown, ["neg_size", "survivor"], [True, True])
        drops = map_blocks(real, _near_drop_rows)
    else:
        n_clusters = in_clusters = blocked = 0
        drops = None
    lsh_s = time.perf_counter() - t1
    res.total, _ = rewrite_shards(drops if n_clusters else None, cfg, inp, out, res.name,
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
