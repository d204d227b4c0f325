"""tokenizer.pretrained: prep encodes with a tokenizer.json it is given (no training), appends
that tokenizer's own end-of-text id, and records it in meta.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data_prep import load_config, run
from data_prep.__main__ import main as prep_main
from data_prep.pipeline import split_of
from data_prep.readers import stdlib_dir
from data_prep.shards import read_split
from data_prep.store import read_docs
from data_prep.tokenizer import PretrainedTokenizerError, load_pretrained, new_tokenizer

from .conftest import REPO, TINY

SPECIALS = ["<pad>", "<s>", "</s>"]  # so the eos "</s>" is id 2, not 0


def bpe_json(path: Path) -> Path:
    """A small byte-level BPE whose eos is `</s>` (id 2), saved with truncation switched on,
    as some published tokenizer.json files are (prep must not truncate documents)."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [p.read_text("utf-8") for p in sorted((stdlib_dir() / "json").glob("*.py"))]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.enable_truncation(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def word_level_json(path: Path, size: int = 70_000) -> Path:
    """A word-level tokenizer with more than 65,536 ids (so shards need uint32) and its eos
    `</s>` as the last id."""
    words = [f"w{i}" for i in range(size - 2)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}, "</s>": size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def clean_docs(out: Path) -> dict[str, list[str]]:
    """Texts of the documents the last document stage kept, by split."""
    report = json.loads((out / "report.json").read_text())
    pii = next(s for s in report["stages"] if s["name"] == "pii")
    by: dict[str, list[str]] = {"train": [], "val": []}
    for d in read_docs(pii["docs_path"]):
        by[split_of(d.id, 0.1)].append(d.text)  # tiny.yaml: val_fraction 0.1, split_seed 0
    return by


@pytest.fixture(scope="module")
def prepped(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pretrained")
    tok_file = bpe_json(tmp / "tok" / "tokenizer.json")
    cfg = load_config(
        TINY,
        [
            f"out_dir={tmp / 'out'}",
            "progress=false",
            f"tokenizer.pretrained={tok_file}",
            "tokenizer.eos_token=</s>",
        ],
    )
    return run(cfg), tok_file


def test_meta_records_the_pretrained_eos_and_vocab(prepped):
    out, tok_file = prepped
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(tok_file))
    assert meta["format"] == 1
    assert meta["eos_token"] == "</s>" and meta["eos_id"] == 2 == tok.token_to_id("</s>")
    assert meta["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) == 600
    assert meta["dtype"] == "uint16"
    assert (out / "tokenizer.json").read_bytes() == tok_file.read_bytes()  # copied as it is
    report = json.loads((out / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "tokenizer")
    assert stage["extra"]["pretrained"] == str(tok_file)
    assert stage["extra"]["round_trip_mismatches"] == 0 < stage["extra"]["round_trip_checked"]


def test_shards_decode_back_to_the_documents(prepped):
    out, _ = prepped
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    expected = clean_docs(out)
    for split in ("train", "val"):
        tokens = read_split(out, split)
        ends = np.flatnonzero(tokens == 2)
        assert len(ends) == meta["splits"][split]["documents"] == len(expected[split]) > 0
        assert tokens[-1] == 2 and tokens.max() < meta["vocab_size"]
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded = [tok.decode(tokens[a:b].tolist(), skip_special_tokens=False)
                   for a, b in zip(starts, ends, strict=True)]
        # not truncated to the file's 16 tokens, and exactly the clean documents (in shuffled order)
        assert sorted(decoded) == sorted(expected[split])


def test_changed_tokenizer_file_reruns_tokenizer_and_pack_only(prepped, tmp_path):
    """Same path, new content: the stage key holds the file's hash, so the tokenizer and pack
    stages re-run (and the document stages do not); >65,536 ids give uint32 shards."""
    out = tmp_path / "out"
    shutil.copytree(prepped[0], out)  # a copy: the other tests keep the module's dataset
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copyfile(prepped[1], tok_dir / "tokenizer.json")
    overrides = [f"out_dir={out}", "progress=false", "tokenizer.eos_token=</s>"]
    cfg = load_config(TINY, [*overrides, f"tokenizer.pretrained={tok_dir}"])  # the directory

    def cached() -> dict[str, bool]:
        run(cfg)
        report = json.loads((out / "report.json").read_text())
        return {s["name"]: s["cached"] for s in report["stages"]}

    assert not cached()["tokenizer"]  # another path: a new key
    assert cached()["pack"]  # unchanged file: everything is up to date
    word_level_json(tok_dir / "tokenizer.json")
    now = cached()
    assert now["read"] and now["near_dedup"] and now["pii"]
    assert not now["tokenizer"] and not now["pack"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert meta["eos_id"] == 69_999
    tokens = read_split(out, "train")
    assert tokens.dtype == np.uint32
    assert int((tokens == 69_999).sum()) == meta["splits"]["train"]["documents"]
    report = json.loads((out / "report.json").read_text())
    tok_stage = next(s for s in report["stages"] if s["name"] == "tokenizer")
    assert tok_stage["extra"]["round_trip_mismatches"] > 0  # word-level loses the spacing: reported


def test_missing_eos_token_is_a_clear_error(tmp_path, capsys):
    tok_file = bpe_json(tmp_path / "tokenizer.json")
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'out'}", f"tokenizer.pretrained={tok_file}"])
    with pytest.raises(PretrainedTokenizerError, match=r"eos_token='<\|endoftext\|>'.*'</s>'"):
        run(cfg)
    assert not (tmp_path / "out" / "stages").exists()  # failed before any stage ran
    rc = prep_main([str(TINY), f"out_dir={tmp_path / 'out'}", f"tokenizer.pretrained={tok_file}"])
    assert rc == 2
    assert "'<|endoftext|>' is not in the vocabulary" in capsys.readouterr().err


def test_bad_paths_are_clear_errors(tmp_path):
    cfg = load_config(TINY, [f"tokenizer.pretrained={tmp_path / 'nope.json'}"])
    with pytest.raises(PretrainedTokenizerError, match="no such file"):
        load_pretrained(cfg.tokenizer)
    cfg = load_config(TINY, [f"tokenizer.pretrained={tmp_path}"])  # a directory, no tokenizer.json
    with pytest.raises(PretrainedTokenizerError, match="directory without a tokenizer.json"):
        load_pretrained(cfg.tokenizer)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(PretrainedTokenizerError, match="not a HF `tokenizers` tokenizer.json"):
        load_pretrained(cfg.tokenizer)


def test_unreachable_hub_name_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # fail at once instead of retrying the network
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", str(TINY), f"out_dir={tmp_path}",
         "tokenizer.pretrained=no-such-org/no-such-tokenizer"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "loading it from the HuggingFace hub failed" in proc.stderr


def test_generate_and_export_use_the_datasets_eos(prepped, tmp_path):
    """A run trained on these shards stops sampling at `</s>` and exports it as bos/eos/pad:
    model.generate and model.export read eos_token from the dataset's meta.json."""
    from model.config import ModelConfig
    from model.export import export_run
    from model.generate import find_eos_token, generate_text, load_run
    from tests.model.test_generate_cli import make_run_dir, random_model

    out, _ = prepped
    cfg = ModelConfig(vocab_size=600, seq_len=24, n_layer=1, d_model=32, n_head=4, n_kv_head=2)
    run_dir = make_run_dir(tmp_path / "run", random_model(cfg), out / "tokenizer.json")
    loaded = load_run(run_dir)
    assert loaded.eos_token == "</s>"
    texts, stats = generate_text(loaded, "", max_new_tokens=4, temperature=0.0)
    assert stats["new_tokens"] >= 1 and len(texts) == 1
    hf = export_run(run_dir, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == 2
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == 2
    assert json.loads((hf / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(hf).eos_token_id == 2
    # a tokenizer the meta.json does not describe falls back to the trained BPE's name
    other = bpe_json(tmp_path / "other" / "tokenizer.json")
    other.write_text(other.read_text().replace('"max_length": 16', '"max_length": 17'))
    assert find_eos_token(other, run_dir, {"data_dir": str(out)}) == "<|endoftext|>"
