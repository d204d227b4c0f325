"""`python -m data_prep.drivermem [--docs N,N] [--executors local,ray] [key=value ...]`: the
whole pipeline (read .. pack, `data_prep.run`) on generated corpora, each executor on the same
corpus one after the other, printing wall time, docs/s and the driver's peak RSS.

The driver is this process: its resident set is sampled every 0.2 s (psutil), so the figure is
what the run itself adds to an interpreter that has imported data_prep (given as the baseline
row). The corpus is `data_prep.scale.synthetic_corpus` (embedded-corpus prose, 5% exact copies,
10% near-duplicates); the config is configs/prep/demo.yaml's cleaning with a 4096-token BPE.
Each run goes into a fresh directory, so no stage comes from the cache. Ray: one embedded
session for every size, started before the first (untimed) warm-up run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from data_prep.config import load_config
from data_prep.pipeline import _executor, run
from data_prep.scale import MemorySampler, synthetic_corpus

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "prep" / "demo.yaml"


def measure(sizes: list[int], executors: list[str], overrides: list[str]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="prep-drivermem-") as tmp:
        with MemorySampler("local", 0.2) as base:
            pass
        rows.append({"executor": "(baseline: imports)", "docs": 0, "seconds": 0.0,
                     "docs_per_s": 0.0, "driver_peak_mb": base.peak_driver / 1e6})
        corpora = {}
        for n in sorted({200, *sizes}):
            corpora[n] = Path(tmp) / f"corpus-{n}.jsonl"
            synthetic_corpus(corpora[n], n)
        for ex_name in executors:  # one executor after the other: Ray idles during no local run

            def cfg_for(n: int, ex_name: str = ex_name) -> Any:
                src = f"sources=[{{kind: jsonl, path: '{corpora[n]}', id_field: id}}]"
                out = Path(tmp) / f"out-{ex_name}-{n}"
                return load_config(CONFIG, [*overrides, "progress=false",
                                            f"executor={ex_name}", src, f"out_dir={out}"])

            with ExitStack() as stack:
                if ex_name == "ray":  # one session for every size; its start is not timed
                    stack.enter_context(_executor(cfg_for(200)))
                for k, n in enumerate([200, *sizes]):
                    with MemorySampler("local", 0.2) as mem:
                        t = time.perf_counter()
                        run(cfg_for(n))
                        wall = time.perf_counter() - t
                    if k == 0:
                        continue  # an untimed warm-up
                    rows.append({"executor": ex_name, "docs": n, "seconds": wall,
                                 "docs_per_s": n / wall, "driver_peak_mb": mem.peak_driver / 1e6})
                    print(rows[-1], file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'executor':<22}{'docs':>9}{'s':>9}{'docs/s':>9}{'driver peak RSS MB':>20}"]
    for r in rows:
        lines.append(f"{r['executor']:<22}{r['docs']:>9,}{r['seconds']:>9.1f}"
                     f"{r['docs_per_s']:>9,.0f}{r['driver_peak_mb']:>20.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.drivermem", description=__doc__)
    p.add_argument("--docs", default="5000,20000", help="corpus sizes, e.g. 5000,20000")
    p.add_argument("--executors", default="local,ray", help="local, ray or both")
    p.add_argument("overrides", nargs="*", help="key=value overrides of demo.yaml")
    args = p.parse_args(argv)
    try:
        sizes = [int(x) for x in args.docs.split(",")]
    except ValueError:
        print(f"error: --docs {args.docs!r}: give document counts, e.g. 5000,20000",
              file=sys.stderr)
        return 2
    executors = args.executors.split(",")
    if min(sizes) < 1 or not set(executors) <= {"local", "ray"}:
        print(f"error: --docs {args.docs!r} must be >= 1 and --executors {args.executors!r} "
              "local and/or ray", file=sys.stderr)
        return 2
    print(render(measure(sizes, executors, args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
