from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from data_prep.config import TokenizerConfig
from data_prep.readers import stdlib_dir
from data_prep.tokenizer import encode_documents, train_tokenizer

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "Grüße, naïve café — 東京 🐍 ∑ x² ≤ ∞\n",
    "tabs\tand  double  spaces\r\nand CRLF\n\n\n",
    "",
    "<|endoftext|> is plain text inside a document",
    "\x00\x01 control \u200b zero-width \ufeff bom",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [p.read_text("utf-8") for p in sorted((stdlib_dir() / "json").glob("*.py"))]
    t = train_tokenizer(texts, TokenizerConfig(vocab_size=400))
    t.encode_special_tokens = True
    return t


def test_eos_is_id_zero(tok):
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.get_vocab_size() <= 400


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert 0 not in ids  # a literal eos string in a document is not the eos token
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_stdlib_files(tok):
    for rel in ["textwrap.py", "json/decoder.py", "unicodedata.py", "html/entities.py"]:
        path = stdlib_dir() / rel
        if not path.exists():
            continue
        text = path.read_text("utf-8")
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_encode_documents_appends_eos(tok):
    texts = ["a b c", "", "x" * 10]
    arrays = list(encode_documents(tok, texts, eos_id=0, batch_size=2))
    assert len(arrays) == 3
    for text, arr in zip(texts, arrays, strict=True):
        assert arr[-1] == 0 and 0 not in arr[:-1]
        assert tok.decode(arr[:-1].tolist()) == text


def test_saved_tokenizer_round_trips(tok, tmp_path: Path):
    tok.save(str(tmp_path / "t.json"))
    again = Tokenizer.from_file(str(tmp_path / "t.json"))
    again.encode_special_tokens = True  # not saved in tokenizer.json (see data_prep.shards)
    text = SAMPLES[1] + SAMPLES[4]
    assert again.encode(text).ids == tok.encode(text).ids


def test_progress_bars_do_not_change_the_tokenizer(tok):
    """Tokenizer training shows the tokenizers library's progress (`progress: true`, the
    default); the bars leave the trained vocabulary as it is."""
    texts = [p.read_text("utf-8") for p in sorted((stdlib_dir() / "json").glob("*.py"))]
    shown = train_tokenizer(texts, TokenizerConfig(vocab_size=400), progress=True,
                            length=len(texts))
    assert shown.get_vocab() == tok.get_vocab()
