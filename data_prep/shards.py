"""Token shards: the on-disk contract between data_prep/ and train/ (format 1).

A prepared dataset is a directory::

    OUT/
      meta.json            what is in the directory (below)
      tokenizer.json       HF `tokenizers` file: the byte-level BPE trained by prep, or a copy
                           of the pretrained one (`tokenizer.pretrained`); load with
                           Tokenizer.from_file and set `tok.encode_special_tokens = True` to
                           encode text exactly as prep did (a literal "<|endoftext|>" inside a
                           document is text, not eos; the flag is not saved in tokenizer.json),
                           with add_special_tokens=False (no BOS or template tokens)
      train_000000.bin     train split, shard 0
      train_000001.bin     ...
      val_000000.bin       validation split, shard 0
      report.md, report.json   per-stage accounting of the prep run (informational)

Shards (`<split>_<index:06d>.bin`):
  * a raw array of token ids with no header: little-endian unsigned integers of
    `meta["dtype"]`, which is "uint16" when vocab_size <= 65536 and "uint32" otherwise;
  * every document's tokens are followed by one end-of-document token `meta["eos_id"]`
    (the id of `meta["eos_token"]`: 0 for the BPE trained by prep, whose eos is its first
    token; a pretrained tokenizer's own id otherwise), so a split is a concatenation of
    `doc_0 eos doc_1 eos ...` and shards are consecutive pieces of that stream: documents may
    cross a shard boundary; a split's stream is its shards concatenated in the listed order;
  * every shard holds `shards.shard_tokens` tokens except the last shard of a split;
  * a split with no documents has an empty shard list and 0 tokens.
  Read one with `np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")`.

meta.json::

    {"format": 1,                      # bumped on any incompatible change
     "dtype": "uint16",                # numpy dtype name of the shard elements (little-endian)
     "vocab_size": 4096,               # the tokenizer's get_vocab_size(with_added_tokens=True);
                                       # every id < vocab_size
     "eos_id": 0,                      # end-of-document token id, appended after every document
     "eos_token": "<|endoftext|>",     # its text; readers should use these two, not a fixed name
     "tokenizer": "tokenizer.json",    # path relative to the directory
     "tokenizer_sha256": "...",        # sha256 of tokenizer.json's bytes
     "splits": {"train": {"shards": ["train_000000.bin", ...],   # relative paths, in order
                          "tokens": 123,       # total tokens over the shards, eos included
                          "documents": 45},    # documents (= eos tokens) in the split
                "val": {...}},
     "config": {...},                  # the fully resolved prep config
     "created_utc": "2025-01-01T00:00:00Z"}

The train/val split is by document: a document is in "val" when
`xxh64(id, seed=shards.split_seed) / 2**64 < shards.val_fraction`, so a document's split
depends only on its id and never changes when other documents are added or removed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

FORMAT = 1
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}; must be > 0")
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).newbyteorder("=").name


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_shards(
    out_dir: str | Path,
    split: str,
    documents: Iterable[np.ndarray | list[int]],
    vocab_size: int,
    shard_tokens: int,
) -> dict:
    """Write token arrays (one per document, eos already appended) as consecutive shards.

    Returns the split's meta entry: {"shards": [...], "tokens": N, "documents": D}. Existing
    shards of this split in `out_dir` are removed first so a re-run never leaves stale files.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens}; must be > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{split}_*.bin"):
        old.unlink()
    dtype = dtype_for_vocab(vocab_size)
    shards: list[str] = []
    buf = np.empty(shard_tokens, dtype=dtype)
    fill = total = ndocs = 0

    def flush(n: int) -> None:
        name = shard_name(split, len(shards))
        buf[:n].tofile(out / name)
        shards.append(name)

    for doc in documents:
        arr = np.asarray(doc)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(
                f"token id out of range [0, {vocab_size}) in document {ndocs} of split {split!r}"
            )
        arr = arr.astype(dtype, copy=False)
        ndocs += 1
        total += arr.size
        pos = 0
        while pos < arr.size:
            take = min(shard_tokens - fill, arr.size - pos)
            buf[fill : fill + take] = arr[pos : pos + take]
            fill += take
            pos += take
            if fill == shard_tokens:
                flush(fill)
                fill = 0
    if fill:
        flush(fill)
    return {"shards": shards, "tokens": int(total), "documents": ndocs}


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}; this code reads format {FORMAT}")
    return meta


def read_split(data_dir: str | Path, split: str) -> np.ndarray:
    """All tokens of a split (its shards concatenated) as one array of meta's dtype."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"split {split!r} not in {sorted(meta['splits'])}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    parts = [np.fromfile(Path(data_dir) / s, dtype=dtype) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
