"""A prepared dataset directory: written by `python -m data_prep`, read by training (format 1).

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
    `meta.dtype`, which is "uint16" when vocab_size <= 65536 and "uint32" otherwise;
  * every document's tokens are followed by one end-of-document token `meta.eos_id` (the id of
    `meta.eos_token`: 0 for the BPE trained by prep, whose eos is its first token; a pretrained
    tokenizer's own id otherwise), so a split is a concatenation of `doc_0 eos doc_1 eos ...`
    and shards are consecutive pieces of that stream: documents may cross a shard boundary;
  * every shard holds `shards.shard_tokens` tokens except the last shard of a split;
  * a split with no documents has an empty shard list and 0 tokens.
  Read one with `np.memmap(path, dtype=np.dtype(meta.dtype).newbyteorder("<"), mode="r")`.

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

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = 1
META = "meta.json"
DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")


@dataclass
class DatasetMeta:
    """meta.json of a prepared dataset; `root` is the directory it describes."""

    root: Path
    dtype: str
    vocab_size: int
    eos_id: int
    eos_token: str
    tokenizer: str
    tokenizer_sha256: str | None
    splits: dict[str, dict]
    config: dict = field(default_factory=dict)
    created_utc: str = ""

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer

    def shard_paths(self, split: str) -> list[Path]:
        """The shard files of `split`, in stream order."""
        if split not in self.splits:
            raise ValueError(f"split {split!r} not in {self.root / META}; has {list(self.splits)}")
        return [self.root / name for name in self.splits[split]["shards"]]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "dtype": self.dtype, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "eos_token": self.eos_token, "tokenizer": self.tokenizer,
                "tokenizer_sha256": self.tokenizer_sha256, "splits": self.splits,
                "config": self.config, "created_utc": self.created_utc}


def parse_dataset_meta(data: dict, root: Path, where: str) -> DatasetMeta:
    """A DatasetMeta from meta.json's parsed object; `where` names the file in errors."""
    if data.get("format") != FORMAT:
        raise ValueError(f"{where}: format {data.get('format')!r} is not supported (expected {FORMAT})")
    if data.get("dtype") not in DTYPES:
        raise ValueError(f"{where}: dtype {data.get('dtype')!r}; valid: {', '.join(DTYPES)}")
    missing = [k for k in ("vocab_size", "splits") if k not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    return DatasetMeta(
        root=root, dtype=data["dtype"], vocab_size=int(data["vocab_size"]),
        eos_id=int(data.get("eos_id", 0)), eos_token=str(data.get("eos_token", "<|endoftext|>")),
        tokenizer=str(data.get("tokenizer", "tokenizer.json")),
        tokenizer_sha256=data.get("tokenizer_sha256"), splits=data["splits"],
        config=data.get("config", {}), created_utc=data.get("created_utc", ""),
    )


def read_dataset_meta(data_dir: str | Path) -> DatasetMeta:
    """The meta.json of a prepared dataset directory, checked for the format we understand."""
    root = Path(data_dir)
    path = root / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: prepare a dataset first (python -m data_prep configs/prep/demo.yaml)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return parse_dataset_meta(data, root, str(path))


def write_dataset_meta(meta: DatasetMeta) -> Path:
    """Write meta.json into `meta.root`, stamping the creation time when it has none."""
    if not meta.created_utc:
        meta.created_utc = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = meta.root / META
    path.write_text(json.dumps(meta.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
