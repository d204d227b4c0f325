"""The prep pipeline: read -> tokenizer training -> packing into shards + meta.json."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path

import xxhash
from tqdm import tqdm

from data_prep.config import PrepConfig, load_config, to_dict
from data_prep.document import Document
from data_prep.readers import read_source
from data_prep.shards import FORMAT, SPLITS, dtype_for_vocab, dtype_name, write_shards
from data_prep.tokenizer import encode_documents, train_tokenizer

log = logging.getLogger("data_prep")


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train', from a seeded 64-bit hash of the id alone (stable as data is added)."""
    h = xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed)
    return "val" if h / 2**64 < val_fraction else "train"


def order_key(doc_id: str, seed: int) -> int:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed + 1)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cfg: PrepConfig | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Prepare the dataset `cfg` describes; returns its output directory.

    `cfg` is a PrepConfig or the path of a YAML file (then `overrides` apply).
    """
    if not isinstance(cfg, PrepConfig):
        cfg = load_config(cfg, overrides)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    docs: list[Document] = []
    for src in cfg.sources:
        for rec in tqdm(read_source(src), desc=f"read {src.kind}", disable=not cfg.progress):
            if isinstance(rec, Document) and rec.text:
                docs.append(rec)
    log.info("read %d documents in %.1fs", len(docs), time.perf_counter() - t0)

    sh = cfg.shards
    if sh.shuffle:
        docs.sort(key=lambda d: order_key(d.id, sh.split_seed))
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        by_split[split_of(d.id, sh.val_fraction, sh.split_seed)].append(d)

    t1 = time.perf_counter()
    tok = train_tokenizer((d.text for d in by_split["train"]), cfg.tokenizer)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is plain text
    tok_path = out / "tokenizer.json"
    tok.save(str(tok_path))
    vocab_size = tok.get_vocab_size()
    log.info("trained a %d-token BPE in %.1fs", vocab_size, time.perf_counter() - t1)

    splits = {}
    for split in SPLITS:
        texts = (d.text for d in by_split[split])
        arrays = encode_documents(tok, texts, eos_id=0, batch_size=cfg.tokenizer.batch_size)
        bar = tqdm(
            arrays, total=len(by_split[split]), desc=f"pack {split}", disable=not cfg.progress
        )
        splits[split] = write_shards(out, split, bar, vocab_size, sh.shard_tokens)

    meta = {
        "format": FORMAT,
        "dtype": dtype_name(dtype_for_vocab(vocab_size)),
        "vocab_size": vocab_size,
        "eos_id": 0,
        "eos_token": cfg.tokenizer.eos_token,
        "tokenizer": tok_path.name,
        "tokenizer_sha256": sha256_file(tok_path),
        "splits": splits,
        "config": to_dict(cfg),
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info(
        "wrote %s: train %d tokens / %d docs, val %d tokens / %d docs in %.1fs",
        out,
        splits["train"]["tokens"],
        splits["train"]["documents"],
        splits["val"]["tokens"],
        splits["val"]["documents"],
        time.perf_counter() - t0,
    )
    return out
