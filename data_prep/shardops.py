"""Executor-neutral work on a stage's shards: the input shards as task items, the per-shard
accounting a stage merges, the step stages (normalize, filter, pii: one task per shard), and
rewriting every shard without the rows a shuffle named (how both dedup stages and read's
repeated ids drop documents). Written once against data_prep.executor's verbs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pandas as pd

from data_prep import storage
from data_prep.config import PrepConfig, to_dict
from data_prep.document import Document
from data_prep.executor import Executor
from data_prep.shardio import ShardOutput, shard_done
from data_prep.stage import STEP_MODULES, Stage, StageResult, new_stats
from data_prep.stats import StepStats
from data_prep.steps import Step, run_steps
from data_prep.store import doc_files, read_docs

SHARD_MODULES = ("shardops.py", "shardio.py", "executor.py", *STEP_MODULES)


def shard_items(inp: str) -> list[dict[str, Any]]:
    """One task item per input shard: its index and path (or URL), in document order."""
    return [{"shard": i, "path": p} for i, p in enumerate(doc_files(inp))]


def accounts(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each shard's accounting from the rows (shard, acct) as an executor streams them
    (`each_shard`, `iter_rows`: shard order), one at a time, so that a stage merges them as
    they arrive and the driver keeps none."""
    last = -1
    for r in rows:
        if int(r["shard"]) <= last:
            raise RuntimeError(f"shard {r['shard']}'s accounting came after shard {last}'s")
        last = int(r["shard"])
        yield json.loads(r["acct"])


def _acct_row(i: int, acct: dict[str, Any]) -> dict[str, list]:
    return {"shard": [i], "acct": [json.dumps(acct)]}


def _top(df: pd.DataFrame, k: int, by: list[str], ascending: list[bool]) -> pd.DataFrame:
    return df.sort_values(by, ascending=ascending).head(k)


def take_top(ex: Executor, rows: Any, k: int, by: list[str],
             ascending: list[bool]) -> list[dict[str, Any]]:
    """The first `k` rows in the order `by`: k per block in the tasks, then k overall here."""
    if k <= 0:
        return []
    got = ex.rows(ex.map_blocks(rows, _top, k=k, by=by, ascending=ascending))
    return _top(pd.DataFrame(got), k, by, ascending).to_dict("records") if got else []


# --------------------------------------------------------------------------- step stages
_STEPS_CACHE: dict[str, list[Step]] = {}


def _steps_shard(item: dict[str, Any], stage: StepsStage, cfg: PrepConfig, out: str,
                 name: str) -> dict[str, list]:
    """One shard through the stage's steps into its output shard (skipped when complete)."""
    i, rep = int(item["shard"]), cfg.report
    acct = shard_done(out, i)
    if acct is None:
        key = f"{name} {cfg!r}"  # a worker outlives a run: a new config, new steps
        steps = _STEPS_CACHE.get(key)
        if steps is None:
            _STEPS_CACHE.clear()
            steps = _STEPS_CACHE[key] = stage.build(cfg)
        total = StepStats(name, rep.examples_per_reason, rep.snippet_chars)
        per = {s.name: StepStats(s.name, rep.examples_per_reason, rep.snippet_chars)
               for s in steps}
        dropped: list[tuple[Document, str, str]] = []
        o = ShardOutput(cfg, out, i)
        for d in run_steps(steps, read_docs(item["path"]), total, per, dropped):
            o.docs.write(d)
        for d, reason, detail in dropped:  # counted by run_steps; written for the report
            o.dropped.write(d, reason, detail)
        acct = o.commit({"total": total.to_dict(), "steps": [s.to_dict() for s in per.values()]})
    return _acct_row(i, acct)


class StepsStage(Stage):
    """Runs the Steps `build(cfg)` returns over every document, one task per shard; records
    the stage total and every step's stats, merged in shard order (so counts and examples do
    not depend on the executor).

    `section` is the config section it depends on, `modules` the files of its steps; `build`
    must be a module-level function (tasks receive it pickled). The stage is disabled when
    `build` returns no step.
    """

    def __init__(
        self, name: str, section: str, modules: tuple[str, ...],
        build: Callable[[PrepConfig], list[Step]],
    ) -> None:
        self.name, self.section, self.build = name, section, build
        self.modules = (*modules, *SHARD_MODULES)

    def part(self, cfg: PrepConfig) -> Any:
        return to_dict(cfg)[self.section]

    def enabled(self, cfg: PrepConfig) -> bool:
        return bool(self.build(cfg))

    def run(self, cfg: PrepConfig, ex: Executor, inp: str | None, out: str,
            res: StageResult) -> None:
        assert inp is not None
        rows = ex.each_shard(shard_items(inp), _steps_shard, desc=res.name, stage=self, cfg=cfg,
                             out=out, name=res.name)
        total = new_stats(cfg, res.name)
        per = {s.name: new_stats(cfg, s.name) for s in self.build(cfg)}
        for acct in accounts(rows):
            total.merge(StepStats.from_dict(acct["total"]))
            for s in acct["steps"]:
                per[s["name"]].merge(StepStats.from_dict(s))
        res.total, res.steps = total, list(per.values())


# --------------------------------------------------------------------------- shard rewrite
def _apply_drops(df: pd.DataFrame, cfg: PrepConfig, out: str, inputs: list[str], name: str,
                 reason: str, earlier: list[str] | None = None) -> pd.DataFrame:
    """Per shard of this block: rewrite it without the rows named (row >= 0; row -1 marks a
    shard with no drops), each drop counted under `reason` with its detail. `earlier`: per
    input shard, a file of drops already written (jsonl), which leads the shard's own dropped
    file (committed with it)."""
    rep = cfg.report
    shards, accts = [], []
    for i, g in df.groupby("shard", sort=True):
        i = int(i)
        acct = shard_done(out, i)
        if acct is None:
            drops = {int(r): d for r, d in zip(g["row"], g["detail"], strict=True) if r >= 0}
            total = StepStats(name, rep.examples_per_reason, rep.snippet_chars)
            o = ShardOutput(cfg, out, i, total)
            before = earlier[i] if earlier else None
            if before is not None and o.dropped.f is not None and storage.exists(before):
                o.dropped.f.write(storage.read_text(before))
            for row, d in enumerate(read_docs(inputs[i])):
                if row in drops:
                    o.drop(d, reason, drops[row])
                else:
                    o.forward(d)
            acct = o.commit({"total": total.to_dict()})
        shards.append(i)
        accts.append(json.dumps(acct))
    return pd.DataFrame({"shard": shards, "acct": accts})


def rewrite_shards(ex: Executor, drops: Any, cfg: PrepConfig, inp: str | list[str], out: str,
                   name: str, reason: str, parts: int, earlier: list[str] | None = None,
                   group_of: list[int] | None = None) -> tuple[StepStats, list[StepStats]]:
    """Shuffle the drops (shard, row, detail) by shard, with one marker row per shard, and
    rewrite every input shard (the shards of the folder `inp`, or the files listed); returns
    the stage's merged accounting and, with `group_of` (a group number per shard), each
    group's, merged in shard order as the shards' accounting arrives. `earlier`: see
    `_apply_drops`."""
    inputs = inp if isinstance(inp, list) else doc_files(inp)
    markers = ex.from_items([{"shard": i, "row": -1, "detail": ""} for i in range(len(inputs))])
    rows = ex.group_by(ex.union(drops, markers) if drops is not None else markers, "shard",
                       _apply_drops, parts, cfg=cfg, out=out, inputs=inputs, name=name,
                       reason=reason, earlier=earlier)
    total = new_stats(cfg, name)
    groups = [new_stats(cfg, name) for _ in range(max(group_of, default=-1) + 1)] \
        if group_of else []
    for i, acct in enumerate(accounts(ex.iter_rows(rows))):
        st = StepStats.from_dict(acct["total"])
        total.merge(st)
        if group_of:
            groups[group_of[i]].merge(st)
    return total, groups
