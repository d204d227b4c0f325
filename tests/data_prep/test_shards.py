from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.shards import dtype_for_vocab, read_split, write_shards


def _write_meta(d, vocab, splits):
    meta = {
        "format": 1,
        "dtype": dtype_for_vocab(vocab).newbyteorder("=").name,
        "vocab_size": vocab,
        "eos_id": 0,
        "splits": splits,
    }
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "vocab,dtype", [(512, "uint16"), (65536, "uint16"), (65537, "uint32"), (200_000, "uint32")]
)
def test_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, vocab, size=n), 0) for n in [0, 5, 17, 3, 40]]
    info = write_shards(tmp_path, "train", docs, vocab_size=vocab, shard_tokens=10)
    total = sum(len(d) for d in docs)
    assert info["tokens"] == total and info["documents"] == 5
    assert info["shards"] == [f"train_{i:06d}.bin" for i in range(-(-total // 10))]
    sizes = [(tmp_path / s).stat().st_size for s in info["shards"]]
    item = np.dtype(dtype).itemsize
    assert (
        sizes[:-1] == [10 * item] * (len(sizes) - 1)
        and sizes[-1] == (total - 10 * (len(sizes) - 1)) * item
    )
    _write_meta(tmp_path, vocab, {"train": info})
    back = read_split(tmp_path, "train")
    assert back.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(back, np.concatenate(docs))
    assert int((back == 0).sum()) == 5
    # raw little-endian on disk, readable with a plain memmap
    mm = np.memmap(tmp_path / info["shards"][0], dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
    np.testing.assert_array_equal(mm, np.concatenate(docs)[:10])


def test_rewrite_removes_stale_shards(tmp_path):
    write_shards(tmp_path, "val", [np.arange(1, 30)], vocab_size=100, shard_tokens=10)
    info = write_shards(tmp_path, "val", [np.arange(1, 5)], vocab_size=100, shard_tokens=10)
    assert (
        sorted(p.name for p in tmp_path.glob("val_*.bin")) == info["shards"] == ["val_000000.bin"]
    )


def test_empty_split(tmp_path):
    info = write_shards(tmp_path, "val", [], vocab_size=100, shard_tokens=10)
    assert info == {"shards": [], "tokens": 0, "documents": 0}
    _write_meta(tmp_path, 100, {"val": info})
    assert read_split(tmp_path, "val").size == 0


def test_out_of_range_ids_rejected(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_shards(tmp_path, "train", [np.array([1, 100])], vocab_size=100, shard_tokens=10)
