from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep import load_config
from data_prep.pipeline import split_of
from data_prep.shards import read_split
from data_prep.store import read_docs

from .conftest import TINY


def test_meta_fields(tiny_dir):
    meta = json.loads((tiny_dir / "meta.json").read_text())
    assert meta["format"] == 1
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 512 and meta["eos_id"] == 0
    assert meta["tokenizer"] == "tokenizer.json"
    tok_bytes = (tiny_dir / "tokenizer.json").read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(tok_bytes).hexdigest()
    assert set(meta["splits"]) == {"train", "val"}
    assert meta["config"]["tokenizer"]["vocab_size"] == 512
    assert meta["created_utc"].endswith("Z")
    for split, info in meta["splits"].items():
        assert info["documents"] > 0
        assert all((tiny_dir / s).exists() for s in info["shards"])
        tokens = read_split(tiny_dir, split)
        assert tokens.size == info["tokens"]
        assert int((tokens == 0).sum()) == info["documents"]  # one eos per document
        assert tokens[-1] == 0 and tokens.max() < meta["vocab_size"]


def test_shards_decode_to_documents(tiny_dir):
    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    tokens = read_split(tiny_dir, "val")
    ends = np.flatnonzero(tokens == 0)
    first = tok.decode(tokens[: ends[0]].tolist())
    assert len(first) > 0
    # every val document decodes to text of an embedded-corpus document
    assert "\ufffd" not in first


def test_val_split_is_deterministic_and_local():
    ids = [f"stdlib/mod_{i}.py" for i in range(2000)]
    a = {i: split_of(i, 0.1, seed=0) for i in ids}
    assert a == {i: split_of(i, 0.1, seed=0) for i in reversed(ids)}
    frac = sum(v == "val" for v in a.values()) / len(ids)
    assert 0.07 < frac < 0.13
    assert {i: split_of(i, 0.1, seed=1) for i in ids} != a  # the seed matters
    assert all(split_of(i, 0.0) == "train" for i in ids)


def test_val_documents_are_those_split_of_picks(tiny_dir):
    cfg = load_config(TINY)
    report = json.loads((tiny_dir / "report.json").read_text())
    clean = [s for s in report["stages"] if s["name"] == "pii"][0]["docs_path"]
    docs = list(read_docs(clean))
    val = [
        d for d in docs if split_of(d.id, cfg.shards.val_fraction, cfg.shards.split_seed) == "val"
    ]
    meta = json.loads((tiny_dir / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["documents"] == len(docs) - len(val)


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.vocab_sise"):
        load_config(TINY, ["tokenizer.vocab_sise=10"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards:\n  shard_tokenz: 5\n")
    with pytest.raises(ValueError, match="shard_tokenz"):
        load_config(bad)
    with pytest.raises(ValueError, match="kind"):
        load_config(TINY, ["sources.0.kind=csv"])


@pytest.mark.parametrize("shuffle", [True, False])
def test_pack_tasks_give_the_one_process_token_stream(tmp_path, shuffle):
    """Pack encodes shard by shard in a pool and writes each split in a task: its shards hold
    the clean documents' tokens in the order one process would pack them (sorted by
    `order_key` with shuffle, reading order without), cut every shard_tokens tokens."""
    from data_prep import run
    from data_prep.shards import order_key

    out = tmp_path / "out"
    cfg = load_config(TINY, [f"out_dir={out}", "progress=false", "workers=2",
                             "ray.shard_docs=10", "shards.shard_tokens=3000",
                             f"shards.shuffle={str(shuffle).lower()}"])
    run(cfg)
    report = json.loads((out / "report.json").read_text())
    clean = [s for s in report["stages"] if s["name"] == "pii"][0]["docs_path"]
    assert len(list((out / "stages").glob("*_pii/docs/part-*.parquet"))) > 2  # several tasks
    docs = list(read_docs(clean))
    sh = cfg.shards
    if shuffle:
        docs.sort(key=lambda d: order_key(d.id, sh.split_seed))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.encode_special_tokens = True
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        want = [t for d in docs if split_of(d.id, sh.val_fraction, sh.split_seed) == split
                for t in [*tok.encode(d.text, add_special_tokens=False).ids, 0]]
        assert read_split(out, split).tolist() == want
        assert len(meta["splits"][split]["shards"]) == -(-len(want) // 3000)
