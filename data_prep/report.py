"""report.json and report.md: per-stage accounting of a prep run, with examples."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from data_prep import storage
from data_prep.config import PrepConfig, to_dict


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def write_reports(
    root: str | Path, cfg: PrepConfig, results: list, invariant: dict, seconds: float
) -> None:
    data = {
        "format": 1,
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(seconds, 2),
        "invariant": {**invariant, "ok": True},
        "stages": [r.to_dict() for r in results],
        "config": to_dict(cfg),
    }
    storage.write_text(storage.join(root, "report.json"),
                       json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    # titled by out_dir as given (for an object store, its URL)
    storage.write_text(storage.join(root, "report.md"), render_markdown(data, cfg.out_dir))


def _fence(text: str) -> str:
    text = text.replace("```", "ʼʼʼ")
    return "```\n" + text.rstrip() + "\n```"


def render_markdown(data: dict[str, Any], root: Path | str) -> str:
    inv = data["invariant"]
    out = [
        f"# Prep report: `{root}`",
        "",
        f"{data['created_utc']}, {data['seconds']:.1f} s. Records read: **{inv['records_in']}**, "
        f"documents out: **{inv['documents_out']}**, dropped: **{inv['dropped']}** "
        f"(invariant records read = out + dropped holds).",
        "",
        "## Stages",
        "",
        "| stage | docs in | kept | dropped | MB in | MB kept | modified | s | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in data["stages"]:
        t = s["total"]
        note = "disabled" if s["extra"].get("disabled") else ("cached" if s["cached"] else "")
        out.append(
            f"| {s['name']} | {t['docs_in']} | {t['docs_kept']} | {t['docs_dropped']} | "
            f"{_mb(t['bytes_in'])} | {_mb(t['bytes_kept'])} | {t['modified']} | {s['seconds']:.2f} | {note} |"
        )
    out += [
        "",
        "## Dropped, by stage and reason",
        "",
        "| stage | reason | docs | MB | examples |",
        "|---|---|---:|---:|---|",
    ]
    for s in data["stages"]:
        t = s["total"]
        for reason, c in t["dropped"].items():
            ex = ", ".join(f"`{e['id']}`" for e in t["examples"].get(reason, []))
            out.append(f"| {s['name']} | {reason} | {c['docs']} | {_mb(c['bytes'])} | {ex} |")
    steps = [(s["name"], st) for s in data["stages"] for st in s["steps"]]
    if steps:
        out += [
            "",
            "## Steps",
            "",
            "| stage | step | docs in | kept | dropped | modified | counters | s |",
            "|---|---|---:|---:|---:|---:|---|---:|",
        ]
        for stage, st in steps:
            counters = ", ".join(f"{k}: {v}" for k, v in st["counters"].items())
            out.append(
                f"| {stage} | {st['name']} | {st['docs_in']} | {st['docs_kept']} | "
                f"{st['docs_dropped']} | {st['modified']} | {counters} | {st['seconds']:.2f} |"
            )
    for s in data["stages"]:
        if s["name"] == "exact_dedup" and not s["extra"].get("disabled"):
            e = s["extra"]
            out += [
                "",
                "## Exact duplicates",
                "",
                f"{e['groups']} groups of documents with identical normalised text; the smallest "
                "id of each group survives. Largest groups:",
                "",
            ]
            out += [
                f"- `{g[0]}` kept; dropped: " + ", ".join(f"`{x}`" for x in g[1:])
                for g in e["groups_shown"]
            ]
        if s["name"] == "near_dedup" and not s["extra"].get("disabled"):
            e = s["extra"]
            out += [
                "",
                "## Near duplicates (MinHash LSH)",
                "",
                f"{e['bands']} bands x {e['rows']} rows; {e['candidate_pairs']} candidate pairs, "
                f"{e['pairs_rejected_by_verification']} rejected by verification; "
                f"{e['clusters']} clusters holding {e['documents_in_clusters']} documents. "
                f"Signatures: {e['signature_s']:.2f} s ({e['signatures_per_s']} docs/s). "
                "The longest document of a cluster survives (ties: smallest id). Largest clusters:",
                "",
            ]
            for c in e["clusters_shown"]:
                members = ", ".join(f"`{m}` ({j:.2f})" for m, j in c["members"])
                out.append(f"- `{c['survivor']}` kept; dropped (estimated Jaccard): {members}")
        if s["name"] == "pack":
            sp = s["extra"].get("splits", {})
            out += [
                "",
                "## Packed",
                "",
                "| split | documents | tokens | shards |",
                "|---|---:|---:|---:|",
            ]
            out += [
                f"| {k} | {v['documents']} | {v['tokens']} | {len(v['shards'])} |"
                for k, v in sp.items()
            ]
    out += ["", "## Examples per rejection reason", ""]
    for s in data["stages"]:
        for reason, exs in s["total"]["examples"].items():
            out.append(f"### {s['name']}: {reason}")
            out.append("")
            for e in exs:
                out.append(f"- `{e['id']}` ({e['source']}): {e['detail']}")
                if e["snippet"]:
                    out.append("")
                    out.append(_fence(e["snippet"]))
            out.append("")
    return "\n".join(out) + "\n"
