"""The prep pipeline: the list of stages, each reading the previous stage's output.

    read -> normalize -> filter -> exact_dedup -> near_dedup -> pii -> tokenizer -> pack

Each stage is a `data_prep.stage.Stage` and is cached on disk under `OUT/stages/<nn>_<name>/`
(see data_prep.stage): a re-run skips every stage whose config and code are unchanged. `pack`
writes the shards and meta.json into OUT itself (the format is `contracts.dataset`'s), and every
run writes report.md and report.json.
"""

from __future__ import annotations

import logging
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
from data_prep.near import NearDedup
from data_prep.normalize import Normalizer
from data_prep.pack import DATASET_MARKER, Pack
from data_prep.read_stage import Read
from data_prep.shardops import StepsStage
from data_prep.shards import split_of
from data_prep.stage import (
    Stage,
    StageResult,
    check_invariant,
    out_root,
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


def run_document_stages(cfg: PrepConfig, executor: Executor | None = None
                        ) -> list[StageResult]:
    """read .. pii: returns their results; the last one's docs_path holds the clean corpus.
    `executor`: the one to use, else one for `cfg.executor` for these stages."""
    if executor is None:
        with _executor(cfg) as ex:
            return run_document_stages(cfg, ex)
    results: list[StageResult] = []
    for i, stage in enumerate(DOC_STAGES):
        inp = results[-1] if results else None
        results.append(run_stage(cfg, stage, i, inp, executor))
    return results


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


def run(cfg: PrepConfig | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path | str:
    """Prepare the dataset `cfg` describes; returns its output directory (a Path), or for an
    object-store out_dir its URL: every task reads and writes the store itself (no local
    copy), and each stage folder, then the dataset, is committed by a marker written last.

    `cfg` is a PrepConfig or the path of a YAML file (then `overrides` apply).
    """
    if not isinstance(cfg, PrepConfig):
        cfg = load_config(cfg, overrides)
    root = out_root(cfg)
    storage.check_reachable(root)
    # a pretrained tokenizer is loaded and checked first: a wrong path or eos token fails now
    pretrained = load_pretrained(cfg.tokenizer) if cfg.tokenizer.pretrained else None
    storage.mkdirs(root)
    t0 = time.perf_counter()
    with _executor(cfg) as ex:  # every stage's tasks, tokenizer and pack included
        results = run_document_stages(cfg, ex)
        clean = results[-1]
        n = len(DOC_STAGES)
        tok_res = run_stage(cfg, TokenizerStage(pretrained), n, clean, ex)
        pack = Pack(stage_dir(cfg, n, "tokenizer"))
        # pack's input is the clean corpus; its key also covers the tokenizer
        pack_in = StageResult(
            "clean", stage_key("clean", [], (), clean.key + tok_res.key), docs_path=clean.docs_path
        )
        pack_res = run_stage(cfg, pack, n + 1, pack_in, ex)
        if not storage.exists(storage.join(root, DATASET_MARKER)):  # deleted by hand: re-pack
            storage.remove(stage_dir(cfg, n + 1, pack.name))
            pack_res = run_stage(cfg, pack, n + 1, pack_in, ex)
    all_results = [*results, tok_res, pack_res]
    invariant = check_invariant(results)
    report_mod.write_reports(root, cfg, all_results, invariant, time.perf_counter() - t0)
    log.info("prepared %s in %.1fs: %s", cfg.out_dir, time.perf_counter() - t0, invariant)
    return root if storage.is_remote(root) else Path(root)


__all__ = ["run", "run_document_stages", "split_of", "text_hash", "check_invariant"]
