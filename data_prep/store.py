"""Stage outputs on disk: documents as Parquet (id, text, source, domain, metadata).

Each document stage writes a folder of shards (`docs/part-00000.parquet`, ..., see
data_prep.shardio), which the next stage reads shard by shard in record batches, so a re-run
can start from any finished stage and memory stays bounded. `read_docs` and `num_docs` read a
single file or a shard folder, shards in name order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import storage
from data_prep.document import Document

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.large_string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("metadata", pa.string()),  # JSON object
    ]
)


class DocWriter:
    """Append documents to a Parquet file, `batch_rows` at a time (zstd-compressed)."""

    def __init__(self, path: str | Path, batch_rows: int = 1024) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.batch_rows = batch_rows
        self.rows: dict[str, list[str]] = {f.name: [] for f in SCHEMA}
        self.writer = pq.ParquetWriter(self.path, SCHEMA, compression="zstd")
        self.count = 0

    def write(self, doc: Document) -> None:
        r = self.rows
        r["id"].append(doc.id)
        r["text"].append(doc.text)
        r["source"].append(doc.source)
        r["domain"].append(doc.domain)
        r["metadata"].append(json.dumps(doc.metadata, ensure_ascii=False, default=str))
        self.count += 1
        if len(r["id"]) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows["id"]:
            self.writer.write_table(pa.table(self.rows, schema=SCHEMA))
            self.rows = {f.name: [] for f in SCHEMA}

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def __enter__(self) -> DocWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def doc_files(path: str | Path) -> list[str]:
    """The Parquet files of a stage output (a local path or a URL, data_prep.storage): the
    file itself, or a shard folder's part-*.parquet in name (= document) order."""
    if str(path).endswith(".parquet") or not storage.is_remote(path) and Path(path).is_file():
        return [str(path)]
    return storage.files(path, "part-*.parquet")


def parquet(path: str | Path) -> pq.ParquetFile:
    """A Parquet file of a stage output, local or on an object store."""
    return pq.ParquetFile(path if not storage.is_remote(path) else storage.open(path, "rb"))


def read_docs(path: str | Path, batch_rows: int = 1024) -> Iterator[Document]:
    for f in doc_files(path):
        yield from _read_file(f, batch_rows)


def _read_file(path: str, batch_rows: int) -> Iterator[Document]:
    pf = parquet(path)
    for batch in pf.iter_batches(batch_size=batch_rows):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            yield Document(
                cols["id"][i],
                cols["text"][i],
                cols["source"][i],
                cols["domain"][i],
                json.loads(cols["metadata"][i]),
            )


def num_docs(path: str | Path) -> int:
    return sum(parquet(f).metadata.num_rows for f in doc_files(path))


def read_column(path: str | Path, column: str) -> list:
    """One column of a stage output (a file or a shard folder), as a list."""
    out: list = []
    for f in doc_files(path):
        out += parquet(f).read(columns=[column]).column(column).to_pylist()
    return out
