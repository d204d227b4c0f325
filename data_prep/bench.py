"""`python -m data_prep.bench [CONFIG] [key=value ...]`: throughput of every prep stage.

    python -m data_prep.bench                                   # configs/prep/demo.yaml, 3 runs
    python -m data_prep.bench configs/prep/tiny.yaml --repeats 1 --json bench.json

Runs the real pipeline (`data_prep.run`) `--repeats` times, each into a fresh temporary
directory so that no stage is served from the stage cache, and prints the median wall time of
every stage with its input documents and bytes divided by that time (docs/s, MB/s, MB = 10^6
bytes), then the whole run. The times are those the pipeline itself records in report.json:

  * a stage's time is its wall time, reading and writing its Parquet files included;
  * a step's time (normalize, each filter, pii) is the time spent inside that step's
    `process`, summed over the worker processes, so its rate is per process, not per machine;
  * "near_dedup: signatures" is the MinHash signature part of near_dedup as the pipeline ran it
    (with `workers` processes).

Then MinHash signatures alone, on near_dedup's input documents: serially in this process,
through the same `parallel_signatures` path the pipeline uses (a fresh process pool each time),
and datasketch's `MinHash` on the same word n-grams in a plain loop in this process (when
datasketch is installed: the `dev` extra), one after the other in every repeat so that the
medians compare runs interleaved in time; a line gives tokenclock's serial rate over
datasketch's.

Then near-dup quality on the labelled set of `data_prep.labelled` (seeded edits of embedded-corpus
documents at exact Jaccard, and hard negatives: same template, different content): pair
precision, recall and F1 at threshold 0.8 with verification, before (the bands x rows of the
weighted-area criterion, 9 x 13, single linkage: near_dedup until issue 14) and after (bands x rows
chosen for recall under `fp_budget`, complete linkage), and with every `MinHashConfig` default
(verify on), and the hard negatives merged.
`--quality-only` runs just that section; `--labelled-bases N` sizes the set.

`--docs N[,N...]` runs the scale bench instead (data_prep.scale): the document stages on a
generated corpus of N documents, with `--executor local|ray`, printing docs/s and the peak
memory of any one worker and of the driver, per size:

    python -m data_prep.bench --executor ray --docs 5000,20000
    python -m data_prep.bench --executor ray --docs 50000,200000 ray.address=auto --publish

`--overhead` compares the whole pipeline under the local pool and an embedded Ray on one input,
interleaved, `--rounds` times each (data_prep.scale.overhead; issue 23's goal: <= 1.3x):

    python -m data_prep.bench --overhead --rounds 2 --publish     # configs/prep/demo.yaml

It prints the table as Markdown headed by `contracts.measured.header` (date, machine, torch,
command); `--publish` also writes it to docs/measured/data_prep-bench-<date>.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from contracts.measured import dated_path, header, publish
from data_prep.config import MinHashConfig, load_config
from data_prep.dedup import minhash_kwargs, near_duplicates
from data_prep.executor import worker_count
from data_prep.labelled import build, score
from data_prep.minhash import MinHasher, choose_bands_rows, parallel_signatures, words_of
from data_prep.pipeline import run
from data_prep.store import read_docs

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "prep" / "demo.yaml"


def _rows_of_run(report: dict, wall_s: float) -> list[dict[str, Any]]:
    """(name, kind, docs, bytes, seconds) of every stage and step of one pipeline run."""
    rows: list[dict[str, Any]] = []
    for st in report["stages"]:
        if st["cached"]:
            raise RuntimeError(f"stage {st['name']} came from the cache: the timing is not real")
        t, disabled = st["total"], bool(st["extra"].get("disabled"))
        rows.append(
            {"name": st["name"], "kind": "stage", "docs": t["docs_in"], "bytes": t["bytes_in"],
             "seconds": st["seconds"], "disabled": disabled}
        )
        if st["name"] == "read":
            continue  # its "steps" are per-source counts, not timed steps
        for step in st["steps"]:
            rows.append(
                {"name": f"{st['name']}/{step['name']}", "kind": "step", "docs": step["docs_in"],
                 "bytes": step["bytes_in"], "seconds": step["seconds"], "disabled": False}
            )
        if st["name"] == "near_dedup" and not disabled:
            rows.append(
                {"name": "near_dedup: signatures", "kind": "minhash", "docs": st["extra"]["documents"],
                 "bytes": t["bytes_in"], "seconds": st["extra"]["signature_s"], "disabled": False}
            )
    read = report["stages"][0]["total"]
    rows.append(
        {"name": "pipeline", "kind": "pipeline", "docs": read["docs_in"], "bytes": read["bytes_in"],
         "seconds": wall_s, "disabled": False}
    )
    return rows


def _near_dedup_input(report: dict) -> str | None:
    """Parquet file of the documents near_dedup read (the previous stage's output)."""
    names = [s["name"] for s in report["stages"]]
    i = names.index("near_dedup")
    return report["stages"][i - 1]["docs_path"] if i > 0 else None


def _time_signatures(cfg: Any, texts: list[str], workers: int) -> float:
    """Seconds for the signatures of `texts` in `workers` processes (a pool even for little
    text: min_chars_per_worker=0, so that the row shows what the pool costs)."""
    m = cfg.dedup.minhash
    hasher = MinHasher(num_perm=m.num_perm, ngram=m.ngram, seed=m.seed)
    t = time.perf_counter()
    parallel_signatures(hasher, texts, workers=workers, batch_docs=m.batch_docs,
                        min_chars_per_worker=0)
    return time.perf_counter() - t


def _time_datasketch(cfg: Any, texts: list[str]) -> float | None:
    """Seconds for datasketch's MinHash of the same shingles, a plain loop in this process:
    per document the words of `minhash.words_of`, its word n-grams joined by a space and
    UTF-8 encoded (one shingle of all words when there are fewer than n), then
    `MinHash(num_perm, seed).update_batch(shingles)` with its default SHA-1 hash. None when
    datasketch is not installed (it is in the `dev` extra)."""
    try:
        from datasketch import MinHash
    except ImportError:
        return None
    m = cfg.dedup.minhash
    t = time.perf_counter()
    for text in texts:
        w = words_of(text)
        n = min(m.ngram, len(w))
        shingles = [" ".join(w[i : i + n]).encode("utf-8") for i in range(len(w) - n + 1)]
        MinHash(num_perm=m.num_perm, seed=m.seed).update_batch(shingles if w else [])
    return time.perf_counter() - t


def bench(
    config: str | Path = DEFAULT_CONFIG, overrides: list[str] | tuple[str, ...] = (), repeats: int = 3
) -> dict[str, Any]:
    """Run the pipeline `repeats` times (no cache) and time MinHash signatures; returns the table
    (rows with medians) as a dict, the form `--json` writes."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; must be >= 1")
    runs: list[list[dict[str, Any]]] = []
    texts: list[str] = []
    cfg = load_config(config, [*overrides, "progress=false"])
    workers = worker_count(cfg)
    for r in range(repeats):
        tmp = Path(tempfile.mkdtemp(prefix="prep-bench-"))
        try:
            cfg = load_config(config, [*overrides, f"out_dir={tmp}", "progress=false"])
            t = time.perf_counter()
            run(cfg)
            wall = time.perf_counter() - t
            report = json.loads((tmp / "report.json").read_text(encoding="utf-8"))
            rows = _rows_of_run(report, wall)
            src = _near_dedup_input(report) if r == 0 and cfg.dedup.minhash.enabled else None
            if src:
                texts = [d.text for d in read_docs(src)]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if texts:  # one after the other in each repeat: the medians are of interleaved runs
            nbytes = sum(len(x.encode("utf-8", "surrogatepass")) for x in texts)
            for name, w in (("minhash serial", 1),
                            (f"minhash parallel ({workers} workers)", workers),
                            ("datasketch serial", 0)):
                secs = _time_signatures(cfg, texts, w) if w else _time_datasketch(cfg, texts)
                if secs is not None:
                    rows.append({"name": name, "kind": "minhash", "docs": len(texts),
                                 "bytes": nbytes, "seconds": secs, "disabled": False})
        runs.append(rows)
        print(f"repeat {r + 1}/{repeats}: pipeline {wall:.2f} s", file=sys.stderr, flush=True)
    table = []
    for i, row in enumerate(runs[0]):
        secs = [rr[i]["seconds"] for rr in runs]
        for rr in runs:
            if (rr[i]["name"], rr[i]["docs"]) != (row["name"], row["docs"]):
                raise RuntimeError(f"runs differ at {row['name']}: the pipeline is not deterministic")
        med = statistics.median(secs)
        ok = med > 0 and not row["disabled"]
        table.append(
            {**{k: row[k] for k in ("name", "kind", "docs", "bytes", "disabled")},
             "seconds": round(med, 6), "seconds_each": [round(s, 6) for s in secs],
             "docs_per_s": round(row["docs"] / med, 1) if ok else None,
             "mb_per_s": round(row["bytes"] / 1e6 / med, 3) if ok else None}
        )
    return {
        "format": 1,
        "config": str(config),
        "overrides": list(overrides),
        "repeats": repeats,
        "workers": workers,
        "num_perm": cfg.dedup.minhash.num_perm,
        "ngram": cfg.dedup.minhash.ngram,
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "rows": table,
    }


def quality(bases: int = 150, seed: int = 0, threshold: float = 0.8) -> dict[str, Any]:
    """Pair P/R/F1 of near_dedup on the labelled set, before and after issue 14's changes, and
    with MinHashConfig's defaults (which must be the measured setting: issue 23)."""
    ls = build(seed=seed, bases=bases, threshold=threshold)
    m = MinHashConfig()
    old_b, old_r = choose_bands_rows(threshold, m.num_perm, m.fp_weight, m.fn_weight)
    rows = []
    common = {"ngram": m.ngram, "num_perm": m.num_perm, "threshold": threshold, "verify": True,
              "seed": m.seed}
    for name, kw in [
        ("before", {**common, "bands": old_b, "rows": old_r, "linkage": "single"}),
        ("after", {**common, "fp_budget": m.fp_budget, "linkage": m.linkage}),
        # every setting as MinHashConfig ships it (the threshold as asked)
        ("defaults", {**minhash_kwargs(m), "threshold": threshold}),
    ]:
        t = time.perf_counter()
        found = near_duplicates(ls.ids, ls.texts, workers=1, **kw)
        rows.append({"name": name, "bands": found.bands, "rows": found.rows,
                     "linkage": kw["linkage"], "candidate_pairs": found.stats["candidate_pairs"],
                     "seconds": round(time.perf_counter() - t, 3), **score(ls, found.clusters)})
    return {"set": ls.describe(), "bases": bases, "seed": seed, "threshold": threshold,
            "rows": rows}


def render_quality(q: dict[str, Any]) -> str:
    lines = [
        f"near-dup quality (threshold {q['threshold']}, verify on): labelled set "
        f"data_prep.labelled.build(seed={q['seed']}, bases={q['bases']}):",
        f"  {q['set']}",
        f"{'':<8}{'bands x rows':>13}{'linkage':>10}{'candidates':>11}{'pairs':>7}"
        f"{'P':>8}{'R':>8}{'F1':>8}{'R 0.8-0.9':>10}{'hard neg':>9}",
    ]
    for r in q["rows"]:
        lines.append(
            f"{r['name']:<8}{str(r['bands']) + ' x ' + str(r['rows']):>13}{r['linkage']:>10}"
            f"{r['candidate_pairs']:>11,}{r['predicted_pairs']:>7,}{r['precision']:>8.3f}"
            f"{r['recall']:>8.3f}{r['f1']:>8.3f}{r['recall_0.8_0.9']:>10.3f}"
            f"{r['hard_negatives_merged']:>9}"
        )
    lines.append("pairs: all pairs inside a cluster; truth: every pair with exact word 5-gram")
    lines.append("Jaccard >= the threshold; hard neg: same-template pairs below it merged.")
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    """The table as text: one row per stage, its steps indented under it."""
    config = Path(result["config"])
    if config.is_absolute() and config.is_relative_to(Path.cwd()):
        config = config.relative_to(Path.cwd())
    head = (
        f"data_prep bench: {config} {' '.join(result['overrides'])}".rstrip()
        + f" | median of {result['repeats']} run(s) | workers {result['workers']}, "
        f"{result['cpus']} CPUs"
    )
    lines = [head, f"{'stage':<36}{'docs in':>9}{'MB in':>9}{'s':>9}{'docs/s':>11}{'MB/s':>9}"]
    for row in result["rows"]:
        name = ("  " + row["name"].split("/", 1)[1]) if row["kind"] == "step" else row["name"]
        if row["kind"] in ("pipeline",) or row["name"] == "minhash serial":
            lines.append("-" * 83)
        rate = (
            f"{row['docs_per_s']:>11,.0f}{row['mb_per_s']:>9.2f}"
            if row["docs_per_s"] is not None
            else f"{'disabled' if row['disabled'] else '-':>20}"
        )
        lines.append(
            f"{name:<36}{row['docs']:>9,}{row['bytes'] / 1e6:>9.2f}{row['seconds']:>9.3f}{rate}"
        )
    lines.append("s: stage wall time; indented steps: time inside the step, summed over worker")
    lines.append("processes; minhash rows: the signature computation alone. MB = 10^6 bytes.")
    by_name = {r["name"]: r for r in result["rows"]}
    ours, theirs = by_name.get("minhash serial"), by_name.get("datasketch serial")
    if ours and theirs and ours["docs_per_s"] and theirs["docs_per_s"]:
        lines.append(
            f"MinHash signatures on one core ({result.get('num_perm', 128)} permutations, word "
            f"{result.get('ngram', 5)}-grams):\n  tokenclock {ours['docs_per_s']:,.0f}/s, "
            f"datasketch {theirs['docs_per_s']:,.0f}/s: "
            f"{ours['docs_per_s'] / theirs['docs_per_s']:.1f}x (medians of interleaved runs)"
        )
    if result.get("quality"):
        lines += ["", render_quality(result["quality"])]
    return "\n".join(lines)


def markdown(result: dict[str, Any], command: list[str]) -> str:
    """The table as a measured-table Markdown file: the header, then the table fenced."""
    return header("data_prep bench", command) + "\n```\n" + render(result) + "\n```\n"


def unused_name(name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... : the first whose dated file does not exist yet, so
    that a second run on one day does not overwrite the first one's table."""
    k, cand = 1, name
    while dated_path(cand).exists():
        k += 1
        cand = f"{name}-{k}"
    return cand


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give document counts, e.g. 5000,20000") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be >= 1")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.bench",
        description="Time every prep stage (docs/s, MB/s) and MinHash signatures (signatures/s).",
    )
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="prep YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. workers=1")
    p.add_argument("--repeats", type=int, default=3, help="pipeline runs; medians are reported")
    p.add_argument("--labelled-bases", type=int, default=150,
                   help="base documents of the near-dup labelled set (0: skip that section)")
    p.add_argument("--quality-only", action="store_true",
                   help="only the near-dup quality section (no pipeline runs)")
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help="executor of the prep stages (default: the config's)")
    p.add_argument("--docs", type=_sizes, default=None, metavar="N[,N...]",
                   help="scale bench instead: the document stages on generated corpora of N "
                        "documents each (e.g. --docs 5000,20000): docs/s, peak memory per worker")
    p.add_argument("--overhead", action="store_true",
                   help="Ray's overhead instead: the whole pipeline under local and embedded Ray, "
                        "interleaved, --rounds times each (medians, ratio)")
    p.add_argument("--rounds", type=int, default=2, help="--overhead: rounds of each executor")
    p.add_argument("--json", type=Path, default=None, help="also write the table here as JSON")
    p.add_argument("--publish", action="store_true",
                   help="also write the Markdown to docs/measured/data_prep-bench-<date>.md")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if "=" in args.config and not Path(args.config).exists():  # overrides without a config
        args.config, args.overrides = str(DEFAULT_CONFIG), [args.config, *args.overrides]
    if args.executor and not args.docs:
        args.overrides = [*args.overrides, f"executor={args.executor}"]
    try:
        if args.overhead:
            from data_prep.scale import overhead

            result = overhead(args.config, args.overrides, args.rounds)
        elif args.docs:
            from data_prep.scale import render_scale, scale_bench

            result = scale_bench(args.config, args.overrides, args.executor or "local", args.docs)
        elif args.quality_only:
            result = {"config": str(args.config), "overrides": args.overrides, "rows": [],
                      "quality": quality(max(args.labelled_bases, 1))}
        else:
            result = bench(args.config, args.overrides, args.repeats)
            if args.labelled_bases > 0:
                result["quality"] = quality(args.labelled_bases)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = ["python", "-m", "data_prep.bench", *argv]
    if args.overhead:
        from data_prep.scale import render_overhead

        name = "data_prep-ray-overhead"
        text = header("data_prep: Ray's overhead", cmd) + "\n```\n" + render_overhead(result) + "\n```\n"
    elif args.docs:
        name = f"data_prep-scale-{args.executor or 'local'}"
        text = header("data_prep scale bench", cmd) + "\n```\n" + render_scale(result) + "\n```\n"
    elif args.quality_only:
        name = "data_prep-bench"
        text = (header("data_prep bench: near-dup quality", cmd) + "\n```\n"
                + render_quality(result["quality"]) + "\n```\n")
    else:
        name, text = "data_prep-bench", markdown(result, cmd)
    print(text, end="")
    if args.publish:
        print(f"wrote {publish(unused_name(name), text)}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
