"""Input paths: the files a source's `path` names (a file, a folder walked with include/exclude
globs, or a glob pattern), their cache key, and opening one decompressed by its suffix.

A path is local (or `file://`) or an object-store URL (`s3://`, `gs://`, `hf://`, ...) read
through fsspec (data_prep.storage); a remote file is named by its URL, a local one by a Path.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob
import gzip
import lzma
import os
from pathlib import Path
from typing import IO

from data_prep import storage
from data_prep.config import SourceConfig

COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def matches(rel: str, include: list[str], exclude: list[str]) -> bool:
    """`rel` matches one of the `include` globs and none of the `exclude` ones."""
    return any(fnmatch.fnmatchcase(rel, g) for g in include) and not any(
        fnmatch.fnmatchcase(rel, g) for g in exclude
    )


def _keep(rel: str, cfg: SourceConfig, suffixes: tuple[str, ...] | None) -> bool:
    """A file `rel` of a walked folder is read: its suffix (maybe compressed) and globs match."""
    f = rel.rsplit("/", 1)[-1]
    ok_suffix = suffixes is None or any(
        f.endswith(s) or any(f.endswith(s + c) for c in COMPRESSED) for s in suffixes
    )
    return ok_suffix and matches(rel, cfg.include, cfg.exclude)


def expand_paths(
    cfg: SourceConfig, suffixes: tuple[str, ...] | None
) -> list[tuple[str, Path | str]]:
    """(relative name, path) of the files `cfg.path` names: a file, a folder (walked
    recursively, keeping files whose name ends in one of `suffixes` and that match the
    include/exclude globs) or a glob pattern. Sorted, so ids and order are stable. The same
    relative names whether the folder is local or on an object store."""
    assert cfg.path is not None
    if storage.is_remote(cfg.path):
        return _expand_remote(cfg, suffixes)
    p = storage.local_path(cfg.path)
    if p.is_file():
        return [(p.name, p)]
    if p.is_dir():
        out: list[tuple[str, Path | str]] = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if d not in cfg.exclude_dirs)
            for f in filenames:
                full = Path(dirpath, f)
                rel = full.relative_to(p).as_posix()
                if _keep(rel, cfg, suffixes):
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


def _expand_remote(
    cfg: SourceConfig, suffixes: tuple[str, ...] | None
) -> list[tuple[str, Path | str]]:
    """expand_paths for an object-store URL: an object, a prefix (a "folder") or a glob."""
    url = str(cfg.path).rstrip("/")
    storage.check_reachable(url)
    if storage.isfile(url):
        return [(url.rsplit("/", 1)[-1], url)]
    if storage.isdir(url):
        out: list[tuple[str, Path | str]] = []
        for f in storage.find(url):
            rel = f[len(url) + 1:] if f.startswith(url + "/") else f.rsplit("/", 1)[-1]
            if not set(rel.split("/")[:-1]) & set(cfg.exclude_dirs) and _keep(rel, cfg, suffixes):
                out.append((rel, f))
        return sorted(out)
    hits = storage.glob(url)
    if not hits:
        raise FileNotFoundError(f"source path {cfg.path!r} is not an object, prefix or matching glob")
    return [(h.rsplit("/", 1)[-1] if len(hits) == 1 else h, h) for h in hits]


def _broken_link(p: Path) -> bool:
    """A symlink that leads nowhere: dangling, or part of a loop."""
    return p.is_symlink() and not p.exists()


def file_key(rel: str, p: Path | str) -> tuple[str, int, int | str] | tuple[str, str]:
    """(name, size, mtime) of a file for the cache key; (name, size, ETag) of an object;
    (name, error) when it cannot be stat'ed (a dangling link or a loop, which the reader reports
    as unreadable_file)."""
    if isinstance(p, str):
        try:
            return (rel, *storage.version(p))
        except OSError as e:
            return (rel, f"{type(e).__name__}: {e}")
    try:
        st = p.stat()
    except OSError as e:
        return (rel, f"{type(e).__name__}: {e.strerror}")
    return (rel, st.st_size, st.st_mtime_ns)


def open_maybe_compressed(path: Path | str) -> IO[bytes]:
    """A binary stream of the file (or object), decompressed by suffix: .gz, .bz2, .xz or .zst."""
    if isinstance(path, str):
        return _open_remote(path)
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


def _open_remote(url: str) -> IO[bytes]:
    """open_maybe_compressed for an object URL: fsspec decompresses .gz, .bz2, .xz; .zst
    goes through pyarrow's codec, as for a local file."""
    if url.endswith(".zst"):
        import pyarrow as pa

        raw = storage.open(url, "rb")
        return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")  # type: ignore[return-value]
    comp = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}.get(url[url.rfind("."):])
    fs, path = storage.filesystem(url)
    return fs.open(path, "rb", compression=comp)


def input_path(name: str) -> Path | str:
    """A file of expand_paths sent as text (to a task, in JSON) back as the readers take it:
    a Path for a local file, the URL itself for an object."""
    return name if storage.is_remote(name) else Path(name)


def read_bytes(path: Path | str) -> bytes:
    """The bytes of a local file or an object."""
    return storage.read_bytes(path) if isinstance(path, str) else path.read_bytes()


def parquet_source(path: Path | str) -> Path | IO[bytes]:
    """What pyarrow's ParquetFile opens: a local path, or a file object for an object URL."""
    return storage.open(path, "rb") if isinstance(path, str) else path
