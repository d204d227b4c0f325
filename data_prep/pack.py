"""The pack stage: the clean corpus encoded and written as token shards, and meta.json, into OUT.

The directory it writes is the dataset format of `contracts.dataset`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tqdm import tqdm

from contracts.checkpoint import sha256_file
from contracts.dataset import SPLITS, DatasetMeta, write_dataset_meta
from data_prep.config import PrepConfig, to_dict
from data_prep.document import Document
from data_prep.shards import dtype_for_vocab, dtype_name, order_key, split_of, write_shards
from data_prep.stage import STEP_MODULES, Stage, StageResult, new_stats
from data_prep.store import read_docs
from data_prep.tokenizer import encode_documents


class Pack(Stage):
    """Encodes every document with the tokenizer in `tok_dir` (copied into OUT), splits them
    into train and val by id, writes each split's shards and then meta.json."""

    name = "pack"
    modules = ("pack.py", "shards.py", "tokenizer.py", *STEP_MODULES)

    def __init__(self, tok_dir: Path) -> None:
        self.tok_dir = tok_dir

    def part(self, cfg: PrepConfig) -> Any:
        return [to_dict(cfg)["shards"], to_dict(cfg)["tokenizer"], str(cfg.out_dir)]

    def run(self, cfg: PrepConfig, inp: Path | None, out: Path, res: StageResult) -> None:
        assert inp is not None
        sh = cfg.shards
        from data_prep.mirror import work_root  # out_dir, or its working copy for a store

        root = work_root(cfg)
        total = new_stats(cfg, res.name)
        shutil.copyfile(self.tok_dir / "tokenizer.json", root / "tokenizer.json")
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is plain text
        tok.no_truncation()  # a pretrained tokenizer.json may ship with truncation or padding on
        tok.no_padding()
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos_id = tok.token_to_id(cfg.tokenizer.eos_token)
        if eos_id is None:
            raise RuntimeError(
                f"{root / 'tokenizer.json'} has no {cfg.tokenizer.eos_token!r} token"
            )
        docs = list(read_docs(inp))
        if sh.shuffle:
            docs.sort(key=lambda d: order_key(d.id, sh.split_seed))
        by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for d in docs:
            total.count_in(d.nbytes)
            total.keep(d.nbytes)
            by_split[split_of(d.id, sh.val_fraction, sh.split_seed)].append(d)
        splits = {}
        for split in SPLITS:
            texts = (d.text for d in by_split[split])
            arrays = encode_documents(tok, texts, eos_id, batch_size=cfg.tokenizer.batch_size)
            bar = tqdm(
                arrays, total=len(by_split[split]), desc=f"pack {split}", disable=not cfg.progress
            )
            splits[split] = write_shards(root, split, bar, vocab_size, sh.shard_tokens)
            total.bump(f"{split}_documents", splits[split]["documents"])
            total.bump(f"{split}_tokens", splits[split]["tokens"])
        write_dataset_meta(
            DatasetMeta(
                root=root,
                dtype=dtype_name(dtype_for_vocab(vocab_size)),
                vocab_size=vocab_size,
                eos_id=eos_id,
                eos_token=cfg.tokenizer.eos_token,
                tokenizer="tokenizer.json",
                tokenizer_sha256=sha256_file(root / "tokenizer.json"),
                splits=splits,
                config=to_dict(cfg),
            )
        )
        res.total = total
        res.extra = {"splits": splits, "vocab_size": vocab_size, "eos_id": eos_id}
