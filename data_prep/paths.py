"""Input paths: the files a source's `path` names (a file, a folder walked with include/exclude
globs, or a glob pattern), their cache key, and opening one decompressed by its suffix."""

from __future__ import annotations

import bz2
import fnmatch
import glob
import gzip
import lzma
import os
from pathlib import Path
from typing import IO

from data_prep.config import SourceConfig

COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def matches(rel: str, include: list[str], exclude: list[str]) -> bool:
    """`rel` matches one of the `include` globs and none of the `exclude` ones."""
    return any(fnmatch.fnmatchcase(rel, g) for g in include) and not any(
        fnmatch.fnmatchcase(rel, g) for g in exclude
    )


def expand_paths(cfg: SourceConfig, suffixes: tuple[str, ...] | None) -> list[tuple[str, Path]]:
    """(relative name, path) of the files `cfg.path` names: a file, a folder (walked
    recursively, keeping files whose name ends in one of `suffixes` and that match the
    include/exclude globs) or a glob pattern. Sorted, so ids and order are stable."""
    assert cfg.path is not None
    p = Path(cfg.path).expanduser()
    if p.is_file():
        return [(p.name, p)]
    if p.is_dir():
        out = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if d not in cfg.exclude_dirs)
            for f in filenames:
                full = Path(dirpath, f)
                rel = full.relative_to(p).as_posix()
                ok_suffix = suffixes is None or any(
                    f.endswith(s) or any(f.endswith(s + c) for c in COMPRESSED) for s in suffixes
                )
                if ok_suffix and matches(rel, cfg.include, cfg.exclude):
                    out.append((rel, full))
        return sorted(out)
    hits = sorted(glob.glob(str(p), recursive=True))
    if not hits:
        raise FileNotFoundError(f"source path {cfg.path!r} is not a file, folder or matching glob")
    # a broken link (dangling, or a loop) is kept: its reader reports it as unreadable_file
    return [
        (Path(h).name if len(hits) == 1 else h, Path(h))
        for h in hits
        if Path(h).is_file() or _broken_link(Path(h))
    ]


def _broken_link(p: Path) -> bool:
    """A symlink that leads nowhere: dangling, or part of a loop."""
    return p.is_symlink() and not p.exists()


def file_key(rel: str, p: Path) -> tuple[str, int, int] | tuple[str, str]:
    """(name, size, mtime) of a file for the cache key; (name, error) when it cannot be
    stat'ed (a dangling link or a loop, which the reader reports as unreadable_file)."""
    try:
        st = p.stat()
    except OSError as e:
        return (rel, f"{type(e).__name__}: {e.strerror}")
    return (rel, st.st_size, st.st_mtime_ns)


def open_maybe_compressed(path: Path) -> IO[bytes]:
    """A binary stream of the file, decompressed by suffix: .gz, .bz2, .xz or .zst."""
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        import pyarrow as pa

        return pa.CompressedInputStream(pa.OSFile(str(path), "rb"), "zstd")  # type: ignore[return-value]
    return open(path, "rb")
