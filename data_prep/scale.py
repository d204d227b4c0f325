"""The scale bench behind `python -m data_prep.bench --executor local|ray --docs N[,N...]`.

After an untimed warm-up run of 200 documents (which starts the worker processes), for each
N it writes a generated corpus of N documents (`synthetic_corpus`), runs the document stages
(read .. pii; tokenizer and pack run on the driver under both executors and are left out) on
it with the chosen executor, and reports docs/s and peak memory: the largest resident set
(RSS) any one worker process reached, its private part (RSS minus shared pages: a Ray worker's
RSS also counts the pages of the shared object store it maps), and the driver's RSS. Memory is
sampled every `interval` seconds with psutil: under `local`, the driver's child processes (the
process pool); under `ray`, every Ray worker process on this node (processes titled
`ray::...`), which on an embedded Ray are the run's workers. On a multi-node cluster only this
node's workers are seen.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from data_prep.config import SourceConfig, load_config
from data_prep.readers import read_embedded

WORD = re.compile(r"\S+")


def _paragraphs() -> list[str]:
    """Paragraphs (blank-line separated, 20+ words) of the embedded corpus's prose (the pydoc
    topics), in a fixed order."""
    out = []
    for rec in read_embedded(SourceConfig(code=False)):
        text = getattr(rec, "text", "")
        out += [p.strip() for p in text.split("\n\n") if len(p.split()) >= 20]
    return out


def synthetic_corpus(path: Path, n: int, seed: int = 0, copy_frac: float = 0.05,
                     near_frac: float = 0.10) -> dict[str, int]:
    """Write `n` prose documents as jsonl (`id`, `text`) to `path`; returns how many of each kind.

    Most documents are 3-8 paragraphs drawn at random from the embedded corpus's prose (so two of them
    rarely share much). `copy_frac` are exact copies and `near_frac` near-duplicates (1% of the
    words replaced by words of another paragraph: word 5-gram Jaccard about 0.9) of one of the last 1,000 documents, so the
    dedup stages have work whose amount grows with n. Deterministic for a seed; memory does not
    grow with n.
    """
    rng = random.Random(seed)
    paras = _paragraphs()
    recent: list[str] = []
    kinds = {"fresh": 0, "copy": 0, "near": 0}
    with open(path, "w", encoding="utf-8") as f:
        for k in range(n):
            r = rng.random()
            if recent and r < copy_frac:
                text, kind = rng.choice(recent), "copy"
            elif recent and r < copy_frac + near_frac:
                words = rng.choice(recent).split(" ")
                donor = rng.choice(paras).split()
                for _ in range(max(1, len(words) // 100)):
                    words[rng.randrange(len(words))] = rng.choice(donor)
                text, kind = " ".join(words), "near"
            else:
                text, kind = "\n\n".join(rng.sample(paras, rng.randint(3, 8))), "fresh"
            kinds[kind] += 1
            recent.append(text)
            if len(recent) > 1000:
                recent.pop(rng.randrange(len(recent)))
            f.write(json.dumps({"id": f"doc{k:08d}", "text": text}) + "\n")
    return kinds


class MemorySampler:
    """Peak RSS of worker processes and of this (driver) process, sampled in a thread."""

    def __init__(self, executor: str, interval: float = 0.5) -> None:
        self.executor, self.interval = executor, interval
        self.peak_worker = self.peak_worker_rss = self.peak_driver = 0
        self.workers_seen: set[int] = set()
        self._stop = threading.Event()
        self._me = psutil.Process()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _workers(self) -> list[psutil.Process]:
        if self.executor == "local":
            return self._me.children(recursive=True)
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if cmd and cmd[0].startswith("ray::"):
                out.append(p)
        return out

    def sample(self) -> None:
        try:
            self.peak_driver = max(self.peak_driver, self._me.memory_info().rss)
        except psutil.Error:
            pass
        for p in self._workers():
            try:
                m = p.memory_info()
                self.peak_worker = max(self.peak_worker, m.rss - m.shared)
                self.peak_worker_rss = max(self.peak_worker_rss, m.rss)
                self.workers_seen.add(p.pid)
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def scale_bench(config: str | Path, overrides: list[str], executor: str, sizes: list[int],
                seed: int = 0) -> dict[str, Any]:
    """Run the document stages on generated corpora of each size; rows of docs/s and memory."""
    from data_prep.pipeline import _executor, run_document_stages

    if not sizes or min(sizes) < 1:
        raise ValueError(f"--docs {sizes}: give one or more sizes >= 1")
    rows = []
    base = [*overrides, "progress=false", f"executor={executor}"]
    cfg0 = load_config(config, base)
    with _executor(cfg0):  # one Ray session for every size (its start is not timed)
        for k, n in enumerate([min(200, *sizes), *sizes]):  # 0: untimed, starts the workers
            with tempfile.TemporaryDirectory(prefix="prep-scale-") as tmp:
                corpus = Path(tmp) / "corpus.jsonl"
                kinds = synthetic_corpus(corpus, n, seed)
                src = f"sources=[{{kind: jsonl, path: '{corpus}', id_field: id}}]"
                cfg = load_config(config, [*base, src, f"out_dir={Path(tmp) / 'out'}"])
                with MemorySampler(executor) as mem:
                    t = time.perf_counter()
                    results = run_document_stages(cfg)
                    wall = time.perf_counter() - t
                if k == 0:
                    continue
                near = next((r for r in results if r.name == "near_dedup"), None)
                rows.append({
                    "executor": executor, "docs": n, "corpus": kinds,
                    "docs_kept": results[-1].total.kept.docs if results[-1].total else None,
                    "seconds": round(wall, 3), "docs_per_s": round(n / wall, 1),
                    "stage_seconds": {r.name: round(r.seconds, 3) for r in results},
                    "near_dup_clusters": near.extra.get("clusters") if near else None,
                    "peak_worker_private_bytes": mem.peak_worker,
                    "peak_worker_rss_bytes": mem.peak_worker_rss,
                    "peak_driver_rss_bytes": mem.peak_driver,
                    "worker_processes_seen": len(mem.workers_seen),
                })
    return {"format": 1, "config": str(config), "overrides": overrides, "executor": executor,
            "cpus": psutil.cpu_count(), "rows": rows}


def render_scale(result: dict[str, Any]) -> str:
    lines = [
        f"data_prep scale bench: executor {result['executor']}, {result['cpus']} CPUs, "
        f"document stages (read .. pii) on data_prep.scale.synthetic_corpus",
        f"{'docs':>9}{'kept':>9}{'s':>9}{'docs/s':>9}{'worker private MB':>19}"
        f"{'worker RSS MB':>15}{'driver RSS MB':>15}{'workers':>9}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['docs']:>9,}{r['docs_kept'] or 0:>9,}{r['seconds']:>9.1f}{r['docs_per_s']:>9,.0f}"
            f"{r['peak_worker_private_bytes'] / 1e6:>19.0f}{r['peak_worker_rss_bytes'] / 1e6:>15.0f}"
            f"{r['peak_driver_rss_bytes'] / 1e6:>15.0f}"
            f"{r['worker_processes_seen']:>9}"
        )
    lines.append("worker: the peak of any one worker process (Ray: the `ray::` processes of this")
    lines.append("node), sampled every 0.5 s; private = RSS - shared pages (a Ray worker's RSS also")
    lines.append("counts the object-store pages it maps); driver: this process. MB = 10^6 bytes.")
    return "\n".join(lines)
