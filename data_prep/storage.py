"""Where data_prep's files live: a local path or an fsspec URL (`s3://`, `gs://`, `hf://`,
`file://`, ...), behind a few verbs: open, list, exists, remove and an all-or-nothing write.

Commit semantics (docs/scaling.md, "Object stores"):
- a local path (or `file://`): written under a hidden temporary name beside the target and
  renamed into place (`os.replace`), so a reader sees the old file or the whole new one;
- an object store has no rename, but one object is already all or nothing: a PUT, or a multipart
  upload, becomes visible only when it completes. `atomic_write` completes it only when the block
  ends without an error, and discards (aborts) the upload otherwise. A *set* of objects (a stage
  folder, the dataset) is committed by a marker written last, which readers trust and nothing
  else: data_prep.stage.run_stage writes it after every task of the stage has finished.

The package behind a protocol (s3fs, gcsfs, huggingface_hub, ...) is imported by fsspec when the
first URL of that protocol is used; a missing one is a one-line error naming it.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec

# the package fsspec needs for a protocol, for the one-line error when it is missing
PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
    "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
}
BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # URL's first part is a bucket


def protocol(url: str | Path) -> str:
    """`s3` for `s3://b/k`; `file` for a plain path or a `file://` URL."""
    s = str(url)
    return s.split("://", 1)[0].lower() if "://" in s else "file"


def is_remote(url: str | Path) -> bool:
    """True for a URL that is not on this machine's filesystem (anything but file://)."""
    return protocol(url) not in ("file", "local")


def local_path(url: str | Path) -> Path:
    """A local path or `file://` URL as a Path (`~` expanded)."""
    s = str(url)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s).expanduser()


def join(url: str | Path, *parts: str) -> str:
    """`url/part/...` for a URL or a path."""
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str | Path) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`; a one-line error for an unknown protocol
    or one whose package is not installed."""
    proto = protocol(url)
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as e:
        pkg = PACKAGES.get(proto, "the fsspec implementation for it")
        raise ValueError(
            f"{url}: the {proto}:// protocol needs {pkg}, which is not installed (pip install "
            f"{pkg})"
        ) from e
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise ValueError(f"{url}: unknown protocol {proto!r} ({e})") from e
        raise


def check_reachable(url: str | Path) -> None:
    """Raise FileNotFoundError in one line when the bucket `url` names does not exist or
    cannot be listed (wrong endpoint, no credentials)."""
    proto = protocol(url)
    if proto not in BUCKETED:
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        ok = fs.exists(bucket)
    except Exception as e:  # credentials, endpoint: whatever the client raises, in one line
        raise FileNotFoundError(
            f"{url}: bucket {bucket!r} is not reachable: {type(e).__name__}: {e}"
        ) from e
    if not ok:
        raise FileNotFoundError(f"{url}: bucket {bucket!r} does not exist ({proto}://{bucket})")


def _fresh(url: str | Path) -> tuple[Any, str]:
    """filesystem(url) with its listing cache dropped: another process may have written."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return fs, path


def open(url: str | Path, mode: str = "rb", **kw: Any) -> IO[Any]:  # noqa: A001 - storage.open
    """A file object of `url` (local paths through the builtin open)."""
    if not is_remote(url):
        return local_path(url).open(mode, **kw)
    fs, path = filesystem(url)
    return fs.open(path, mode, **kw)


def read_bytes(url: str | Path) -> bytes:
    with open(url, "rb") as f:
        return f.read()


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return local_path(url).exists()
    fs, path = _fresh(url)
    return fs.exists(path)


def isdir(url: str | Path) -> bool:
    if not is_remote(url):
        return local_path(url).is_dir()
    fs, path = _fresh(url)
    return fs.isdir(path)


def isfile(url: str | Path) -> bool:
    if not is_remote(url):
        return local_path(url).is_file()
    fs, path = _fresh(url)
    return fs.isfile(path)


def find(url: str | Path) -> list[str]:
    """Every file under the folder `url`, recursively, as URLs, sorted."""
    fs, path = _fresh(url)
    return sorted(fs.unstrip_protocol(p) for p in fs.find(path))


def glob(pattern: str | Path) -> list[str]:
    """The files matching the glob `pattern` (`**` recursive), as URLs, sorted."""
    fs, path = _fresh(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(path) if fs.isfile(p))


def version(url: str | Path) -> tuple[int, str]:
    """(size, version) of a file for a cache key: the object's ETag (a content hash for a
    single-part upload) or else its modification time."""
    fs, path = _fresh(url)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
    if tag is None:
        tag = info.get("LastModified", info.get("updated", ""))
    return int(info.get("size") or 0), str(tag).strip('"')


def remove(url: str | Path) -> None:
    """Remove the file or folder `url` (recursively); nothing when it is not there."""
    if not is_remote(url):
        p = local_path(url)
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = _fresh(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def tmp_path(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this writer."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def scratch(final: str | Path) -> Path:
    """A local file to write `final` into before `commit`: beside it for a local target (so
    the commit is a rename), in this process's own temporary folder (`TMPDIR`, on the node
    the task runs on) for an object: nothing is written to a disk another node would need."""
    if not is_remote(final):
        p = local_path(final)
        p.parent.mkdir(parents=True, exist_ok=True)
        return tmp_path(p)
    name = str(final).rsplit("/", 1)[-1]
    return Path(tempfile.gettempdir()) / f".tokenclock-{uuid.uuid4().hex[:12]}-{name}"


def commit(tmp: str | Path, final: str | Path) -> None:
    """Move a finished temporary file into place: a rename locally; a local file to an object
    store is uploaded (one all-or-nothing PUT) and removed; an object to an object (a store has
    no rename) is a server-side copy and delete, where the copy is the all-or-nothing step."""
    if not is_remote(final):
        dst = local_path(final)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path(tmp), dst)
        return
    if not is_remote(tmp):
        try:
            upload(local_path(tmp), str(final))
        finally:
            local_path(tmp).unlink(missing_ok=True)
        return
    fs, path = filesystem(final)
    fs.mv(filesystem(tmp)[1], path)


def mkdirs(url: str | Path) -> None:
    """The folder `url` made locally; nothing on an object store (a prefix needs no folder)."""
    if not is_remote(url):
        local_path(url).mkdir(parents=True, exist_ok=True)


def files(url: str | Path, pattern: str = "*") -> list[str]:
    """The files directly in the folder `url` whose name matches `pattern`, sorted by name, as
    paths (local) or URLs; [] when there is no such folder."""
    if not is_remote(url):
        p = local_path(url)
        return [str(f) for f in sorted(p.glob(pattern)) if f.is_file()] if p.is_dir() else []
    fs, path = _fresh(join(url, pattern))
    hits = fs.glob(path, detail=True)  # one listing, no request per object
    return sorted(fs.unstrip_protocol(k) for k, v in hits.items() if v.get("type") == "file")


def read_text(url: str | Path) -> str:
    return read_bytes(url).decode("utf-8")


@contextmanager
def atomic_write(url: str | Path, mode: str = "wb", **kw: Any) -> Iterator[IO[Any]]:
    """Write `url` all or nothing: locally a temporary file renamed into place at the end;
    on an object store the upload is completed at the end and aborted on an error, so a
    failed or killed writer leaves no object (and the old one, if any, in place)."""
    if not is_remote(url):
        final = local_path(url)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(final)
        try:
            with tmp.open(mode) as f:
                yield f
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(url)
    f = fs.open(path, mode, **kw)  # kw: e.g. block_size, the part size of a multipart upload
    try:
        yield f
    except BaseException:
        _discard(f)
        raise
    f.close()


def _discard(f: Any) -> None:
    """Abort an unfinished upload: fsspec's buffered files complete it on close(), so an
    error must never reach close; `discard` drops the buffer and aborts a multipart upload."""
    discard = getattr(f, "discard", None)
    if discard is not None:
        discard()
    f.closed = True  # AbstractBufferedFile: close() (and __del__) then do nothing


def write_text(url: str | Path, text: str) -> None:
    """atomic_write of a UTF-8 text."""
    with atomic_write(url, "wb") as f:
        f.write(text.encode("utf-8"))


def upload(local: Path, url: str) -> None:
    """Copy the local file `local` to `url`, all or nothing (one object)."""
    with local.open("rb") as src, atomic_write(url, "wb") as dst:
        while chunk := src.read(16 << 20):
            dst.write(chunk)


def download(url: str, local: Path) -> None:
    """Copy `url` to the local file `local`, all or nothing (a rename at the end)."""
    with open(url, "rb") as src, atomic_write(local, "wb") as dst:
        while chunk := src.read(16 << 20):
            dst.write(chunk)
