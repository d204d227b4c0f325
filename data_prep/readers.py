"""Readers: turn a configured source into a stream of Documents (and BadRecords).

Every record gets a stable id (a relative path, `file:line` or a field of the record) and keeps
its source label, so the train/val split and deduplication survivors do not depend on where the
data happens to live on this machine or on what else is read alongside it.
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from data_prep.config import SourceConfig
from data_prep.document import BadRecord, Document

Record = Document | BadRecord


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _matches(rel: str, include: list[str], exclude: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) for g in include) and not any(
        fnmatch.fnmatchcase(rel, g) for g in exclude
    )


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
                if _matches(rel, cfg.include, cfg.exclude):
                    out.append((rel, p))
    out.sort()
    return out


def read_embedded(cfg: SourceConfig) -> Iterator[Record]:
    """The embedded corpus: text that ships with every Python install.

    Code: the interpreter's standard library sources, one document per *.py file (id
    `stdlib/<relative path>`, domain "code"), skipping `exclude_dirs` (site-packages and the test
    suites by default). Prose: `pydoc_data.topics`, the language reference text behind `help()`,
    one document per topic (id `pydoc/<topic>`, domain "prose"). The include/exclude globs match
    `<relative path>` for code and `pydoc/<topic>` for prose.
    """
    label = cfg.name or "embedded"
    if cfg.code:
        for rel, path in embedded_code_files(cfg):
            yield from read_text_file(
                path, f"stdlib/{rel}", f"{label}:stdlib", "code", {"path": rel}
            )
    if cfg.prose:
        from pydoc_data import topics

        for topic in sorted(topics.topics):
            rel = f"pydoc/{topic}"
            if _matches(rel, cfg.include, cfg.exclude):
                yield Document(
                    rel, topics.topics[topic], f"{label}:pydoc", "prose", {"topic": topic}
                )


def read_text_file(
    path: Path, doc_id: str, source: str, domain: str, metadata: dict | None = None
) -> Iterator[Record]:
    """One file as one document; binary files and invalid UTF-8 become BadRecords."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        yield BadRecord("unreadable_file", doc_id, source, 0, f"{path}: {e}")
        return
    if b"\x00" in raw[:8192]:
        yield BadRecord("binary_file", doc_id, source, len(raw), f"{path}: NUL byte in first 8 KiB")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield BadRecord(
            "invalid_utf8",
            doc_id,
            source,
            len(raw),
            f"{path}: {e}",
            raw[:200].decode("utf-8", "replace"),
        )
        return
    yield Document(doc_id, text, source, domain, dict(metadata or {}))


def read_source(cfg: SourceConfig) -> Iterator[Record]:
    """All records of one configured source, at most `max_documents` of them."""
    readers = {"embedded": read_embedded}
    if cfg.kind not in readers:
        raise ValueError(f"source kind {cfg.kind!r} is not supported yet; valid: {sorted(readers)}")
    n = 0
    for rec in readers[cfg.kind](cfg):
        if cfg.max_documents is not None and n >= cfg.max_documents:
            return
        n += 1
        yield rec
