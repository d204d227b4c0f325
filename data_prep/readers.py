"""Readers: turn a configured source into a stream of Documents and BadRecords.

Every record gets a stable id (a relative path, `file:line`, `file:row` or a field of the
record) and keeps its source label, so the train/val split and the choice of deduplication
survivors do not depend on where the data lives on this machine or on what is read with it.

Bad input never raises: a reader yields a BadRecord with its own reason (invalid_utf8,
malformed_json, missing_text_field, bad_text_field, binary_file, unreadable_file, empty for a
blank jsonl line, line_too_large for a raw jsonl line over read.max_line_bytes)
and the file and line it came from, and the read stage counts it.
"""

from __future__ import annotations

import json
import lzma
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.config import SourceConfig
from data_prep.document import BadRecord, Document
from data_prep.paths import (
    expand_paths,
    file_key,
    matches,
    open_maybe_compressed,
    parquet_source,
    read_bytes,
)

Record = Document | BadRecord
Files = list[tuple[str, Path]]  # (relative name, path) of the files a reader reads
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _snippet(raw: bytes, n: int = 200) -> str:
    return raw[:n].decode("utf-8", "replace")


def _a(value: Any) -> str:
    """What a decoded JSON (or parquet/hub) value is, for a message: "null", "a number", ..."""
    if value is None:
        return "null"
    for types, name in (
        (bool, "a boolean"),
        ((int, float), "a number"),
        (str, "a string"),
        ((list, tuple), "an array"),
        (dict, "an object"),
        (bytes, "bytes"),
    ):
        if isinstance(value, types):
            return name
    return f"a {type(value).__name__}"


def _os_error(path: Path, e: OSError) -> str:
    """`path: reason` for an OSError, naming the path once (str(e) repeats it)."""
    return f"{path}: {e.strerror}" if e.strerror else f"{path}: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------- files and folders
def fingerprint(cfg: SourceConfig) -> list[Any]:
    """What identifies this source's input for stage caching: file names, sizes, mtimes."""
    if cfg.kind == "embedded":
        files = embedded_code_files(cfg) if cfg.code else []
        import sys

        return [sys.version, [file_key(rel, p) for rel, p in files]]
    if cfg.kind == "hub":
        return [cfg.hub_name, cfg.hub_config, cfg.hub_split]
    return [file_key(rel, p) for rel, p in expand_paths(cfg, _suffixes(cfg))]


def _suffixes(cfg: SourceConfig) -> tuple[str, ...] | None:
    return {"jsonl": JSONL_SUFFIXES, "parquet": (".parquet",), "text": None}.get(cfg.kind)


# --------------------------------------------------------------------------- records
def record_to_doc(
    rec: Any, default_id: str, source: str, cfg: SourceConfig, raw_len: int, where: str
) -> Record:
    """A JSON/parquet/hub record (a dict) as a Document, or a BadRecord saying what is wrong."""
    if not isinstance(rec, dict):
        return BadRecord(
            "malformed_json",
            default_id,
            source,
            raw_len,
            f"{where}: the record is {_a(rec)}, not a JSON object",
            str(rec)[:200],
        )
    if cfg.text_field not in rec or rec[cfg.text_field] is None:
        problem = (
            f"{cfg.text_field!r} is null"
            if cfg.text_field in rec
            else f"no {cfg.text_field!r} field (fields: {sorted(rec)[:10]})"
        )
        return BadRecord(
            "missing_text_field",
            default_id,
            source,
            raw_len,
            f"{where}: {problem}",
            json.dumps(rec, default=str)[:200],
        )
    text = rec[cfg.text_field]
    if not isinstance(text, str):
        return BadRecord(
            "bad_text_field",
            default_id,
            source,
            raw_len,
            f"{where}: {cfg.text_field!r} is {_a(text)}, not a string",
            str(text)[:200],
        )
    doc_id = default_id
    if cfg.id_field and rec.get(cfg.id_field) is not None:
        doc_id = f"{source}:{rec[cfg.id_field]}"
    domain = cfg.domain
    if cfg.domain_field and rec.get(cfg.domain_field) in ("prose", "code"):
        domain = rec[cfg.domain_field]
    meta = {"where": where}
    return Document(doc_id, text, source, domain, meta)


def read_jsonl(cfg: SourceConfig, max_line_bytes: int = 0,
               files: Files | None = None) -> Iterator[Record]:
    """JSON lines, plain or compressed (.gz, .bz2, .xz, .zst); one document per line.

    Every physical line is a record: a line that is not valid UTF-8 or not valid JSON is a
    BadRecord naming file and line, a blank line an `empty` one (so lines in = records in); a
    truncated compressed file ends with an `unreadable_file` record.
    """
    label = cfg.name or "jsonl"
    for rel, path in files if files is not None else expand_paths(cfg, JSONL_SUFFIXES):
        source = f"{label}:{rel}"
        try:
            f = open_maybe_compressed(path)
        except OSError as e:
            yield BadRecord("unreadable_file", source, source, 0, _os_error(path, e))
            continue
        lineno = 0
        with f:
            try:
                for lineno, raw in enumerate(f, 1):
                    where = f"{rel}:{lineno}"
                    doc_id = f"{source}:{lineno}"
                    if not raw.strip():  # still a physical record: counted, not skipped
                        yield BadRecord("empty", doc_id, source, len(raw), f"{where}: blank line")
                        continue
                    if max_line_bytes and len(raw) > max_line_bytes:  # not even decoded
                        yield BadRecord(
                            "line_too_large",
                            doc_id,
                            source,
                            len(raw),
                            f"{where}: line of {len(raw)} bytes > read.max_line_bytes="
                            f"{max_line_bytes}",
                            _snippet(raw),
                        )
                        continue
                    try:
                        # without its line end, which json would call a control character
                        # inside an unterminated string
                        line = raw.rstrip(b"\r\n").decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield BadRecord(
                            "invalid_utf8", doc_id, source, len(raw), f"{where}: {e}", _snippet(raw)
                        )
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        # some of json's messages end in "at" ("Invalid control character at")
                        msg = e.msg.removesuffix(" at")
                        yield BadRecord(
                            "malformed_json",
                            doc_id,
                            source,
                            len(raw),
                            f"{where}: {msg} at column {e.colno}",
                            line[:200],
                        )
                        continue
                    yield record_to_doc(rec, doc_id, source, cfg, len(raw), where)
            except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
                yield BadRecord(
                    "unreadable_file",
                    f"{source}:{lineno + 1}",
                    source,
                    0,
                    f"{rel}: stopped after line {lineno}: {type(e).__name__}: {e}",
                )


def read_parquet(cfg: SourceConfig, files: Files | None = None) -> Iterator[Record]:
    """Parquet files; one document per row, read in record batches."""
    import pyarrow.parquet as pq

    label = cfg.name or "parquet"
    for rel, path in files if files is not None else expand_paths(cfg, (".parquet",)):
        source = f"{label}:{rel}"
        try:
            pf = pq.ParquetFile(parquet_source(path))
        except Exception as e:  # any corrupt file is a bad record, not a crash
            yield BadRecord(
                "unreadable_file", source, source, 0, f"{path}: {type(e).__name__}: {e}"
            )
            continue
        names = set(pf.schema_arrow.names)
        cols = [c for c in (cfg.text_field, cfg.id_field, cfg.domain_field) if c and c in names]
        if cfg.text_field not in names:  # read every column, so the message lists them all
            cols = []
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=cols or None):
                for rec in batch.to_pylist():
                    where = f"{rel}:row {row}"
                    text = rec.get(cfg.text_field)
                    size = (
                        len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0
                    )
                    yield record_to_doc(rec, f"{source}:{row}", source, cfg, size, where)
                    row += 1
        except Exception as e:
            yield BadRecord(
                "unreadable_file",
                f"{source}:{row}",
                source,
                0,
                f"{rel}: stopped at row {row}: {type(e).__name__}: {e}",
            )


def read_text(cfg: SourceConfig, files: Files | None = None) -> Iterator[Record]:
    """Plain-text files: a document per file (`per: file`) or per non-empty line (`per: line`)."""
    label = cfg.name or "text"
    for rel, path in files if files is not None else expand_paths(cfg, None):
        source = f"{label}:{rel}"
        if cfg.per == "file":
            yield from read_text_file(path, source, source, cfg.domain, {"path": rel})
            continue
        try:
            raw_all = read_bytes(path)
        except OSError as e:
            yield BadRecord("unreadable_file", source, source, 0, _os_error(path, e))
            continue
        if b"\x00" in raw_all[:8192]:
            yield BadRecord(
                "binary_file", source, source, len(raw_all), f"{rel}: NUL byte in first 8 KiB"
            )
            continue
        for lineno, raw in enumerate(raw_all.split(b"\n"), 1):
            if not raw.strip():
                continue
            doc_id = f"{source}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(
                    "invalid_utf8", doc_id, source, len(raw), f"{rel}:{lineno}: {e}", _snippet(raw)
                )
                continue
            yield Document(doc_id, text, source, cfg.domain, {"where": f"{rel}:{lineno}"})


def read_text_file(
    path: Path | str, doc_id: str, source: str, domain: str, metadata: dict | None = None
) -> Iterator[Record]:
    """One file as one document; binary files and invalid UTF-8 become BadRecords."""
    try:
        raw = read_bytes(path)
    except OSError as e:
        yield BadRecord("unreadable_file", doc_id, source, 0, _os_error(path, e))
        return
    if b"\x00" in raw[:8192]:
        yield BadRecord("binary_file", doc_id, source, len(raw), f"{path}: NUL byte in first 8 KiB")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield BadRecord("invalid_utf8", doc_id, source, len(raw), f"{path}: {e}", _snippet(raw))
        return
    yield Document(doc_id, text, source, domain, dict(metadata or {}))


# --------------------------------------------------------------------------- embedded corpus
def embedded_code_files(cfg: SourceConfig) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of the stdlib *.py files the source selects, sorted."""
    root = stdlib_dir()
    skip = set(cfg.exclude_dirs)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune: never walk site-packages
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath, f)
                rel = p.relative_to(root).as_posix()
                if matches(rel, cfg.include, cfg.exclude):
                    out.append((rel, p))
    out.sort()
    return out


def read_embedded(cfg: SourceConfig, files: Files | None = None,
                  prose: bool | None = None) -> Iterator[Record]:
    """The embedded corpus: text that ships with every Python install.

    Code: the interpreter's standard library sources, one document per *.py file (id
    `stdlib/<relative path>`, domain "code"), skipping `exclude_dirs` (site-packages and the test
    suites by default). Prose: `pydoc_data.topics`, the language reference text behind `help()`,
    one document per topic (id `pydoc/<topic>`, domain "prose"). The include/exclude globs match
    `<relative path>` for code and `pydoc/<topic>` for prose. `files` and `prose`: read only
    these code files, and the prose or not (a read task's part of the source).
    """
    label = cfg.name or "embedded"
    if files is not None or cfg.code:
        for rel, path in files if files is not None else embedded_code_files(cfg):
            yield from read_text_file(
                path, f"stdlib/{rel}", f"{label}:stdlib", "code", {"path": rel}
            )
    if (cfg.prose if prose is None else prose):
        from pydoc_data import topics

        for topic in sorted(topics.topics):
            rel = f"pydoc/{topic}"
            if matches(rel, cfg.include, cfg.exclude):
                yield Document(
                    rel, topics.topics[topic], f"{label}:pydoc", "prose", {"topic": topic}
                )


# --------------------------------------------------------------------------- hub
def read_hub(cfg: SourceConfig) -> Iterator[Record]:
    """A HuggingFace `datasets` hub dataset, streamed by default (nothing is downloaded up
    front); one document per record, text from `text_field`."""
    from datasets import load_dataset

    assert cfg.hub_name is not None
    try:
        ds = load_dataset(
            cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=cfg.streaming
        )
    except Exception as e:
        raise RuntimeError(
            f"could not load hub dataset {cfg.hub_name!r} (config {cfg.hub_config!r}, split "
            f"{cfg.hub_split!r}): {type(e).__name__}: {e}. Is the hub reachable from here? "
            "For local data use kind: jsonl, parquet or text."
        ) from e
    label = cfg.name or f"hub:{cfg.hub_name}"
    for i, rec in enumerate(ds):
        text = rec.get(cfg.text_field) if isinstance(rec, dict) else None
        size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0
        yield record_to_doc(rec, f"{label}:{i}", label, cfg, size, f"{cfg.hub_name}[{i}]")


def expected_records(cfg: SourceConfig) -> int | None:
    """How many records `read_source` will yield, when that is known without reading them (for
    a progress bar's total, hence its ETA): the embedded corpus's files and topics, the rows in
    Parquet footers, one per file for `text` with `per: file`; at most `max_documents`. None
    when unknown (jsonl lines, text lines, a hub stream without `max_documents`)."""
    n: int | None = None
    try:
        if cfg.kind == "embedded":
            n = len(embedded_code_files(cfg)) if cfg.code else 0
            if cfg.prose:
                from pydoc_data import topics

                n += sum(matches(f"pydoc/{t}", cfg.include, cfg.exclude) for t in topics.topics)
        elif cfg.kind == "parquet":
            import pyarrow.parquet as pq

            files = expand_paths(cfg, (".parquet",))
            n = sum(pq.ParquetFile(parquet_source(p)).metadata.num_rows for _, p in files)
        elif cfg.kind == "text" and cfg.per == "file":
            n = len(expand_paths(cfg, None))
    except Exception:  # an unreadable file: its reader reports it; the bar just has no total
        n = None
    if cfg.max_documents is not None:
        n = cfg.max_documents if n is None else min(n, cfg.max_documents)
    return n


READERS = {
    "embedded": read_embedded,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "text": read_text,
    "hub": read_hub,
}


def read_source(cfg: SourceConfig, max_line_bytes: int = 0) -> Iterator[Record]:
    """All records of one configured source, at most `max_documents` of them.

    `max_line_bytes` lets the jsonl reader reject an absurd line before decoding it (as
    `line_too_large`); the document size limit applies later, to the decoded text.
    """
    if cfg.kind not in READERS:
        raise ValueError(f"source kind {cfg.kind!r}; valid: {sorted(READERS)}")
    if cfg.kind == "jsonl":
        it = READERS[cfg.kind](cfg, max_line_bytes)
    else:
        it = READERS[cfg.kind](cfg)
    n = 0
    for rec in it:
        if cfg.max_documents is not None and n >= cfg.max_documents:
            return
        n += 1
        yield rec
