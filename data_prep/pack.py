"""The pack stage: the clean corpus encoded and written as token shards, and meta.json, into OUT.

As tasks: one per input shard encodes its documents (`_encode_shard`: the tokens of each split
into `enc/part-NNNNN.<split>.bin`, and a small index of each document's order key, split and
length); then one task per split (`_write_split`) orders that split's documents by the index
(a seeded hash of the id with `shards.shuffle`, else reading order) and writes the split's
shards of `shards.shard_tokens` tokens, copying token ranges out of the encoded files. The
driver writes meta.json from the counts and shard names the tasks return: it never holds a
document or a token. The write task holds the index, 24 bytes per document of its split.

The directory it writes is the dataset format of `contracts.dataset`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from contracts.dataset import META as DATASET_MARKER
from contracts.dataset import SPLITS, DatasetMeta, write_dataset_meta
from data_prep import storage
from data_prep.config import PrepConfig, to_dict
from data_prep.executor import Executor
from data_prep.shardio import shard_name
from data_prep.shardops import SHARD_MODULES, accounts, shard_items
from data_prep.shards import dtype_for_vocab, dtype_name, order_key, split_of, write_shards
from data_prep.stage import Stage, StageResult, new_stats, out_root
from data_prep.stats import StepStats
from data_prep.store import parquet, read_docs
from data_prep.tokenizer import encode_documents


def load_for_packing(path: str | Path, eos_token: str) -> tuple[Tokenizer, int, int]:
    """(tokenizer, vocab size, eos id) as pack encodes: special tokens in a document's text
    are plain text, no truncation or padding (a pretrained tokenizer.json may ship with
    either)."""
    tok = Tokenizer.from_str(storage.read_text(path))
    tok.encode_special_tokens = True
    tok.no_truncation()
    tok.no_padding()
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise RuntimeError(f"{path} has no {eos_token!r} token")
    return tok, tok.get_vocab_size(with_added_tokens=True), eos_id


def _enc_path(out: str, i: int, split: str) -> str:
    return storage.join(out, "enc", f"{shard_name(i)}.{split}.bin")


def _index_path(out: str, i: int) -> str:
    return storage.join(out, "enc", f"{shard_name(i)}.index.parquet")


def _encode_shard(item: dict[str, Any], cfg: PrepConfig, tok_path: str,
                  out: str) -> dict[str, list]:
    """One input shard encoded: per split its tokens (eos after each document) and the index
    (order key, split, tokens) of its documents in reading order."""
    i, sh, rep = int(item["shard"]), cfg.shards, cfg.report
    tok, vocab_size, eos_id = load_for_packing(tok_path, cfg.tokenizer.eos_token)
    dtype = dtype_for_vocab(vocab_size)
    total = StepStats("pack", rep.examples_per_reason, rep.snippet_chars)
    keys, splits, lengths, texts = [], [], [], []
    for d in read_docs(item["path"]):
        total.count_in(d.nbytes)
        total.keep(d.nbytes)
        keys.append(order_key(d.id, sh.split_seed) if sh.shuffle else 0)
        splits.append(split_of(d.id, sh.val_fraction, sh.split_seed))
        texts.append(d.text)
    tmps = {s: storage.scratch(_enc_path(out, i, s)) for s in SPLITS}
    files = {s: open(tmps[s], "wb") for s in SPLITS}
    try:
        arrays = encode_documents(tok, texts, eos_id, batch_size=cfg.tokenizer.batch_size)
        for k, (arr, split) in enumerate(zip(arrays, splits, strict=True)):
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"token id out of range [0, {vocab_size}) in document {k} "
                                 f"of shard {i}")
            arr.astype(dtype).tofile(files[split])
            lengths.append(arr.size)
    finally:
        for f in files.values():
            f.close()
    for s, tmp in tmps.items():
        storage.commit(tmp, _enc_path(out, i, s))
    index = pa.table({"key": pa.array(keys, pa.uint64()), "split": pa.array(splits, pa.string()),
                      "tokens": pa.array(lengths, pa.int64())})
    tmp = storage.scratch(_index_path(out, i))
    pq.write_table(index, tmp)
    storage.commit(tmp, _index_path(out, i))
    return {"shard": [i], "acct": [json.dumps({"total": total.to_dict()})]}


def _documents(out: str, n_shards: int, split: str, shuffle: bool, vocab_size: int,
               local: Path) -> Iterator[np.ndarray]:
    """The split's documents' tokens in packing order: by order key (stable, so equal keys
    keep reading order) with `shuffle`, else in reading order. An encoded file on a store is
    first copied into the task's own folder `local`."""
    dtype = dtype_for_vocab(vocab_size)
    shard_of, start, length, key = [], [], [], []
    for i in range(n_shards):
        t = parquet(_index_path(out, i)).read()
        mine = np.asarray(t.column("split").to_pylist()) == split
        n = t.column("tokens").to_numpy()[mine]
        shard_of.append(np.full(len(n), i, np.int32))
        start.append((np.cumsum(n) - n).astype(np.int64))
        length.append(n)
        key.append(t.column("key").to_numpy()[mine])
    if not shard_of:
        return
    shard_a, start_a, length_a = (np.concatenate(x) for x in (shard_of, start, length))
    order = np.argsort(np.concatenate(key), kind="stable") if shuffle else range(len(shard_a))
    maps: dict[int, np.ndarray] = {}
    for k in order:
        i = int(shard_a[k])
        if i not in maps:
            p = Path(_enc_path(out, i, split))
            if storage.is_remote(out):
                storage.download(_enc_path(out, i, split), p := local / p.name)
            size = p.stat().st_size  # mapped, not read: the task's memory stays the index's
            maps[i] = np.memmap(p, dtype=dtype, mode="r") if size else np.empty(0, dtype)
        yield maps[i][start_a[k]:start_a[k] + length_a[k]]


def _write_split(item: dict[str, Any], cfg: PrepConfig, out: str, root: str, n_shards: int,
                 vocab_size: int) -> dict[str, list]:
    """One split's token shards, written into the dataset directory."""
    split = item["split"]
    with tempfile.TemporaryDirectory(prefix="tokenclock-pack-") as local:
        docs = _documents(out, n_shards, split, cfg.shards.shuffle, vocab_size, Path(local))
        entry = write_shards(root, split, docs, vocab_size, cfg.shards.shard_tokens)
    return {"split": [split], "entry": [json.dumps(entry)]}


class Pack(Stage):
    """Encodes every document with the tokenizer in `tok_dir` (copied into OUT), splits them
    into train and val by id, writes each split's shards and then meta.json."""

    name = "pack"
    modules = ("pack.py", "shards.py", "tokenizer.py", *SHARD_MODULES)

    def __init__(self, tok_dir: str) -> None:
        self.tok_dir = tok_dir

    def part(self, cfg: PrepConfig) -> Any:
        return [to_dict(cfg)["shards"], to_dict(cfg)["tokenizer"], str(cfg.out_dir)]

    def run(self, cfg: PrepConfig, ex: Executor, inp: str | None, out: str,
            res: StageResult) -> None:
        """The dataset is un-committed first (meta.json removed: readers trust nothing
        until the new one is written, last)."""
        assert inp is not None
        root = out_root(cfg)
        storage.remove(storage.join(root, DATASET_MARKER))
        tok_path = storage.join(root, "tokenizer.json")
        with storage.open(storage.join(self.tok_dir, "tokenizer.json")) as src:
            tok_bytes = src.read()  # one small file, byte for byte
        with storage.atomic_write(tok_path) as dst:
            dst.write(tok_bytes)
        _, vocab_size, eos_id = load_for_packing(tok_path, cfg.tokenizer.eos_token)
        items = shard_items(inp)
        rows = ex.each_shard(items, _encode_shard, desc="pack encode", cfg=cfg,
                             tok_path=tok_path, out=out)
        total = new_stats(cfg, res.name)
        for acct in accounts(rows):
            total.merge(StepStats.from_dict(acct["total"]))
        written = ex.rows(ex.map_shards([{"split": s} for s in SPLITS], _write_split,
                                        desc="pack write", cfg=cfg, out=out,
                                        root=root, n_shards=len(items),
                                        vocab_size=vocab_size))
        splits = {r["split"]: json.loads(r["entry"]) for r in written}
        splits = {s: splits[s] for s in SPLITS}
        for split in SPLITS:
            total.bump(f"{split}_documents", splits[split]["documents"])
            total.bump(f"{split}_tokens", splits[split]["tokens"])
        storage.remove(storage.join(out, "enc"))  # the shards hold the tokens now
        meta = DatasetMeta(
            root=Path(root), dtype=dtype_name(dtype_for_vocab(vocab_size)),
            vocab_size=vocab_size, eos_id=eos_id, eos_token=cfg.tokenizer.eos_token,
            tokenizer="tokenizer.json", tokenizer_sha256=hashlib.sha256(tok_bytes).hexdigest(),
            splits=splits, config=to_dict(cfg),
        )
        if storage.is_remote(root):  # contracts' writer, to the store: the marker, last
            meta.created_utc = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            storage.write_text(storage.join(root, DATASET_MARKER),
                               json.dumps(meta.to_dict(), indent=2) + "\n")
        else:
            write_dataset_meta(meta)
        res.total = total
        res.extra = {"splits": splits, "vocab_size": vocab_size, "eos_id": eos_id}
