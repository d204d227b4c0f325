import json

import numpy as np
import pytest

from train.data import BatchLoader, TokenWindows


def write_dataset(path, splits, vocab_size=1000, dtype="uint16"):
    """A prepared-dataset directory in the documented format, written by hand."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": 1, "dtype": dtype, "vocab_size": vocab_size, "eos_id": 0, "splits": {}}
    for split, shards in splits.items():
        names = []
        for i, tokens in enumerate(shards):
            name = f"{split}_{i:06d}.bin"
            np.asarray(tokens, dtype=dtype).tofile(path / name)
            names.append(name)
        meta["splits"][split] = {"shards": names, "tokens": sum(map(len, shards))}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_windows_span_shards_without_crossing(tmp_path):
    d = write_dataset(tmp_path / "d", {"train": [np.arange(1, 42), np.arange(100, 121)]})
    w = TokenWindows(d, "train", seq_len=10)
    assert len(w) == 4 + 2  # (41-1)//10 + (21-1)//10
    assert w[0].tolist() == list(range(1, 12))
    assert w[3].tolist() == list(range(31, 42))
    assert w[4].tolist() == list(range(100, 111))
    assert w[5].dtype == np.int64


def test_ranks_get_disjoint_windows_and_resume_exactly(tmp_path):
    d = write_dataset(tmp_path / "d", {"train": [np.arange(1, 401)]})
    w = TokenWindows(d, "train", seq_len=4)  # 99 windows
    loaders = [BatchLoader(w, 3, rank, 2, seed=5) for rank in range(2)]
    seen = [set(), set()]
    for _ in range(49 // 3):
        for r, loader in enumerate(loaders):
            x, y = loader.next()
            assert x.shape == (3, 4) and (x[:, 1:] == y[:, :-1]).all()
            seen[r].update(x[:, 0].tolist())
    assert not seen[0] & seen[1]
    state = loaders[0].state_dict()
    expected = [loaders[0].next()[0] for _ in range(5)]  # crosses an epoch boundary
    fresh = BatchLoader(w, 3, 0, 2, seed=5)
    fresh.load_state_dict(state)
    assert all((fresh.next()[0] == e).all() for e in expected)


def test_bad_data_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenWindows(tmp_path, "train", 4)
    d = write_dataset(tmp_path / "d", {"train": [np.arange(1, 50)]}, vocab_size=20)
    with pytest.raises(ValueError, match="token id 49 >= vocab_size 20"):
        TokenWindows(d, "train", 4, vocab_size=20)
    with pytest.raises(ValueError, match="split 'val'"):
        TokenWindows(d, "val", 4)
    with pytest.raises(ValueError, match="too few"):
        BatchLoader(TokenWindows(d, "train", 16), 4, 0, 2, seed=0)
    (d / "train_000000.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="truncated"):
        TokenWindows(d, "train", 4)
    (d / "train_000000.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        TokenWindows(d, "train", 4)
