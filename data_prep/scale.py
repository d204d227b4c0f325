"""The scale bench behind `python -m data_prep.bench --executor local|ray --docs N[,N...]`.

After an untimed warm-up run of 200 documents (which starts the worker processes), for each
N it writes a generated corpus of N documents (`synthetic_corpus`), runs the document stages
(read .. pii; tokenizer and pack run on the driver under both executors and are left out) on
it with the chosen executor, and reports docs/s and peak memory: the largest resident set
(RSS) any one worker process reached, its private part (RSS minus shared pages: a Ray worker's
RSS also counts the pages of the shared object store it maps), and the driver's RSS. Memory is
sampled every `interval` seconds with psutil: under `local`, the driver's child processes (the
process pool); under an embedded Ray (`ray.address=local`), the Ray worker processes (titled
`ray::...`) among the driver's descendants (its raylet starts them), so another Ray on the
same machine is not counted; on a cluster (`ray.address=auto` or an address), every `ray::`
process on this node. On a multi-node cluster only this node's workers are seen.

`overhead` (`python -m data_prep.bench --overhead`) runs the whole pipeline (`data_prep.run`)
on one input under the local pool and under an embedded Ray, interleaved, and compares medians
(issue 23's goal: Ray within 1.3x of local on one machine).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
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

    def __init__(self, executor: str, interval: float = 0.5, embedded: bool = True) -> None:
        self.executor, self.interval, self.embedded = executor, interval, embedded
        self.peak_worker = self.peak_worker_rss = self.peak_driver = 0
        self.workers_seen: set[int] = set()
        self._stop = threading.Event()
        self._me = psutil.Process()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _workers(self) -> list[psutil.Process]:
        if self.executor == "local":
            return self._me.children(recursive=True)
        procs = self._me.children(recursive=True) if self.embedded else psutil.process_iter()
        out = []
        for p in procs:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
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
                with MemorySampler(executor, embedded=cfg.ray.address == "local") as mem:
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
                    # each stage's tasks by kind: the peak RSS one task reached (taskmem)
                    "task_peak_rss_bytes": {r.name: r.task_peak_rss for r in results},
                })
                print(render_row(rows[-1]), file=sys.stderr, flush=True)  # a cut run keeps it
    return {"format": 1, "config": str(config), "overrides": overrides, "executor": executor,
            "cpus": psutil.cpu_count(), "rows": rows}


def render_row(r: dict[str, Any]) -> str:
    return (f"{r['docs']:>10,}{r['docs_kept'] or 0:>10,}{r['seconds']:>9.1f}{r['docs_per_s']:>9,.0f}"
            f"{r['peak_worker_private_bytes'] / 1e6:>19.0f}{r['peak_worker_rss_bytes'] / 1e6:>15.0f}"
            f"{r['peak_driver_rss_bytes'] / 1e6:>15.0f}{r['worker_processes_seen']:>9}")


def render_scale(result: dict[str, Any]) -> str:
    lines = [
        f"data_prep scale bench: executor {result['executor']}, {result['cpus']} CPUs, "
        f"document stages (read .. pii) on data_prep.scale.synthetic_corpus",
        f"{'docs':>10}{'kept':>10}{'s':>9}{'docs/s':>9}{'worker private MB':>19}"
        f"{'worker RSS MB':>15}{'driver RSS MB':>15}{'workers':>9}",
    ]
    lines += [render_row(r) for r in result["rows"]]
    for r in result["rows"]:
        peaks = r.get("task_peak_rss_bytes") or {}
        top = [(stage, max(by, key=lambda t, by=by: by[t][0])) for stage, by in peaks.items() if by]
        if top:
            lines.append(f"task peak RSS / rise MB at {r['docs']:,} docs (the task of each stage "
                         "with the highest peak): " + ", ".join(
                             f"{st} {peaks[st][t][0] / 1e6:.0f}/{peaks[st][t][1] / 1e6:.0f} ({t})"
                             for st, t in top))
    lines.append("worker: the peak of any one worker process (embedded Ray: the driver's `ray::`")
    lines.append("descendants; a cluster: the `ray::` processes of this node), sampled every 0.5 s;")
    lines.append("private = RSS - shared pages (a Ray worker's RSS also counts the object-store")
    lines.append("pages it maps); driver: this process. MB = 10^6 bytes. Task peak: measured in")
    lines.append("the task (data_prep.taskmem: the process's VmHWM reset when the task starts);")
    lines.append("rise: that peak less the worker's RSS when the task started.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- Ray's overhead
RUNS = ("local", "ray", "ray_warm")


def overhead(config: str | Path, overrides: list[str], rounds: int = 2) -> dict[str, Any]:
    """The whole pipeline (`data_prep.run`, read .. pack) on one input, `rounds` times each way,
    interleaved: `local` (the process pool), `ray` (an embedded Ray the run starts and stops,
    as `python -m data_prep ... executor=ray` does) and `ray_warm` (the same, on a Ray session
    started before the timer: the run minus Ray's start). Each run writes into a fresh
    directory (no stage cache). Returns medians of the wall time and of every stage's time
    (report.json's `seconds`), the ratios to local, and Ray's fixed costs on this machine
    (`ray_fixed_costs`), which say how much of the difference is starting Ray."""
    import ray

    from data_prep import ray_verbs
    from data_prep.pipeline import run

    if rounds < 1:
        raise ValueError(f"--rounds {rounds}: must be >= 1")
    walls: dict[str, list[float]] = {k: [] for k in RUNS}
    stages: dict[str, list[dict[str, float]]] = {k: [] for k in RUNS}
    docs = 0
    for r in range(rounds):
        for kind in RUNS:
            with tempfile.TemporaryDirectory(prefix="prep-overhead-") as tmp:
                executor = "local" if kind == "local" else "ray"
                cfg = load_config(config, [*overrides, "progress=false", f"executor={executor}",
                                           f"out_dir={tmp}"])
                if kind == "ray_warm":  # what the pipeline's embedded session would start
                    ray.init(num_cpus=cfg.ray.num_cpus or cfg.workers or psutil.cpu_count(),
                             include_dashboard=False, log_to_driver=False,
                             logging_level="WARNING")
                try:
                    t = time.perf_counter()
                    run(cfg)
                    walls[kind].append(time.perf_counter() - t)
                finally:
                    if kind == "ray_warm":
                        ray_verbs.shutdown()
                report = json.loads((Path(tmp) / "report.json").read_text(encoding="utf-8"))
                stages[kind].append({s["name"]: s["seconds"] for s in report["stages"]})
                docs = report["stages"][0]["total"]["docs_in"]
            print(f"round {r + 1}/{rounds} {kind}: {walls[kind][-1]:.2f} s", file=sys.stderr,
                  flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    names = list(stages["local"][0])
    fixed = ray_fixed_costs(cfg.ray.num_cpus or cfg.workers or psutil.cpu_count(), rounds)
    return {
        "format": 1, "config": str(config), "overrides": overrides, "rounds": rounds,
        "cpus": psutil.cpu_count(), "docs": docs,
        "seconds": {k: [round(x, 3) for x in v] for k, v in walls.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio": {k: round(med[k] / med["local"], 3) for k in RUNS[1:]},
        "stage_median_s": {n: {k: round(statistics.median(s[n] for s in stages[k]), 3)
                               for k in RUNS} for n in names},
        "ray_fixed_costs_s": fixed,
    }


def render_overhead(res: dict[str, Any]) -> str:
    med = res["median_s"]
    lines = [
        f"Ray's overhead: the whole pipeline (data_prep.run) on {res['config']} "
        f"{' '.join(res['overrides'])}".rstrip() + f", {res['docs']:,} documents, "
        f"{res['cpus']} CPUs; median of {res['rounds']} interleaved rounds",
        f"{'':<28}{'local':>9}{'ray':>9}{'ray warm':>10}{'ray - local':>13}",
    ]
    for name, m in res["stage_median_s"].items():
        lines.append(f"{name:<28}{m['local']:>9.2f}{m['ray']:>9.2f}{m['ray_warm']:>10.2f}"
                     f"{m['ray'] - m['local']:>13.2f}")
    docs_stages = [n for n in res["stage_median_s"] if n not in ("tokenizer", "pack")]
    sums = {k: sum(res["stage_median_s"][n][k] for n in docs_stages) for k in RUNS}
    lines.append(f"{'document stages (read..pii)':<28}{sums['local']:>9.2f}{sums['ray']:>9.2f}"
                 f"{sums['ray_warm']:>10.2f}{sums['ray'] - sums['local']:>13.2f}")
    lines.append(f"{'whole run (wall)':<28}{med['local']:>9.2f}{med['ray']:>9.2f}"
                 f"{med['ray_warm']:>10.2f}{med['ray'] - med['local']:>13.2f}")
    lines.append(f"ray / local: {res['ratio']['ray']:.2f}x (Ray started by the run), "
                 f"{res['ratio']['ray_warm']:.2f}x (Ray already running); goal <= 1.3x")
    lines.append(f"document stages alone: {sums['ray'] / sums['local']:.2f}x, "
                 f"{sums['ray_warm'] / sums['local']:.2f}x")
    lines.append("seconds: stage wall times as report.json records them (medians per stage),")
    lines.append("the wall time of data_prep.run; each round runs local, ray, ray warm in turn.")
    for k in RUNS:
        lines.append(f"  {k} runs: " + ", ".join(f"{x:.2f}" for x in res["seconds"][k]) + " s")
    lines.append(render_fixed_costs(res["ray_fixed_costs_s"]))
    return "\n".join(lines)


def render_fixed_costs(f: dict[str, float]) -> str:
    return (f"Ray's fixed costs here (data_prep.scale.ray_fixed_costs, medians): session start "
            f"{f['init_s']:.2f} s, stop {f['shutdown_s']:.2f} s, the session's first tasks "
            f"(a 4-block map: worker processes start) {f['first_task_s']:.2f} s; warm: a task "
            f"round-trip {f['task_s'] * 1e3:.1f} ms, put + get of a 1 MB block "
            f"{f['put_get_s'] * 1e3:.1f} ms, "
            f"a 4-block map {f['map_s']:.2f} s, a 100-row shuffle in 4 blocks "
            f"(ray_verbs.grouped) {f['shuffle_s']:.2f} s")


def _noop(x: int) -> int:
    return x


def _same(df: Any) -> Any:
    return df


def ray_fixed_costs(num_cpus: int = 2, repeats: int = 3, blocks: int = 4) -> dict[str, float]:
    """What Ray costs before any data moves, on this machine (medians of `repeats`), timed on
    the plain Ray tasks the executor submits (data_prep.ray_verbs): starting and stopping an
    embedded session, the session's first tasks (a map of `blocks` blocks: its worker
    processes start), and, warm, one task's round-trip, a put and get of a 1 MB Arrow block, a map of `blocks` blocks (one task
    each, `ray_verbs.map_blocks`) and a shuffle of 100 rows in `blocks` blocks
    (`ray_verbs.grouped`: a sample task per block, a split task per block, a reducer per
    range)."""
    import numpy as np
    import pyarrow as pa
    import ray

    from data_prep import ray_verbs

    keys = np.asarray([(i * 37) % 100 for i in range(100)], np.int64)
    block = pa.table({"x": np.arange(1 << 17, dtype=np.int64)})  # 1 MiB
    out: dict[str, list[float]] = {k: [] for k in ("init_s", "first_task_s", "task_s",
                                                   "put_get_s", "map_s", "shuffle_s",
                                                   "shutdown_s")}

    def timed(key: str, fn: Any) -> None:
        t = time.perf_counter()
        fn()
        out[key].append(time.perf_counter() - t)

    noop = ray_verbs._task(_noop, 1)
    for _ in range(repeats):
        timed("init_s", lambda: ray.init(address="local", num_cpus=num_cpus,
                                         include_dashboard=False, log_to_driver=False,
                                         logging_level="WARNING"))
        try:
            parts = [ray_verbs.to_blocks(pa.table({"k": k}))
                     for k in np.array_split(keys, blocks)]
            data = ray_verbs.Blocks([b.refs[0] for b in parts], [b.lens[0] for b in parts])
            timed("first_task_s", lambda d=data: ray_verbs.map_blocks(d, _same).sizes())
            ray.get(noop.remote(0))  # its function exported: the next call is a round-trip
            timed("task_s", lambda: ray.get(noop.remote(1)))
            timed("put_get_s", lambda: ray.get(ray.put(block)))
            timed("map_s", lambda d=data: ray_verbs.map_blocks(d, _same).sizes())
            timed("shuffle_s", lambda d=data: ray_verbs.grouped(d, "k", _same, blocks).sizes())
        finally:
            timed("shutdown_s", ray_verbs.shutdown)
    return {k: round(statistics.median(v), 4) for k, v in out.items()}
