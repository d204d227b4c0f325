"""Byte-level BPE tokenizer training and batched encoding with HF `tokenizers`.

Byte-level (GPT-2 style) BPE starts from the 256 byte values, so any text round-trips exactly:
`decode(encode(text)) == text`, unicode included. `<|endoftext|>` is the first special token,
hence id 0, and marks the end of every document in the shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.config import TokenizerConfig


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train BPE on `texts` (stopping after `train_max_bytes` if that is > 0)."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def limited() -> Iterator[str]:
        seen = 0
        for t in texts:
            yield t
            seen += len(t)
            if cfg.train_max_bytes and seen >= cfg.train_max_bytes:
                return

    tok.train_from_iterator(limited(), trainer=trainer)
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
