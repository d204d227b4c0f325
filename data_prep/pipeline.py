"""The prep pipeline: the list of stages, each reading the previous stage's output.

    read -> normalize -> filter -> exact_dedup -> near_dedup -> pii -> tokenizer -> pack

Each stage is a `data_prep.stage.Stage` and is cached on disk under `OUT/stages/<nn>_<name>/`
(see data_prep.stage): a re-run skips every stage whose config and code are unchanged. `pack`
writes the shards and meta.json into OUT itself (the format is `contracts.dataset`'s), and every
run writes report.md and report.json.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_prep import report as report_mod
from data_prep import storage
from data_prep.config import PrepConfig, load_config
from data_prep.dedup import ExactDedup, text_hash
from data_prep.executor import Executor, LocalExecutor
from data_prep.filters import build_filters
from data_prep.filters.pii import PIIScrubber
from data_prep.mirror import Mirror, work_root
from data_prep.near import NearDedup
from data_prep.normalize import Normalizer
from data_prep.pack import Pack
from data_prep.read_stage import Read
from data_prep.shardops import StepsStage
from data_prep.shards import split_of
from data_prep.stage import (
    Stage,
    StageResult,
    check_invariant,
    run_stage,
    stage_dir,
    stage_key,
)
from data_prep.steps import Step
from data_prep.tokenizer import TokenizerStage, load_pretrained

log = logging.getLogger("data_prep")


def normalize_steps(cfg: PrepConfig) -> list[Step]:
    return [Normalizer(cfg.normalize)] if cfg.normalize.enabled else []


def pii_steps(cfg: PrepConfig) -> list[Step]:
    return [PIIScrubber(cfg.pii)] if cfg.pii.enabled else []


def filter_steps(cfg: PrepConfig) -> list[Step]:
    return build_filters(cfg.filters)


DOC_STAGES: list[Stage] = [
    Read(),
    StepsStage("normalize", "normalize", ("normalize.py",), normalize_steps),
    StepsStage("filter", "filters", ("filters/*.py",), filter_steps),
    ExactDedup(),
    NearDedup(),
    StepsStage("pii", "pii", ("filters/pii.py",), pii_steps),
]


def run_document_stages(cfg: PrepConfig, executor: Executor | None = None,
                        mirror: Mirror | None = None) -> list[StageResult]:
    """read .. pii: returns their results; the last one's docs_path holds the clean corpus.
    `executor`: the one to use, else one for `cfg.executor` for these stages; `mirror`: the
    object store out_dir is committed to (data_prep.mirror)."""
    if executor is None:
        with _executor(cfg) as ex:
            return run_document_stages(cfg, ex, mirror)
    results: list[StageResult] = []
    for i, stage in enumerate(DOC_STAGES):
        inp = results[-1] if results else None
        results.append(_run_synced(cfg, stage, i, inp, executor, mirror))
    return results


def _run_synced(cfg: PrepConfig, stage: Stage, i: int, inp: StageResult | None,
                executor: Executor | None = None, mirror: Mirror | None = None,
                commit: bool = True) -> StageResult:
    """run_stage, and with an object-store out_dir (`mirror`) the committed remote stage pulled
    first and the finished one committed after (data_prep.mirror)."""
    rel = stage_dir(cfg, i, stage.name).relative_to(work_root(cfg)).as_posix()
    if mirror is not None:
        mirror.pull_stage(rel)
    res = run_stage(cfg, stage, i, inp, executor)
    if mirror is not None and commit:
        mirror.push_stage(rel)
    return res


@contextmanager
def _executor(cfg: PrepConfig) -> Iterator[Executor]:
    """The executor that places every stage's tasks: a process pool on this machine for
    `executor: local`; for `executor: ray`, Ray tasks in a Ray session (data_prep.ray_verbs)."""
    if cfg.executor != "ray":
        with LocalExecutor(cfg) as ex:
            yield ex
        return
    from data_prep import ray_verbs

    with ray_verbs.session(cfg):
        yield ray_verbs.RayExecutor(cfg)


def run(cfg: PrepConfig | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Prepare the dataset `cfg` describes; returns its output directory (for an object-store
    out_dir, its local working copy: the dataset itself is committed to the store).

    `cfg` is a PrepConfig or the path of a YAML file (then `overrides` apply).
    """
    if not isinstance(cfg, PrepConfig):
        cfg = load_config(cfg, overrides)
    root = work_root(cfg)
    # an object-store out_dir: a local working copy, committed stage by stage (data_prep.mirror)
    mirror = Mirror(cfg.out_dir, root) if storage.is_remote(cfg.out_dir) else None
    # a pretrained tokenizer is loaded and checked first: a wrong path or eos token fails now
    pretrained = load_pretrained(cfg.tokenizer) if cfg.tokenizer.pretrained else None
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _executor(cfg) as ex:  # every stage's tasks, tokenizer and pack included
        results = run_document_stages(cfg, ex, mirror)
        clean = results[-1]
        n = len(DOC_STAGES)
        tok_res = _run_synced(cfg, TokenizerStage(pretrained), n, clean, ex, mirror)
        pack = Pack(stage_dir(cfg, n, "tokenizer"))
        # pack's input is the clean corpus; its key also covers the tokenizer
        pack_in = StageResult(
            "clean", stage_key("clean", [], (), clean.key + tok_res.key), docs_path=clean.docs_path
        )
        pack_dir = stage_dir(cfg, n + 1, pack.name)
        pack_res = _run_synced(cfg, pack, n + 1, pack_in, ex, mirror, commit=False)
        if mirror is not None:  # the committed dataset of this very pack key, if there is one
            mirror.pull_dataset(pack_dir.relative_to(root).as_posix())
        if not (root / "meta.json").exists():  # deleted by hand: re-pack
            shutil.rmtree(pack_dir)
            pack_res = run_stage(cfg, pack, n + 1, pack_in, ex)
        if mirror is not None:  # the dataset, then the pack stage: its key is the last object
            mirror.push_dataset(pack_dir.relative_to(root).as_posix())
    all_results = [*results, tok_res, pack_res]
    invariant = check_invariant(results)
    report_mod.write_reports(root, cfg, all_results, invariant, time.perf_counter() - t0)
    if mirror is not None:
        mirror.push_reports()
    log.info("prepared %s in %.1fs: %s", cfg.out_dir, time.perf_counter() - t0, invariant)
    return root


__all__ = ["run", "run_document_stages", "split_of", "text_hash", "check_invariant"]
