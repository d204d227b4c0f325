"""Deduplication: exact (equal normalised text) and the near-duplicate library (MinHash LSH).

Both use the same survivor rule, so it does not matter in which order documents arrive: in a
group of duplicates the longest document (most UTF-8 bytes) survives, ties broken by the
smallest id. For exact duplicates all lengths are equal, so the smallest id survives.

`ExactDedup` is the exact stage, written once against the executor's verbs; the near-duplicate
stage is data_prep.near's `NearDedup`, built on `merge_verified` and `cluster_of` here.
`exact_duplicates` and `near_duplicates` are the same rules over lists in one process (the
bench's labelled-set quality and the tests use them).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xxhash
from tqdm import tqdm

from data_prep.config import MinHashConfig, PrepConfig, to_dict
from data_prep.document import Document
from data_prep.executor import Executor, drop_frame, empty_frame
from data_prep.minhash import (
    MinHasher,
    UnionFind,
    band_candidates,
    choose_bands_rows,
    choose_bands_rows_for_recall,
    estimated_jaccard,
    jaccard,
    parallel_signatures,
    shingle_sets,
    survivor,
)
from data_prep.shardops import SHARD_MODULES, rewrite_shards, shard_items, take_top
from data_prep.stage import Stage, StageResult
from data_prep.store import num_docs, read_docs

log = logging.getLogger("data_prep")


def text_hash(text: str) -> int:
    return xxhash.xxh3_128_intdigest(text.encode("utf-8", "surrogatepass"))


@dataclass
class ExactDedupResult:
    drop: dict[str, str]  # id of a duplicate -> id of the survivor of its group
    groups: list[list[str]]  # groups of 2+ ids with equal text, survivor first, largest first


def exact_duplicates(docs: Iterable[Document]) -> ExactDedupResult:
    """Group documents by a 128-bit hash of their text; all but the smallest id are duplicates."""
    members: dict[int, list[str]] = defaultdict(list)
    for d in docs:
        members[text_hash(d.text)].append(d.id)
    drop: dict[str, str] = {}
    groups = []
    for ids in members.values():
        if len(ids) > 1:
            ids = sorted(ids)
            groups.append(ids)
            for other in ids[1:]:
                drop[other] = ids[0]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return ExactDedupResult(drop, groups)


@dataclass
class NearDedupResult:
    drop: dict[str, tuple[str, float]]  # id -> (survivor id, estimated Jaccard to it)
    clusters: list[
        dict[str, Any]
    ]  # survivor, members (id, est. Jaccard to survivor), largest first
    bands: int
    rows: int
    stats: dict[str, Any] = field(default_factory=dict)


def verified_edge(s: float, ids: Sequence[str], a: int, b: int) -> tuple[float, str, str, int, int]:
    """A verified pair as merge_verified sorts it: highest Jaccard first, then by ids."""
    return (-s, *sorted((ids[a], ids[b])), a, b)


def merge_verified(
    edges: list[tuple[float, str, str, int, int]],
    uf: UnionFind,
    exact: Callable[[int, int], float],
    threshold: float,
    linkage: str,
) -> int:
    """Join the clusters of the verified `edges` (see `verified_edge`) in `uf`, in order of
    decreasing Jaccard; with complete linkage only when every pair across the two clusters has
    `exact` Jaccard >= threshold. Returns the merges so blocked. Merges happen only along edges,
    so running this on each connected component of the edges alone gives the same clusters."""
    edges.sort()
    members = {i: [i] for e in edges for i in e[3:]}
    blocked = 0
    for *_, a, b in edges:
        ra, rb = uf.find(a), uf.find(b)
        if ra == rb:
            continue
        if linkage == "complete" and any(
            exact(x, y) < threshold for x in members[ra] for y in members[rb]
        ):
            blocked += 1
            continue
        uf.union(ra, rb)
        root = uf.find(ra)
        members[root] = members.pop(ra) + members.pop(rb)
    return blocked


def cluster_of(
    group: Sequence[int], nbytes: Sequence[int], ids: Sequence[str], sig: np.ndarray
) -> dict[str, Any]:
    """A near-duplicate cluster of 2+ documents: its survivor (`minhash.survivor`) and the
    others by id, each with its estimated Jaccard to the survivor."""
    keep = survivor(group, nbytes, ids)
    rest = sorted((m for m in group if m != keep), key=lambda m: ids[m])
    sims = [(ids[m], round(estimated_jaccard(sig[keep], sig[m]), 3)) for m in rest]
    return {"survivor": ids[keep], "size": len(group), "members": sims}


def near_duplicates(
    ids: list[str],
    texts: list[str],
    *,
    ngram: int = 5,
    num_perm: int = 128,
    threshold: float = 0.8,
    bands: int = 0,
    rows: int = 0,
    fp_weight: float = 0.5,
    fn_weight: float = 0.5,
    fp_budget: float = 0.2,
    verify: bool = False,
    linkage: str = "complete",
    seed: int = 1,
    workers: int = 1,
    batch_docs: int = 64,
    progress: bool = False,
) -> NearDedupResult:
    """Cluster near-duplicate documents with MinHash LSH and union-find.

    Candidate pairs come from LSH buckets (each member paired with the bucket's first member).
    Without `verify` every candidate pair is merged, and bands x rows (unless given) minimise
    the weighted false-positive and false-negative areas (`choose_bands_rows`). With `verify`,
    a pair is merged only if the exact Jaccard of its shingle sets reaches `threshold`, so
    bands x rows minimise the false negatives under the budget `fp_budget` on the false
    candidates (`choose_bands_rows_for_recall`), and the verified pairs are merged in order of
    decreasing Jaccard (ties: by ids): with `linkage="single"` each one joins its two clusters;
    with `linkage="complete"` (the default) two clusters join only if every pair across them
    reaches `threshold` too, so no two documents of a cluster are below it: a chain
    a ~ b ~ c never merges a and c when they are not near-duplicates themselves. Documents
    without any word are left to exact dedup. `progress`: tqdm bars over the signatures and the
    verification of candidates.
    """
    if linkage not in ("single", "complete"):
        raise ValueError(f"linkage={linkage!r}; valid: single, complete")
    if not (bands and rows):
        if verify:
            bands, rows = choose_bands_rows_for_recall(threshold, num_perm, fp_budget)
        else:
            bands, rows = choose_bands_rows(threshold, num_perm, fp_weight, fn_weight)
    hasher = MinHasher(num_perm=num_perm, ngram=ngram, seed=seed)
    t0 = time.perf_counter()
    sig, has = parallel_signatures(
        hasher, texts, workers=workers, batch_docs=batch_docs, progress=progress
    )
    sig_s = time.perf_counter() - t0
    idx = np.flatnonzero(has)
    t1 = time.perf_counter()
    pairs = [(int(idx[a]), int(idx[b])) for a, b in band_candidates(sig[idx], bands, rows)]
    uf = UnionFind(len(ids))
    shingles: dict[int, np.ndarray] = {}
    if verify:  # the shingle sets of every document in a candidate pair, in batches
        need = sorted({i for p in pairs for i in p})
        shingles = dict(zip(need, shingle_sets([texts[i] for i in need], ngram), strict=True))

    def exact(a: int, b: int) -> float:
        return jaccard(shingles[a], shingles[b])

    rejected = blocked = 0
    if not verify:
        for a, b in pairs:
            uf.union(a, b)
    else:
        edges = []
        for a, b in tqdm(pairs, desc="near_dedup verify", unit="pair", disable=not progress):
            s = exact(a, b)
            if s < threshold:
                rejected += 1
            else:
                edges.append(verified_edge(s, ids, a, b))
        blocked = merge_verified(edges, uf, exact, threshold, linkage)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in {i for p in pairs for i in p}:
        groups[uf.find(i)].append(i)
    nbytes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    drop: dict[str, tuple[str, float]] = {}
    clusters = []
    for group in groups.values():
        if len(group) < 2:
            continue
        c = cluster_of(group, nbytes, ids, sig)
        for mid, s in c["members"]:
            drop[mid] = (c["survivor"], s)
        clusters.append(c)
    clusters.sort(key=lambda c: (-c["size"], c["survivor"]))
    stats = {
        "documents": len(ids),
        "documents_without_shingles": int(len(ids) - has.sum()),
        "candidate_pairs": len(pairs),
        "pairs_rejected_by_verification": rejected,
        "merges_blocked_by_linkage": blocked,
        "clusters": len(clusters),
        "documents_in_clusters": sum(c["size"] for c in clusters),
        "signature_s": round(sig_s, 4),
        "signatures_per_s": round(len(texts) / sig_s, 1) if sig_s > 0 else None,
        "lsh_and_clustering_s": round(time.perf_counter() - t1, 4),
    }
    return NearDedupResult(drop, clusters, bands, rows, stats)


# --------------------------------------------------------------------------- the exact stage
def _hash_rows(item: dict[str, Any]) -> dict[str, list]:
    """(text hash, id, shard, row) of every document of one shard."""
    out: dict[str, list] = {"h": [], "id": [], "shard": [], "row": []}
    i = int(item["shard"])
    for row, d in enumerate(read_docs(item["path"])):
        out["h"].append(f"{text_hash(d.text):032x}")
        out["id"].append(d.id)
        out["shard"].append(i)
        out["row"].append(row)
    return out


def _exact_groups(df: pd.DataFrame) -> Any:
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
        return empty_frame(keep="object", size="int64", members="object")
    return pd.DataFrame(rows)


def _exact_drop_rows(df: pd.DataFrame) -> Any:
    return drop_frame([(s, r, f"same text as {keep}")
                       for keep, members in zip(df["keep"], df["members"], strict=True)
                       for s, r, _ in json.loads(members)])


def neg_size(df: pd.DataFrame) -> pd.DataFrame:
    """The groups with a `neg_size` column, to list the largest first."""
    return df.assign(neg_size=-df["size"])


class ExactDedup(Stage):
    """Equal texts: a map hashing every document (xxh3-128), a shuffle by the hash, and per
    group of 2+ the smallest id survives; every shard is then rewritten without the others."""

    name = "exact_dedup"
    reason = "exact_duplicate"
    modules = ("dedup.py", *SHARD_MODULES)

    def part(self, cfg: PrepConfig) -> Any:
        return to_dict(cfg)["dedup"]["exact"]

    def enabled(self, cfg: PrepConfig) -> bool:
        return cfg.dedup.exact.enabled

    def run(self, cfg: PrepConfig, ex: Executor, inp: str | None, out: str,
            res: StageResult) -> None:
        assert inp is not None
        parts = ex.partitions(num_docs(inp))
        hashes = ex.map_shards(shard_items(inp), _hash_rows, desc="exact_dedup hash")
        groups = ex.materialize(ex.group_by(hashes, "h", _exact_groups, parts))
        n_groups = ex.count(groups)
        shown = take_top(ex, ex.map_blocks(groups, neg_size), cfg.report.clusters_shown,
                         ["neg_size", "keep"], [True, True])
        drops = ex.map_blocks(groups, _exact_drop_rows) if n_groups else None
        res.total, _ = rewrite_shards(ex, drops, cfg, inp, out, res.name, self.reason, parts)
        res.extra = {
            "groups": n_groups,
            "groups_shown": [[r["keep"], *(m[2] for m in json.loads(r["members"]))]
                             for r in shown],
        }


def minhash_kwargs(m: MinHashConfig) -> dict[str, Any]:
    """`near_duplicates`' settings from the config's `dedup.minhash` (all but `enabled`)."""
    return {k: v for k, v in asdict(m).items() if k != "enabled"}
