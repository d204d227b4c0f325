"""An `out_dir` on an object store (`s3://bucket/prefix`, `gs://...`, `hf://...`): the pipeline
runs in a local working copy and commits each finished stage, then the dataset, to the store.

Commit by marker, written last (the store has no rename, so a folder cannot appear at once):
- a stage folder `stages/NN_<name>/` is committed when its `key` object exists. `push_stage`
  first deletes the remote `key` (un-commit), then every other object under the prefix (a partial
  upload, an older run's files), uploads the stage's files (`stats.json` among them) and `key`
  last. `pull_stage` downloads a remote stage only when its `key` is there, so a run killed
  mid-upload leaves a prefix that no run trusts and the next push removes.
- the dataset (tokenizer.json, the token shards, meta.json) is committed when `meta.json` exists:
  `push_dataset` deletes the remote pack key and meta.json, removes objects at the top level
  that the new dataset does not have (stale shards), uploads the shards and tokenizer, then
  meta.json, then the pack stage (key last). Readers of the dataset trust meta.json, which lists
  its shards; a run trusts the remote dataset only when the pack key beside it is its own
  (`pull_dataset`). The reports go up after it.
Every single object is itself all or nothing (data_prep.storage.atomic_write).

The working copy is `work_dir` (default: a folder under the user cache named by the URL's
hash). A re-run on another machine pulls the committed stages, so its cache behaves as on the
machine that wrote them: a stage whose key is unchanged is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from data_prep import storage
from data_prep.config import PrepConfig

log = logging.getLogger("data_prep")
MARKER = "key"  # a stage folder's commit marker (run_stage writes it last, locally too)
DATASET_MARKER = "meta.json"
REPORTS = ("report.json", "report.md")


def work_root(cfg: PrepConfig) -> Path:
    """Where the pipeline writes: out_dir itself when local, else the local working copy."""
    if not storage.is_remote(cfg.out_dir):
        return storage.local_path(cfg.out_dir)
    if cfg.work_dir:
        return storage.local_path(cfg.work_dir)
    from platformdirs import user_cache_dir

    digest = hashlib.sha256(cfg.out_dir.encode()).hexdigest()[:16]
    return Path(user_cache_dir("tokenclock")) / "data_prep" / digest


def _local_files(folder: Path) -> list[Path]:
    """The files of a local folder, recursively, without hidden temporaries."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
    )


class Mirror:
    """The remote side of a working copy: `url` is the out_dir, `root` the local copy."""

    def __init__(self, url: str, root: Path) -> None:
        storage.check_reachable(url)
        self.url, self.root = url.rstrip("/"), root

    def _remote(self, rel: str) -> str:
        return storage.join(self.url, rel)

    def _read_marker(self, url: str) -> str | None:
        return storage.read_bytes(url).decode() if storage.exists(url) else None

    def pull_stage(self, rel: str) -> None:
        """Download the committed remote stage `rel` (`stages/NN_name`) unless the local copy
        holds the same key; an uncommitted remote prefix is left alone."""
        remote, local = self._remote(rel), self.root / rel
        key = self._read_marker(storage.join(remote, MARKER))
        if key is None or (local / MARKER).is_file() and (local / MARKER).read_text() == key:
            return
        log.info("%s: pulling committed stage (key %s) from %s", rel, key, remote)
        tmp = storage.tmp_path(local)
        for url in storage.find(remote):
            name = url[len(remote) + 1:]
            if name != MARKER:
                storage.download(url, tmp / name)
        (tmp / MARKER).write_text(key)  # last: the local copy is complete only with it
        if local.exists():
            shutil.rmtree(local)
        tmp.rename(local)

    def push_stage(self, rel: str) -> None:
        """Commit the local stage `rel` to the store when the store lacks its key."""
        remote, local = self._remote(rel), self.root / rel
        if not (local / MARKER).is_file():  # disabled stage, nothing to commit
            return
        key = (local / MARKER).read_text()
        if self._read_marker(storage.join(remote, MARKER)) == key:
            return
        log.info("%s: committing stage (key %s) to %s", rel, key, remote)
        storage.remove(storage.join(remote, MARKER))  # un-commit first
        storage.remove(remote)  # partial uploads, an older run's objects
        for p in _local_files(local):
            name = p.relative_to(local).as_posix()
            if name not in (MARKER, f"{MARKER}.pending"):
                storage.upload(p, storage.join(remote, name))
        storage.upload(local / MARKER, storage.join(remote, MARKER))

    def pull_dataset(self, pack_rel: str) -> None:
        """Download the committed dataset (the top-level files) when the remote pack stage is
        committed with the local pack key and the local meta.json differs: the pack stage's key
        is only ever committed after the dataset it made (`push_dataset`)."""
        key = self._read_marker(storage.join(self._remote(pack_rel), MARKER))
        local_key = self.root / pack_rel / MARKER
        if key is None or not local_key.is_file() or local_key.read_text() != key:
            return
        marker = self._remote(DATASET_MARKER)
        local_marker = self.root / DATASET_MARKER
        if not storage.exists(marker):  # removed by hand: the run packs again
            return
        meta = storage.read_bytes(marker)
        if local_marker.is_file() and local_marker.read_bytes() == meta:
            return
        log.info("pulling the committed dataset from %s", self.url)
        local_marker.unlink(missing_ok=True)
        for url in self._top_level():
            name = url.rsplit("/", 1)[1]
            if name not in (DATASET_MARKER, *REPORTS):
                storage.download(url, self.root / name)
        storage.download(marker, local_marker)

    def _top_level(self) -> list[str]:
        return [u for u in storage.find(self.url) if "/" not in u[len(self.url) + 1:]]

    def push_dataset(self, pack_rel: str) -> None:
        """Commit the local dataset, then the pack stage that made it. The remote pack key goes
        first and meta.json next (un-commit), stale top-level objects are removed, the shards
        and tokenizer uploaded, then meta.json, then the pack stage with its key."""
        local_marker = self.root / DATASET_MARKER
        marker = self._remote(DATASET_MARKER)
        pack_key = storage.join(self._remote(pack_rel), MARKER)
        same_key = self._read_marker(pack_key) == (self.root / pack_rel / MARKER).read_text()
        same_meta = storage.exists(marker) and storage.read_bytes(marker) == local_marker.read_bytes()
        if same_key and same_meta:
            return
        log.info("committing the dataset to %s", self.url)
        storage.remove(pack_key)
        storage.remove(marker)
        files = sorted(p for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))
        keep = {p.name for p in files}
        for url in self._top_level():
            if url.rsplit("/", 1)[1] not in keep:
                storage.remove(url)
        for p in files:
            if p.name not in (DATASET_MARKER, *REPORTS):
                storage.upload(p, self._remote(p.name))
        storage.upload(local_marker, marker)
        self.push_stage(pack_rel)

    def push_reports(self) -> None:
        for name in REPORTS:
            if (self.root / name).is_file():
                storage.upload(self.root / name, self._remote(name))
