"""The prep pipeline: stages that each read the previous stage's output and write their own.

    read -> normalize -> filter -> exact_dedup -> near_dedup -> pii -> tokenizer -> pack

Every stage writes into `OUT/stages/<nn>_<name>/`: its documents (`docs.parquet`), its
accounting (`stats.json`) and last a `key` file. The key hashes the stage's part of the config,
the source code of the modules that implement it and the key of its input, so a re-run skips
every stage whose key is unchanged and re-runs exactly the stages a config change affects (and
everything downstream of them). `pack` writes the shards and meta.json into OUT itself (the
format is documented in data_prep.shards), and every run writes report.md and report.json.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from tokenizers import Tokenizer
from tqdm import tqdm

from data_prep import report as report_mod
from data_prep.config import PrepConfig, load_config, to_dict
from data_prep.dedup import exact_duplicates, near_duplicates, text_hash
from data_prep.document import BadRecord, Document
from data_prep.filters import build_filters
from data_prep.filters.pii import PIIScrubber
from data_prep.normalize import Normalizer
from data_prep.readers import fingerprint, read_source
from data_prep.shards import FORMAT, SPLITS, dtype_for_vocab, dtype_name, write_shards
from data_prep.stats import AccountingError, StepStats, printable
from data_prep.steps import Step, run_steps
from data_prep.store import DocWriter, num_docs, read_docs
from data_prep.tokenizer import (
    Pretrained,
    encode_documents,
    load_pretrained,
    round_trip_mismatches,
    train_tokenizer,
)

log = logging.getLogger("data_prep")
PKG = Path(__file__).resolve().parent


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train', from a seeded 64-bit hash of the id alone (stable as data is added)."""
    h = xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed)
    return "val" if h / 2**64 < val_fraction else "train"


def order_key(doc_id: str, seed: int) -> int:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed + 1)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _workers(cfg: PrepConfig) -> int:
    return cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- stage bookkeeping
@dataclass
class StageResult:
    """What a stage did: totals, per-step accounting and anything else worth reporting."""

    name: str
    key: str = ""
    cached: bool = False
    seconds: float = 0.0
    total: StepStats | None = None
    steps: list[StepStats] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    docs_path: str | None = None  # documents after this stage

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "total": self.total.to_dict() if self.total else None,
            "steps": [s.to_dict() for s in self.steps],
            "extra": self.extra,
            "docs_path": self.docs_path,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        return cls(
            d["name"],
            d["key"],
            True,
            d["seconds"],
            StepStats.from_dict(d["total"]) if d["total"] else None,
            [StepStats.from_dict(s) for s in d["steps"]],
            d["extra"],
            d["docs_path"],
        )


def _code_hash(modules: Iterable[str]) -> str:
    h = hashlib.sha256()
    for m in modules:
        for p in sorted(PKG.glob(m)):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def stage_key(name: str, part: Any, modules: Iterable[str], input_key: str) -> str:
    blob = json.dumps([name, part, _code_hash(modules), input_key], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _new_stats(cfg: PrepConfig, name: str) -> StepStats:
    return StepStats(name, cfg.report.examples_per_reason, cfg.report.snippet_chars)


class DroppedWriter:
    """Writes every dropped document of a stage to dropped.jsonl when report.write_dropped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.f = open(path, "w", encoding="utf-8") if enabled else None

    def write(self, rec: Document | BadRecord, reason: str, detail: str) -> None:
        if self.f is None:
            return
        text = rec.text if isinstance(rec, Document) else rec.snippet
        row = {"id": rec.id, "source": rec.source, "reason": reason, "detail": detail, "text": text}
        row = {k: printable(v) for k, v in row.items()}
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


# --------------------------------------------------------------------------- parallel steps
_WORKER_STEPS: list[Step] = []


def _init_worker(builder: Callable[[PrepConfig], list[Step]], cfg: PrepConfig) -> None:
    global _WORKER_STEPS
    _WORKER_STEPS = builder(cfg)


def _run_batch(args: tuple[list[Document], str, int, int]) -> tuple[Any, ...]:
    docs, stage_name, n_ex, n_snip = args
    total = StepStats(stage_name, n_ex, n_snip)
    per = {s.name: StepStats(s.name, n_ex, n_snip) for s in _WORKER_STEPS}
    dropped: list[tuple[Document, str, str]] = []
    kept = list(run_steps(_WORKER_STEPS, docs, total, per, dropped))
    return kept, total, per, dropped


def _batches(it: Iterable[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in it:
        batch.append(d)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_map(
    fn: Callable, items: Iterable[Any], workers: int, init: Callable, initargs: tuple
) -> Iterator[Any]:
    """map(fn, items) in `workers` processes (in-process when 1), results in input order, with
    at most 2*workers batches in flight so memory stays bounded."""
    if workers <= 1:
        init(*initargs)
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers, initializer=init, initargs=initargs) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


# --------------------------------------------------------------------------- the stages
def _stage_read(cfg: PrepConfig, inp: Path | None, out: Path, res: StageResult) -> None:
    total = _new_stats(cfg, "read")
    seen_ids: set[str] = set()
    dropped = DroppedWriter(out / "dropped.jsonl", cfg.report.write_dropped)
    per_source = {}
    with DocWriter(out / "docs.parquet") as w:
        for i, src in enumerate(cfg.sources):
            st = _new_stats(cfg, f"source{i}:{src.name or src.kind}")
            records = read_source(src, cfg.read.max_doc_bytes)
            for rec in tqdm(
                records,
                desc=f"read {src.kind} {src.path or ''}".strip(),
                disable=not cfg.progress,
                unit="doc",
            ):
                reason, detail = _check_record(rec, cfg, seen_ids)
                for s in (total, st):
                    s.count_in(rec.nbytes)
                    if reason:
                        s.drop(rec, reason, detail)
                    else:
                        s.keep(rec.nbytes)
                if reason:
                    dropped.write(rec, reason, detail)
                else:
                    assert isinstance(rec, Document)
                    seen_ids.add(rec.id)
                    w.write(rec)
            per_source[st.name] = st
    dropped.close()
    res.total, res.steps = total, list(per_source.values())


def _check_record(rec: Document | BadRecord, cfg: PrepConfig, seen: set[str]) -> tuple[str, str]:
    if isinstance(rec, BadRecord):
        return rec.reason, rec.detail
    try:
        n = len(rec.text.encode("utf-8"))
    except UnicodeEncodeError as e:
        return "invalid_utf8", f"lone surrogate in text: {e.reason}"
    if cfg.read.max_doc_bytes and n > cfg.read.max_doc_bytes:
        return "too_large", f"{n} bytes > read.max_doc_bytes={cfg.read.max_doc_bytes}"
    if len(rec.text.strip()) < cfg.read.min_doc_chars:
        return "empty", f"{n} bytes, {len(rec.text.strip())} non-blank characters"
    if rec.id in seen:
        return "duplicate_id", f"id {rec.id!r} already read"
    return "", ""


def _build_normalize(cfg: PrepConfig) -> list[Step]:
    return [Normalizer(cfg.normalize)] if cfg.normalize.enabled else []


def _build_filters(cfg: PrepConfig) -> list[Step]:
    return build_filters(cfg.filters)


def _build_pii(cfg: PrepConfig) -> list[Step]:
    return [PIIScrubber(cfg.pii)] if cfg.pii.enabled else []


def _steps_stage(builder: Callable[[PrepConfig], list[Step]]) -> Callable:
    def stage(cfg: PrepConfig, inp: Path, out: Path, res: StageResult) -> None:
        total = _new_stats(cfg, res.name)
        per = {s.name: _new_stats(cfg, s.name) for s in builder(cfg)}
        n = num_docs(inp)
        workers = _workers(cfg) if n > 512 else 1
        rep = cfg.report
        jobs = (
            (b, res.name, rep.examples_per_reason, rep.snippet_chars)
            for b in _batches(read_docs(inp), 256)
        )
        dropped = DroppedWriter(out / "dropped.jsonl", rep.write_dropped)
        bar = tqdm(total=n, desc=res.name, disable=not cfg.progress, unit="doc")
        with DocWriter(out / "docs.parquet") as w:
            for kept, t, p, drops in ordered_map(
                _run_batch, jobs, workers, _init_worker, (builder, cfg)
            ):
                total.merge(t)
                for name, s in p.items():
                    per[name].merge(s)
                for d in kept:
                    w.write(d)
                for d, reason, detail in drops:
                    dropped.write(d, reason, detail)
                bar.update(t.seen.docs)
        bar.close()
        dropped.close()
        res.total, res.steps = total, list(per.values())

    return stage


def _stage_exact(cfg: PrepConfig, inp: Path, out: Path, res: StageResult) -> None:
    total = _new_stats(cfg, res.name)
    found = exact_duplicates(
        tqdm(read_docs(inp), desc="exact_dedup hash", disable=not cfg.progress, unit="doc")
    )
    dropped = DroppedWriter(out / "dropped.jsonl", cfg.report.write_dropped)
    with DocWriter(out / "docs.parquet") as w:
        for d in read_docs(inp):
            total.count_in(d.nbytes)
            if d.id in found.drop:
                detail = f"same text as {found.drop[d.id]}"
                total.drop(d, "exact_duplicate", detail)
                dropped.write(d, "exact_duplicate", detail)
            else:
                total.keep(d.nbytes)
                w.write(d)
    dropped.close()
    res.total = total
    res.extra = {
        "groups": len(found.groups),
        "groups_shown": found.groups[: cfg.report.clusters_shown],
    }


def _stage_near(cfg: PrepConfig, inp: Path, out: Path, res: StageResult) -> None:
    m = cfg.dedup.minhash
    total = _new_stats(cfg, res.name)
    ids, texts = [], []
    for d in read_docs(inp):
        ids.append(d.id)
        texts.append(d.text)
    log.info("near_dedup: MinHash signatures of %d documents", len(ids))
    found = near_duplicates(
        ids,
        texts,
        ngram=m.ngram,
        num_perm=m.num_perm,
        threshold=m.threshold,
        bands=m.bands,
        rows=m.rows,
        fp_weight=m.fp_weight,
        fn_weight=m.fn_weight,
        verify=m.verify,
        seed=m.seed,
        workers=_workers(cfg),
        batch_docs=m.batch_docs,
    )
    del texts
    dropped = DroppedWriter(out / "dropped.jsonl", cfg.report.write_dropped)
    with DocWriter(out / "docs.parquet") as w:
        for d in read_docs(inp):
            total.count_in(d.nbytes)
            if d.id in found.drop:
                sid, sim = found.drop[d.id]
                detail = f"near-duplicate of {sid} (estimated Jaccard {sim:.2f})"
                total.drop(d, "near_duplicate", detail)
                dropped.write(d, "near_duplicate", detail)
            else:
                total.keep(d.nbytes)
                w.write(d)
    dropped.close()
    res.total = total
    res.extra = {
        "bands": found.bands,
        "rows": found.rows,
        **found.stats,
        "clusters_shown": found.clusters[: cfg.report.clusters_shown],
    }


ROUND_TRIP_SAMPLE = 200  # train documents a pretrained tokenizer is checked on


def _stage_tokenizer(
    cfg: PrepConfig, inp: Path, out: Path, res: StageResult, pretrained: Pretrained | None
) -> None:
    if pretrained is not None:
        _use_pretrained(cfg, inp, out, res, pretrained)
        return
    sh = cfg.shards
    total = _new_stats(cfg, res.name)

    def train_texts() -> Iterator[str]:
        for d in read_docs(inp):
            total.count_in(d.nbytes)
            total.keep(d.nbytes)
            if split_of(d.id, sh.val_fraction, sh.split_seed) == "train":
                total.bump("train_documents")
                yield d.text

    tok = train_tokenizer(train_texts(), cfg.tokenizer)
    tok.save(str(out / "tokenizer.json"))
    total.bump("vocab_size", tok.get_vocab_size())
    res.total = total
    res.extra = {"vocab_size": tok.get_vocab_size()}


def _use_pretrained(
    cfg: PrepConfig, inp: Path, out: Path, res: StageResult, pre: Pretrained
) -> None:
    """No training: copy the pretrained tokenizer and check that it round-trips a sample of the
    train documents (a mismatch is reported, not an error: the shards hold its encoding)."""
    sh = cfg.shards
    total = _new_stats(cfg, res.name)
    tok = pre.tokenizer
    if pre.file is not None:
        shutil.copyfile(pre.file, out / "tokenizer.json")  # byte for byte
    else:
        tok.save(str(out / "tokenizer.json"))
    tok.encode_special_tokens = True
    sample: list[str] = []
    for d in read_docs(inp):
        total.count_in(d.nbytes)
        total.keep(d.nbytes)
        if split_of(d.id, sh.val_fraction, sh.split_seed) == "train":
            total.bump("train_documents")
            if len(sample) < ROUND_TRIP_SAMPLE:
                sample.append(d.text)
    checked, bad = round_trip_mismatches(tok, sample)
    if bad:
        log.warning(
            "tokenizer %s: %d of %d sampled train documents do not decode back to their exact "
            "text (normalisation or unknown tokens); the shards hold its encoding as it is",
            pre.source, bad, checked,
        )
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    total.bump("vocab_size", vocab_size)
    res.total = total
    res.extra = {
        "vocab_size": vocab_size,
        "pretrained": pre.source,
        "pretrained_sha256": pre.sha256,
        "eos_token": cfg.tokenizer.eos_token,
        "eos_id": pre.eos_id,
        "round_trip_checked": checked,
        "round_trip_mismatches": bad,
    }


def _stage_pack(cfg: PrepConfig, inp: Path, out: Path, res: StageResult, tok_dir: Path) -> dict:
    sh = cfg.shards
    root = Path(cfg.out_dir)
    total = _new_stats(cfg, res.name)
    shutil.copyfile(tok_dir / "tokenizer.json", root / "tokenizer.json")
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is plain text
    tok.no_truncation()  # a pretrained tokenizer.json may ship with truncation or padding on
    tok.no_padding()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id(cfg.tokenizer.eos_token)
    if eos_id is None:
        raise RuntimeError(f"{root / 'tokenizer.json'} has no {cfg.tokenizer.eos_token!r} token")
    docs = list(read_docs(inp))
    if sh.shuffle:
        docs.sort(key=lambda d: order_key(d.id, sh.split_seed))
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        total.count_in(d.nbytes)
        total.keep(d.nbytes)
        by_split[split_of(d.id, sh.val_fraction, sh.split_seed)].append(d)
    splits = {}
    for split in SPLITS:
        texts = (d.text for d in by_split[split])
        arrays = encode_documents(tok, texts, eos_id, batch_size=cfg.tokenizer.batch_size)
        bar = tqdm(
            arrays, total=len(by_split[split]), desc=f"pack {split}", disable=not cfg.progress
        )
        splits[split] = write_shards(root, split, bar, vocab_size, sh.shard_tokens)
        total.bump(f"{split}_documents", splits[split]["documents"])
        total.bump(f"{split}_tokens", splits[split]["tokens"])
    meta = {
        "format": FORMAT,
        "dtype": dtype_name(dtype_for_vocab(vocab_size)),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "eos_token": cfg.tokenizer.eos_token,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": sha256_file(root / "tokenizer.json"),
        "splits": splits,
        "config": to_dict(cfg),
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    res.total = total
    res.extra = {"splits": splits, "vocab_size": vocab_size, "eos_id": eos_id}
    return meta


@dataclass
class StageSpec:
    name: str
    part: Callable[[PrepConfig], Any]  # the config that affects the stage
    modules: tuple[str, ...]  # files (globs under data_prep/) whose code the stage runs
    fn: Callable
    enabled: Callable[[PrepConfig], bool] = lambda cfg: True


def _report_part(cfg: PrepConfig) -> Any:
    r = cfg.report
    return [r.examples_per_reason, r.snippet_chars, r.write_dropped, r.clusters_shown]


STEP_MODULES = ("steps.py", "stats.py", "store.py", "document.py")
DOC_STAGES = [
    StageSpec(
        "read",
        lambda c: [to_dict(c)["sources"], to_dict(c)["read"], [fingerprint(s) for s in c.sources]],
        ("readers.py", *STEP_MODULES),
        _stage_read,
    ),
    StageSpec(
        "normalize",
        lambda c: to_dict(c)["normalize"],
        ("normalize.py", *STEP_MODULES),
        _steps_stage(_build_normalize),
        lambda c: c.normalize.enabled,
    ),
    StageSpec(
        "filter",
        lambda c: to_dict(c)["filters"],
        ("filters/*.py", *STEP_MODULES),
        _steps_stage(_build_filters),
        lambda c: bool(build_filters(c.filters)),
    ),
    StageSpec(
        "exact_dedup",
        lambda c: to_dict(c)["dedup"]["exact"],
        ("dedup.py", *STEP_MODULES),
        _stage_exact,
        lambda c: c.dedup.exact.enabled,
    ),
    StageSpec(
        "near_dedup",
        lambda c: to_dict(c)["dedup"]["minhash"],
        ("dedup.py", "minhash.py", *STEP_MODULES),
        _stage_near,
        lambda c: c.dedup.minhash.enabled,
    ),
    StageSpec(
        "pii",
        lambda c: to_dict(c)["pii"],
        ("filters/pii.py", *STEP_MODULES),
        _steps_stage(_build_pii),
        lambda c: c.pii.enabled,
    ),
]


def _run_stage(
    cfg: PrepConfig, spec: StageSpec, index: int, inp: StageResult | None
) -> StageResult:
    root = Path(cfg.out_dir) / "stages"
    out = root / f"{index:02d}_{spec.name}"
    input_key = inp.key if inp else ""
    if not spec.enabled(cfg):
        assert inp is not None and inp.total is not None
        st = _new_stats(cfg, spec.name)
        st.seen.add(inp.total.kept.bytes, inp.total.kept.docs)
        st.kept.add(inp.total.kept.bytes, inp.total.kept.docs)
        return StageResult(
            spec.name, input_key, False, 0.0, st, [], {"disabled": True}, inp.docs_path
        )
    key = stage_key(spec.name, [spec.part(cfg), _report_part(cfg)], spec.modules, input_key)
    if (
        (out / "key").exists()
        and (out / "key").read_text() == key
        and (out / "stats.json").exists()
    ):
        res = StageResult.from_dict(json.loads((out / "stats.json").read_text(encoding="utf-8")))
        res.cached = True
        log.info("stage %s: up to date (key %s), skipped", spec.name, key)
        return res
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    res = StageResult(spec.name, key)
    t = time.perf_counter()
    log.info("stage %s: running (key %s)", spec.name, key)
    spec.fn(cfg, Path(inp.docs_path) if inp and inp.docs_path else None, out, res)
    res.seconds = time.perf_counter() - t
    if (out / "docs.parquet").exists():
        res.docs_path = str(out / "docs.parquet")
    for s in [res.total, *res.steps]:
        if s is not None:
            s.check()
    (out / "stats.json").write_text(json.dumps(res.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "key").write_text(key)
    return res


def check_invariant(results: list[StageResult]) -> dict[str, int]:
    """Records read = documents that left the last stage + everything dropped anywhere."""
    read = results[0].total
    assert read is not None
    last = [r for r in results if r.total is not None][-1].total
    assert last is not None
    dropped = sum(r.total.dropped_docs for r in results if r.total is not None)
    inv = {"records_in": read.seen.docs, "documents_out": last.kept.docs, "dropped": dropped}
    if inv["records_in"] != inv["documents_out"] + inv["dropped"]:
        raise AccountingError(f"documents went missing: {inv}")
    return inv


def run_document_stages(cfg: PrepConfig) -> list[StageResult]:
    """read .. pii: returns their results; the last one's docs_path holds the clean corpus."""
    results: list[StageResult] = []
    for i, spec in enumerate(DOC_STAGES):
        results.append(_run_stage(cfg, spec, i, results[-1] if results else None))
    return results


def run(cfg: PrepConfig | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Prepare the dataset `cfg` describes; returns its output directory.

    `cfg` is a PrepConfig or the path of a YAML file (then `overrides` apply).
    """
    if not isinstance(cfg, PrepConfig):
        cfg = load_config(cfg, overrides)
    root = Path(cfg.out_dir)
    # a pretrained tokenizer is loaded and checked first: a wrong path or eos token fails now
    pretrained = load_pretrained(cfg.tokenizer) if cfg.tokenizer.pretrained else None
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_document_stages(cfg)
    clean = results[-1]
    sh = cfg.shards
    tok_spec = StageSpec(
        "tokenizer",
        # a pretrained tokenizer's content, not only its path, decides whether the stage re-runs
        lambda c: [
            to_dict(c)["tokenizer"],
            sh.val_fraction,
            sh.split_seed,
            pretrained.sha256 if pretrained else None,
        ],
        ("tokenizer.py",),
        lambda c, inp, out, res: _stage_tokenizer(c, inp, out, res, pretrained),
    )
    tok_res = _run_stage(cfg, tok_spec, len(DOC_STAGES), clean)
    tok_dir = root / "stages" / f"{len(DOC_STAGES):02d}_tokenizer"
    pack_spec = StageSpec(
        "pack",
        lambda c: [to_dict(c)["shards"], to_dict(c)["tokenizer"], str(c.out_dir)],
        ("shards.py", "tokenizer.py"),
        lambda c, inp, out, res: _stage_pack(c, inp, out, res, tok_dir),
    )
    # pack's input is the clean corpus; its key also covers the tokenizer
    pack_in = StageResult(
        "clean", stage_key("clean", [], (), clean.key + tok_res.key), docs_path=clean.docs_path
    )
    pack_res = _run_stage(cfg, pack_spec, len(DOC_STAGES) + 1, pack_in)
    if not (root / "meta.json").exists():  # deleted by hand: re-pack
        shutil.rmtree(root / "stages" / f"{len(DOC_STAGES) + 1:02d}_pack")
        pack_res = _run_stage(cfg, pack_spec, len(DOC_STAGES) + 1, pack_in)
    all_results = [*results, tok_res, pack_res]
    invariant = check_invariant(results)
    report_mod.write_reports(root, cfg, all_results, invariant, time.perf_counter() - t0)
    log.info("prepared %s in %.1fs: %s", root, time.perf_counter() - t0, invariant)
    return root


__all__ = ["run", "run_document_stages", "split_of", "text_hash", "check_invariant"]
