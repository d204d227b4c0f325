"""Token shards: writing a split as consecutive raw shards, the train/val split, reading back.

The dataset directory, shard and meta.json format is described in `contracts.dataset`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xxhash

from contracts.dataset import read_dataset_meta
from data_prep import storage


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train', from a seeded 64-bit hash of the id alone (stable as data is added)."""
    h = xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed)
    return "val" if h / 2**64 < val_fraction else "train"


def order_key(doc_id: str, seed: int) -> int:
    """The packing order of a document when shards.shuffle: a seeded hash of its id."""
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed + 1)


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
    `out_dir` may be an object-store URL (data_prep.storage): each shard is then one upload,
    all or nothing, as it fills.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens}; must be > 0")
    storage.mkdirs(out_dir)
    for old in storage.files(out_dir, f"{split}_*.bin"):
        storage.remove(old)
    dtype = dtype_for_vocab(vocab_size)
    shards: list[str] = []
    buf = np.empty(shard_tokens, dtype=dtype)
    fill = total = ndocs = 0

    def flush(n: int) -> None:
        name = shard_name(split, len(shards))
        if storage.is_remote(out_dir):
            with storage.atomic_write(storage.join(out_dir, name)) as f:
                f.write(buf[:n].tobytes())
        else:
            buf[:n].tofile(storage.local_path(out_dir) / name)
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


def read_split(data_dir: str | Path, split: str) -> np.ndarray:
    """All tokens of a split (its shards concatenated) as one array of meta's dtype."""
    meta = read_dataset_meta(data_dir)
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    parts = [np.fromfile(p, dtype=dtype) for p in meta.shard_paths(split)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
