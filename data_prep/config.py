"""Prep configuration: structured dataclasses loaded from YAML with `key=value` overrides
(`tokenizer.vocab_size=1024`, `sources.0.max_documents=50`) by `contracts.config.load_structured`.

Every section is a dataclass with typed defaults, so a typo in a YAML file or an override is an
error that names the key instead of a silently ignored setting. The fully resolved config is
written into `meta.json` and `report.json` of every prepared dataset.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from contracts.config import load_structured
from data_prep.filters import FILTERS, FiltersConfig
from data_prep.filters.pii import PIIConfig
from data_prep.normalize import NormalizeConfig

SOURCE_KINDS = ("embedded", "jsonl", "parquet", "text", "hub")
DOMAINS = ("prose", "code")


@dataclass
class SourceConfig:
    """One input. `kind` picks the reader; fields that do not apply to a kind are ignored."""

    kind: str = "embedded"  # embedded | jsonl | parquet | text | hub
    name: str | None = None  # label recorded as each document's source; default: kind[:path]
    path: str | None = None  # jsonl/parquet/text: a file, a folder or a glob
    include: list[str] = field(default_factory=lambda: ["*"])  # globs on the relative path
    exclude: list[str] = field(default_factory=list)  # globs on the relative path
    max_documents: int | None = None  # stop after this many records from this source
    domain: str = "prose"  # prose | code, for records that do not name their own
    # jsonl / parquet / hub records
    text_field: str = "text"
    id_field: str | None = None  # None: id = "<file>:<line or row>"
    domain_field: str | None = None  # a record field holding "prose" or "code"
    # plain text
    per: str = "file"  # file | line: one document per file or per non-empty line
    # embedded corpus: the running interpreter's standard library and pydoc topics
    code: bool = True  # stdlib *.py files as code documents
    prose: bool = True  # pydoc_data.topics as prose documents
    exclude_dirs: list[str] = field(
        default_factory=lambda: ["site-packages", "test", "tests", "__pycache__"]
    )
    # hub dataset (datasets.load_dataset(hub_name, hub_config, split=..., streaming=...))
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    streaming: bool = True


@dataclass
class ReadConfig:
    """Limits applied to every record as it is read.

    `max_doc_bytes` limits a document: the UTF-8 bytes of its decoded text, whatever its
    encoding in the file (JSON escapes such as \\u00e9 or \\" do not count against it).
    `max_line_bytes` is a coarser guard on a raw jsonl line, checked before the line is decoded
    so that an absurd line is not parsed at all; JSON escaping can make a line up to 6x its
    text (\\u0001 for one control byte), so keep it above 6x max_doc_bytes; the default does.
    """

    max_doc_bytes: int = 5_000_000  # larger documents are dropped as too_large; 0 = no limit
    max_line_bytes: int = 32_000_000  # longer raw jsonl lines: line_too_large; 0 = no limit
    min_doc_chars: int = 1  # shorter texts, once stripped of whitespace, are dropped as empty


@dataclass
class ExactDedupConfig:
    """Exact duplicates: equal normalised text (xxh3-128 of its UTF-8 bytes)."""

    enabled: bool = True


@dataclass
class MinHashConfig:
    """Near duplicates: MinHash LSH over word n-gram shingles (see data_prep.minhash)."""

    enabled: bool = True
    ngram: int = 5  # words per shingle
    num_perm: int = 128  # signature length
    threshold: float = 0.8  # Jaccard similarity the banding is tuned for
    bands: int = 0  # 0 = choose bands and rows for `threshold`
    rows: int = 0
    # without verify: bands x rows minimise these weights of the false-positive / negative areas
    fp_weight: float = 0.5
    fn_weight: float = 0.5
    # check each candidate pair's exact Jaccard >= threshold: on by default, the measured setting
    # (labelled set, seed 0, 150 bases: F1 0.952 with it, 0.828 without; docs/data.md)
    verify: bool = True
    # with verify: bands x rows minimise the false negatives with the mean false-candidate rate
    # below the threshold <= fp_budget (0.2 at t=0.8, 128 perms: 13 x 7)
    fp_budget: float = 0.2
    # with verify: complete = two clusters join only if all pairs across them reach threshold;
    # single = every verified pair joins its clusters (chains can merge dissimilar documents)
    linkage: str = "complete"
    seed: int = 1  # of the permutations
    batch_docs: int = 64  # documents per signature job


@dataclass
class DedupConfig:
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)


@dataclass
class ReportConfig:
    examples_per_reason: int = 3  # example documents kept per rejection reason
    snippet_chars: int = 300  # characters of each example shown
    write_dropped: bool = False  # write stages/<stage>/dropped.jsonl with every dropped doc
    clusters_shown: int = 10  # near-duplicate clusters listed in the report


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained with HF `tokenizers` on the train split of the cleaned corpus,
    or, with `pretrained`, an existing tokenizer used as it is (no training)."""

    vocab_size: int = 4096  # of the trained BPE; a pretrained tokenizer brings its own
    min_frequency: int = 2
    # appended after every document; id 0 when trained, its own id in a pretrained tokenizer
    eos_token: str = "<|endoftext|>"
    train_max_bytes: int = 0  # 0 = train on all train-split text; else a prefix of this size
    batch_size: int = 256  # documents per encode_batch call
    # a tokenizer.json file, a directory holding one, or a HuggingFace hub name (needs network)
    pretrained: str | None = None


@dataclass
class ShardConfig:
    """Packing of token ids into flat little-endian shards."""

    shard_tokens: int = 10_000_000  # tokens per shard file (the last one may be shorter)
    val_fraction: float = 0.05  # fraction of documents (by hash of their id) held out
    split_seed: int = 0  # salt of the id hash that decides the split
    shuffle: bool = True  # order documents by a seeded hash of their id, not reading order


@dataclass
class RayConfig:
    """Where and how `executor: ray` runs (see data_prep.ray_verbs and docs/scaling.md)."""

    # local: an embedded Ray started (and stopped) by the run; auto: the cluster this machine
    # belongs to (`ray start`, or RAY_ADDRESS); or a cluster address, host:port / ray://host:port
    address: str = "local"
    num_cpus: int = 0  # address=local only: CPUs of the embedded Ray; 0 = `workers` (or all)
    shard_docs: int = 2000  # documents per output shard of every document stage
    partitions: int = 0  # blocks of each shuffle (groupby); 0 = automatic (see shuffle_docs)
    # automatic partitions: one reducer per shuffle_docs documents (at least 2 per CPU); the map
    # side is cut into as many groups, so a shuffle makes at most (docs / shuffle_docs)^2 pieces
    shuffle_docs: int = 50000
    # tasks in flight in a stage's per-shard map whose results the driver reads (accounting);
    # 0 = 4 per CPU of the cluster. The driver holds at most this many results at once.
    window_tasks: int = 0
    # blocks of a per-shard map (`map_shards`): consecutive shards share a task beyond this,
    # so the object refs the driver holds per stage stop growing with the shard count;
    # 0 = max(128, 8 per CPU of the cluster)
    max_blocks: int = 0
    # address=local only: a task result up to this many bytes is returned inline into its
    # owner's (the driver's) memory, larger ones go to the object store. Ray's default (100 KB)
    # kept every small block (a shard's ids or text hashes: ~60 KB) and the task specs that
    # carry them in the driver: +166 MB for 1,000 such blocks and one shuffle. 0 = Ray's
    # default. On a cluster it is the cluster's setting (RAY_max_direct_call_object_size).
    inline_bytes: int = 1024
    ship_code: bool = True  # existing cluster: send data_prep + contracts as py_modules


EXECUTORS = ("local", "ray")
RAY_ADDRESS_RE = re.compile(r"^(ray://)?[A-Za-z0-9_.\-]+:\d+$")


@dataclass
class PrepConfig:
    out_dir: str = "data/demo"  # a folder, or an object store URL (s3://, gs://, hf://)
    # unused since tasks write to out_dir itself (an object store too); kept so that older
    # configs that set it still load
    work_dir: str = ""
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    read: ReadConfig = field(default_factory=ReadConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    workers: int = 0  # processes for parallel stages; 0 = all cores
    # local: a process pool on this machine; ray: Ray tasks over sharded stages (issue 14)
    executor: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    progress: bool = True  # tqdm progress bars
    report: ReportConfig = field(default_factory=ReportConfig)


def _validate(cfg: PrepConfig) -> None:
    for i, s in enumerate(cfg.sources):
        if s.kind not in SOURCE_KINDS:
            raise ValueError(f"sources.{i}.kind={s.kind!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
        if s.domain not in DOMAINS:
            raise ValueError(f"sources.{i}.domain={s.domain!r}; valid: {', '.join(DOMAINS)}")
        if s.per not in ("file", "line"):
            raise ValueError(f"sources.{i}.per={s.per!r}; valid: file, line")
        if s.kind in ("jsonl", "parquet", "text") and not s.path:
            raise ValueError(f"sources.{i}.kind={s.kind!r} needs sources.{i}.path")
        if s.kind == "hub" and not s.hub_name:
            raise ValueError(f"sources.{i}.kind='hub' needs sources.{i}.hub_name")
    r = cfg.read
    if r.max_doc_bytes < 0 or r.max_line_bytes < 0:
        raise ValueError(
            f"read.max_doc_bytes={r.max_doc_bytes}, read.max_line_bytes={r.max_line_bytes}: "
            "must be >= 0 (0 = no limit)"
        )
    if r.max_line_bytes and r.max_line_bytes < r.max_doc_bytes:
        raise ValueError(
            f"read.max_line_bytes={r.max_line_bytes} < read.max_doc_bytes={r.max_doc_bytes}: "
            "the raw-line guard would drop documents the document limit allows"
        )
    if not cfg.sources:
        raise ValueError("sources is empty; give at least one source (e.g. kind: embedded)")
    m = cfg.dedup.minhash
    if not 0.0 < m.threshold < 1.0:
        raise ValueError(f"dedup.minhash.threshold={m.threshold}; must be in (0, 1)")
    if (m.bands > 0) != (m.rows > 0) or m.bands * m.rows > m.num_perm:
        raise ValueError(
            f"dedup.minhash.bands={m.bands}, rows={m.rows}: give both (bands*rows <= num_perm="
            f"{m.num_perm}) or neither (0, 0) to choose them for the threshold"
        )
    if m.linkage not in ("single", "complete"):
        raise ValueError(f"dedup.minhash.linkage={m.linkage!r}; valid: single, complete")
    if not 0.0 < m.fp_budget <= 1.0:
        raise ValueError(f"dedup.minhash.fp_budget={m.fp_budget}; must be in (0, 1]")
    for name in FILTERS:
        for d in getattr(cfg.filters, name).domains:
            if d not in DOMAINS:
                raise ValueError(f"filters.{name}.domains has {d!r}; valid: {', '.join(DOMAINS)}")
    for d in [*cfg.pii.email_domains, *cfg.pii.ip_domains]:
        if d not in DOMAINS:
            raise ValueError(f"pii domains have {d!r}; valid: {', '.join(DOMAINS)}")
    if not 0.0 <= cfg.shards.val_fraction < 1.0:
        raise ValueError(f"shards.val_fraction={cfg.shards.val_fraction}; must be in [0, 1)")
    if cfg.shards.shard_tokens <= 0:
        raise ValueError(f"shards.shard_tokens={cfg.shards.shard_tokens}; must be > 0")
    if not cfg.tokenizer.pretrained and cfg.tokenizer.vocab_size < 257:
        raise ValueError(
            f"tokenizer.vocab_size={cfg.tokenizer.vocab_size}; must be >= 257 "
            "(256 byte tokens + the end-of-document token)"
        )
    _validate_executor(cfg)


def _validate_executor(cfg: PrepConfig) -> None:
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"executor={cfg.executor!r}; valid: {', '.join(EXECUTORS)}")
    a = cfg.ray.address
    if a not in ("local", "auto") and not RAY_ADDRESS_RE.match(a):
        raise ValueError(
            f"ray.address={a!r}; valid: local, auto or a cluster address host:port "
            "(or ray://host:port)"
        )
    if (cfg.ray.shard_docs < 1 or cfg.ray.shuffle_docs < 1 or cfg.ray.num_cpus < 0
            or cfg.ray.partitions < 0 or cfg.ray.window_tasks < 0 or cfg.ray.inline_bytes < 0
            or cfg.ray.max_blocks < 0):
        raise ValueError(
            f"ray.shard_docs={cfg.ray.shard_docs}, ray.shuffle_docs={cfg.ray.shuffle_docs}, "
            f"ray.num_cpus={cfg.ray.num_cpus}, ray.partitions={cfg.ray.partitions}, "
            f"ray.window_tasks={cfg.ray.window_tasks}, ray.inline_bytes={cfg.ray.inline_bytes}, "
            f"ray.max_blocks={cfg.ray.max_blocks}: "
            "shard_docs and shuffle_docs must be >= 1, the others >= 0"
        )
    if cfg.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError(
            "executor=ray needs Ray, which is not installed: pip install -e '.[ray]'"
        )


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PrepConfig:
    """Merge defaults, the YAML file at `path` and `key=value` overrides into a PrepConfig."""
    cfg: PrepConfig = load_structured(
        PrepConfig, path, overrides, example="tokenizer.vocab_size=1024"
    )
    _validate(cfg)
    return cfg


def to_dict(cfg: PrepConfig | DictConfig) -> dict:
    """The resolved config as plain JSON-able data."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
