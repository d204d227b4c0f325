"""Tokenizers: byte-level BPE training, or a pretrained tokenizer.json; batched encoding.

Byte-level (GPT-2 style) BPE starts from the 256 byte values, so any text round-trips exactly:
`decode(encode(text)) == text`, unicode included. When trained here, `<|endoftext|>` (the
configured `tokenizer.eos_token`) is the first special token, hence id 0, and marks the end of
every document in the shards.

With `tokenizer.pretrained` set, no training happens: the tokenizer is read from a local
`tokenizer.json` (or a directory holding one, or a HuggingFace hub name), and the end-of-text
token is whatever id `tokenizer.eos_token` has in its vocabulary. Whether such a tokenizer
round-trips text exactly depends on it (normalisers and unknown tokens lose information).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep import storage
from data_prep.config import PrepConfig, TokenizerConfig, to_dict
from data_prep.executor import Executor
from data_prep.shards import split_of
from data_prep.stage import STEP_MODULES, Stage, StageResult, new_stats
from data_prep.stats import StepStats
from data_prep.store import read_docs

log = logging.getLogger("data_prep")
ROUND_TRIP_SAMPLE = 200  # train documents a pretrained tokenizer is checked on


class PretrainedTokenizerError(ValueError):
    """`tokenizer.pretrained` cannot be used: not found, unreadable, or without the eos token."""


@dataclass
class Pretrained:
    """A loaded pretrained tokenizer and where it came from."""

    tokenizer: Tokenizer
    source: str  # the file it was read from, or "hub:<name>"
    file: Path | None  # the local tokenizer.json, None when it came from the hub
    sha256: str  # of the file's bytes (local) or of the serialised tokenizer (hub)
    eos_id: int


def load_pretrained(cfg: TokenizerConfig) -> Pretrained:
    """Load `cfg.pretrained` (a tokenizer.json, a directory holding one, or a hub name) and
    check that `cfg.eos_token` is in its vocabulary and that its ids are 0..vocab_size-1."""
    spec = cfg.pretrained
    if not spec:
        raise PretrainedTokenizerError("tokenizer.pretrained is not set")
    path = Path(spec).expanduser()
    file: Path | None = None
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise PretrainedTokenizerError(
                f"tokenizer.pretrained={spec!r} is a directory without a tokenizer.json; "
                "give the tokenizer.json file itself (HF `tokenizers` format)"
            )
    elif path.is_file():
        file = path
    elif spec.endswith(".json") or spec.startswith(("/", ".", "~")):
        raise PretrainedTokenizerError(f"tokenizer.pretrained={spec!r}: no such file")
    if file is not None:
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise PretrainedTokenizerError(
                f"tokenizer.pretrained={spec!r}: {file} is not a HF `tokenizers` tokenizer.json "
                f"({e})"
            ) from e
        source, digest = str(file), hashlib.sha256(file.read_bytes()).hexdigest()
    else:
        try:
            tok = Tokenizer.from_pretrained(spec)
        except Exception as e:
            raise PretrainedTokenizerError(
                f"tokenizer.pretrained={spec!r} is not a local file or directory, and loading it "
                f"from the HuggingFace hub failed ({type(e).__name__}: {e}); without network "
                "access download its tokenizer.json elsewhere and give that file's path"
            ) from e
        source, digest = f"hub:{spec}", hashlib.sha256(tok.to_str().encode()).hexdigest()
    tok.no_truncation()  # some tokenizer.json files ship with truncation or padding on
    tok.no_padding()
    vocab = tok.get_vocab(with_added_tokens=True)
    eos_id = vocab.get(cfg.eos_token)
    if eos_id is None:
        special = [t.content for _, t in sorted(tok.get_added_tokens_decoder().items())]
        raise PretrainedTokenizerError(
            f"tokenizer.eos_token={cfg.eos_token!r} is not in the vocabulary of {source} "
            f"({len(vocab)} tokens); its added/special tokens are {special[:20]}"
            f"{' ...' if len(special) > 20 else ''}: set tokenizer.eos_token to its "
            "end-of-text token (e.g. '</s>' for Llama 2, '<|end_of_text|>' for Llama 3)"
        )
    size = tok.get_vocab_size(with_added_tokens=True)
    top = max(vocab.values())
    if top >= size:
        raise PretrainedTokenizerError(
            f"{source}: token id {top} >= its vocabulary size {size} (the ids have gaps); "
            "shards need ids 0..vocab_size-1"
        )
    return Pretrained(tok, source, file, digest, eos_id)


def round_trip_mismatches(tok: Tokenizer, texts: Iterable[str]) -> tuple[int, int]:
    """(texts checked, texts for which decode(encode(text)) != text), encoding as pack does."""
    checked = bad = 0
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids
        checked += 1
        bad += tok.decode(ids, skip_special_tokens=False) != t
    return checked, bad


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, progress: bool = False,
                    length: int | None = None) -> Tokenizer:
    """Train BPE on `texts` (stopping after `train_max_bytes` if that is > 0). `progress`:
    the tokenizers library's own bars (reading the texts, counting pairs, merging), with
    `length` texts as the first bar's total when it is known."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )

    def limited() -> Iterator[str]:
        seen = 0
        for t in texts:
            yield t
            seen += len(t)
            if cfg.train_max_bytes and seen >= cfg.train_max_bytes:
                return

    tok.train_from_iterator(limited(), trainer=trainer, length=length)
    eos = tok.token_to_id(cfg.eos_token)
    if eos != 0:
        raise RuntimeError(f"{cfg.eos_token!r} got id {eos}, expected 0")
    return tok


def encode_documents(
    tok: Tokenizer, texts: Iterable[str], eos_id: int, batch_size: int = 256
) -> Iterator[np.ndarray]:
    """Token ids of each text followed by `eos_id`, encoded `batch_size` texts at a time."""
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=np.int64)
            ids[:-1] = enc.ids
            ids[-1] = eos_id
            yield ids
        batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


# --------------------------------------------------------------------------- the tokenizer stage
class TokenizerStage(Stage):
    """Trains the BPE on the train split of the clean corpus, or, given `pretrained`, copies
    that tokenizer and checks that it round-trips a sample of the train documents (a mismatch is
    reported, not an error: the shards hold its encoding). Writes tokenizer.json."""

    name = "tokenizer"
    modules = ("tokenizer.py", "shards.py", *STEP_MODULES)

    def __init__(self, pretrained: Pretrained | None) -> None:
        self.pretrained = pretrained

    def part(self, cfg: PrepConfig) -> Any:
        # a pretrained tokenizer's content, not only its path, decides whether the stage re-runs
        sh = cfg.shards
        sha = self.pretrained.sha256 if self.pretrained else None
        return [to_dict(cfg)["tokenizer"], sh.val_fraction, sh.split_seed, sha]

    def run(self, cfg: PrepConfig, ex: Executor, inp: str | None, out: str,
            res: StageResult) -> None:
        """Trained (or checked) in one task, which reads the clean shards itself and writes
        tokenizer.json into `out` (local or on the store): the driver sees only the counts and
        the vocabulary size. A pretrained tokenizer.json, a file the driver was given, is
        copied byte for byte by the driver."""
        assert inp is not None
        if self.pretrained is not None and self.pretrained.file is not None:
            storage.upload(self.pretrained.file, storage.join(out, "tokenizer.json"))
        (row,) = ex.rows(ex.map_shards([{"shard": 0}], _tokenizer_task, stage=self, cfg=cfg,
                                       inp=inp, out=out))
        acct = json.loads(row["acct"])
        res.total, res.extra = StepStats.from_dict(acct["total"]), acct["extra"]

    def train(self, cfg: PrepConfig, inp: str, out: str) -> dict[str, Any]:
        """The stage's work: its accounting and extras, the tokenizer written into `out`."""
        sh = cfg.shards
        total = new_stats(cfg, "tokenizer")

        def train_texts() -> Iterator[str]:
            for d in read_docs(inp):
                total.count_in(d.nbytes)
                total.keep(d.nbytes)
                if split_of(d.id, sh.val_fraction, sh.split_seed) == "train":
                    total.bump("train_documents")
                    yield d.text

        if self.pretrained is None:
            tok = train_tokenizer(train_texts(), cfg.tokenizer, progress=cfg.progress)
            _save(tok, out)
            extra: dict[str, Any] = {"vocab_size": tok.get_vocab_size()}
        else:
            extra = self._use_pretrained(cfg, train_texts(), out)
        total.bump("vocab_size", extra["vocab_size"])
        return {"total": total.to_dict(), "extra": extra}

    def _use_pretrained(self, cfg: PrepConfig, texts: Iterator[str], out: str) -> dict[str, Any]:
        pre = self.pretrained
        assert pre is not None
        tok = pre.tokenizer
        if pre.file is None:  # from the hub (a file was copied by `run`)
            _save(tok, out)
        tok.encode_special_tokens = True
        sample = list(islice(texts, ROUND_TRIP_SAMPLE))
        for _ in texts:  # the rest is counted, not checked
            pass
        checked, bad = round_trip_mismatches(tok, sample)
        if bad:
            log.warning(
                "tokenizer %s: %d of %d sampled train documents do not decode back to their "
                "exact text (normalisation or unknown tokens); the shards hold its encoding as "
                "it is", pre.source, bad, checked,
            )
        return {
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "pretrained": pre.source,
            "pretrained_sha256": pre.sha256,
            "eos_token": cfg.tokenizer.eos_token,
            "eos_id": pre.eos_id,
            "round_trip_checked": checked,
            "round_trip_mismatches": bad,
        }


def _tokenizer_task(item: dict[str, Any], stage: TokenizerStage, cfg: PrepConfig, inp: str,
                    out: str) -> dict[str, list]:
    return {"shard": [0], "acct": [json.dumps(stage.train(cfg, inp, out))]}


def _save(tok: Tokenizer, out: str) -> None:
    """tokenizer.json into the stage folder `out`, all or nothing (local or on a store)."""
    final = storage.join(out, "tokenizer.json")
    tmp = storage.scratch(final)
    tok.save(str(tmp))
    storage.commit(tmp, final)
