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

Modules: this one (read, step stages, exact dedup, the `RayExecutor` handed to `run_stage`),
data_prep.ray_near (near dedup), data_prep.ray_verbs (session, shuffle, join, components, shard
rewrite), data_prep.shardio (atomic shard files).

The driver holds only per-shard accounting, counts and the `report.clusters_shown` largest
groups, never a list of documents, pairs or labels.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.config import PrepConfig, to_dict
from data_prep.dedup import (
    ExactDedup,
    NearDedup,
    text_hash,
)
from data_prep.document import Document
from data_prep.ray_near import run_near
from data_prep.ray_verbs import (
    collect,
    drop_frame,
    empty_frame,
    grouped,
    map_blocks,
    partitions,
    rewrite_shards,
    shard_items,
    shards_in,
    take_top,
)
from data_prep.shardio import (
    RollingOutput,
    ShardOutput,
    shard_done,
)
from data_prep.stage import (
    Stage,
    StageResult,
    StepsStage,
    new_stats,
)
from data_prep.stats import StepStats
from data_prep.steps import run_steps
from data_prep.store import num_docs, read_docs

log = logging.getLogger("data_prep")
# stages that run on Ray under `executor: ray`; the others on the driver
RAY_STAGES = ("read", "normalize", "filter", "exact_dedup", "near_dedup", "pii")
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
    ds = shard_items(inp).map_batches(
        _steps_shard, batch_size=1,
        fn_kwargs={"stage": stage, "cfg": cfg, "out": str(out), "name": res.name},
    )
    total = new_stats(cfg, res.name)
    per = {s.name: new_stats(cfg, s.name) for s in stage.build(cfg)}
    for acct in collect(ds):
        total.merge(StepStats.from_dict(acct["total"]))
        for s in acct["steps"]:
            per[s["name"]].merge(StepStats.from_dict(s))
    res.total, res.steps = total, list(per.values())


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
        return empty_frame(shard="int64", row="int64", detail="object")
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
    files = shards_in(inp)
    source_of = [shard_done(raw, i)["source"] for i in range(len(files))]  # type: ignore[index]
    parts = partitions(cfg, num_docs(inp))
    ids = shard_items(inp).map_batches(_id_rows, batch_size=1)
    total, accts = rewrite_shards(grouped(ids, "id", _repeated_ids, parts), cfg, inp, out, res.name,
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
        return empty_frame(keep="object", size="int64", members="object")
    return pd.DataFrame(rows)


def _exact_drop_rows(df: pd.DataFrame) -> pd.DataFrame:
    return drop_frame([(s, r, f"same text as {keep}")
                        for keep, members in zip(df["keep"], df["members"], strict=True)
                        for s, r, _ in json.loads(members)])


def run_exact(cfg: PrepConfig, inp: Path, out: Path, res: StageResult) -> None:
    parts = partitions(cfg, num_docs(inp))
    hashes = shard_items(inp).map_batches(_hash_rows, batch_size=1)
    groups = grouped(hashes, "h", _exact_groups, parts).materialize()
    n_groups = groups.count()
    shown = take_top(map_blocks(groups, _group_order),
                      cfg.report.clusters_shown, ["neg_size", "keep"], [True, True])
    drops = map_blocks(groups, _exact_drop_rows)
    res.total, _ = rewrite_shards(drops if n_groups else None, cfg, inp, out, res.name,
                            ExactDedup.reason, parts)
    res.extra = {
        "groups": n_groups,
        "groups_shown": [[r["keep"], *(m[2] for m in json.loads(r["members"]))] for r in shown],
    }


def _group_order(df: pd.DataFrame) -> pd.DataFrame:
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


class RayExecutor:
    """data_prep.stage.Executor for `executor: ray`: places RAY_STAGES on Ray (`run`)."""

    modules = ("ray_exec.py", "ray_near.py", "ray_verbs.py", "shardio.py")  # hashed into the key of every stage run under Ray

    def places(self, stage: Stage) -> bool:
        return stage.name in RAY_STAGES

    def part(self, cfg: PrepConfig) -> Any:
        """What of the config the layout of a Ray stage output depends on (for its key)."""
        return ["ray", to_dict(cfg)["ray"]["shard_docs"]]

    def run(self, stage: Stage, cfg: PrepConfig, inp: Path | None, out: Path,
            res: StageResult) -> None:
        run(stage, cfg, inp, out, res)
