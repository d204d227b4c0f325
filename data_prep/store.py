"""Stage outputs on disk: documents as a Parquet file (id, text, source, domain, metadata).

Each document stage writes `docs.parquet` in its own folder, which the next stage reads in
record batches, so a re-run can start from any finished stage and memory stays bounded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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


def read_docs(path: str | Path, batch_rows: int = 1024) -> Iterator[Document]:
    pf = pq.ParquetFile(path)
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
    return pq.ParquetFile(path).metadata.num_rows


def read_ids_texts(path: str | Path) -> tuple[list[str], list[str]]:
    """The `id` and `text` columns alone, as lists: what dedup needs to find duplicates, without
    building a Document (and parsing its metadata) per row."""
    table = pq.ParquetFile(path).read(columns=["id", "text"])  # read_table imports pyarrow.dataset
    return table.column("id").to_pylist(), table.column("text").to_pylist()
