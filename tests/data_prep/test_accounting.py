"""Bad input mixed into a corpus: nothing crashes, nothing is lost, every reason is counted."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import load_config, run
from data_prep.config import SourceConfig
from data_prep.document import BadRecord, Document
from data_prep.readers import read_source
from data_prep.store import read_docs

PROSE = (
    "The river ran past the mill and under the old stone bridge, and the children of the village "
    "liked to watch the boats go by. In spring the water rose and covered the lower fields. "
    "Farmers moved their animals to the hills and waited for the flood to pass. Every year the "
    "council promised a new wall, and every year the money went to something else. Still, the "
    "people of the valley loved the river and would not live anywhere else."
)


def para(i: int) -> str:
    return f"Story {i} begins here. " + PROSE.replace("river", f"river number {i}")


def write_corpus(root: Path) -> dict[str, int]:
    """A small corpus with every kind of bad record; returns the expected reason counts."""
    root.mkdir()
    lines = [json.dumps({"text": para(i), "id": f"doc{i}"}).encode() for i in range(12)]
    lines += [
        b'{"text": "unterminated',  # malformed JSON, line 13
        b'{"text": "bad \xff\xfe bytes"}',  # invalid UTF-8, line 14
        json.dumps({"body": "no text field"}).encode(),  # missing field, line 15
        json.dumps({"text": 42}).encode(),  # not a string, line 16
        json.dumps(["a", "list"]).encode(),  # not an object, line 17
        json.dumps({"text": "   \n  "}).encode(),  # empty, line 18
        json.dumps({"text": "x " * 30_000}).encode(),  # huge (> max_doc_bytes), line 19
        json.dumps({"text": para(0), "id": "doc0"}).encode(),  # duplicate id
        b"",  # a blank line is a record too, dropped as empty
        json.dumps({"text": para(3)}).encode(),  # exact duplicate of doc3 (other id)
        json.dumps({"text": "bad surrogate \ud800 here"}).encode(),  # lone surrogate
    ]
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(root / "b.jsonl.gz", "wb") as f:
        for i in range(12, 16):
            f.write(json.dumps({"text": para(i)}).encode() + b"\n")
    good = gzip.compress(b"\n".join(json.dumps({"text": para(i)}).encode() for i in range(16, 30)))
    (root / "c.jsonl.gz").write_bytes(good[: len(good) // 2])  # truncated archive
    pq.write_table(
        pa.table({"text": [para(40), None, para(41), PROSE.replace("mill", "old mill")]}),
        root / "d.parquet",
    )
    txt = root / "txt"
    txt.mkdir()
    (txt / "good.txt").write_text(para(50))
    (txt / "binary.txt").write_bytes(b"\x00\x01\x02binary\x00" * 20)
    (txt / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return {
        "malformed_json": 2, "invalid_utf8": 3, "missing_text_field": 2, "bad_text_field": 1,
        "empty": 2, "too_large": 1, "duplicate_id": 1, "binary_file": 1, "unreadable_file": 1,
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "corpus"
    expected = write_corpus(root)
    cfg_path = root.parent / "cfg.yaml"
    cfg_path.write_text(
        f"""
out_dir: {root.parent / "out"}
progress: false
workers: 1
sources:
  - {{kind: jsonl, path: "{root}", id_field: id}}
  - {{kind: parquet, path: "{root / "d.parquet"}"}}
  - {{kind: text, path: "{root / "txt"}"}}
read: {{max_doc_bytes: 50000}}
filters:
  c4: {{enabled: false}}
dedup:
  minhash: {{threshold: 0.7}}
tokenizer: {{vocab_size: 300}}
shards: {{val_fraction: 0.2}}
report: {{write_dropped: true}}
"""
    )
    out = run(load_config(cfg_path))
    return out, expected


def test_every_bad_record_counted_under_its_reason(prepared):
    out, expected = prepared
    report = json.loads((out / "report.json").read_text())
    read = report["stages"][0]["total"]
    got = {r: c["docs"] for r, c in read["dropped"].items()}
    assert got == expected
    details = [e["detail"] for e in read["examples"]["malformed_json"]]
    assert any(d.startswith("a.jsonl:13: ") for d in details)
    assert any("a.jsonl:17" in d and "not a JSON object" in d for d in details)
    assert any("a.jsonl:14" in e["detail"] for e in read["examples"]["invalid_utf8"])
    assert "c.jsonl.gz" in read["examples"]["unreadable_file"][0]["detail"]


def test_accounting_invariant_and_dedup(prepared):
    out, _ = prepared
    report = json.loads((out / "report.json").read_text())
    inv = report["invariant"]
    assert inv["ok"] and inv["records_in"] == inv["documents_out"] + inv["dropped"]
    stages = {s["name"]: s for s in report["stages"]}
    for s in report["stages"]:
        t = s["total"]
        assert t["docs_in"] == t["docs_kept"] + t["docs_dropped"], s["name"]
    # each stage's input is the previous stage's output
    names = [s["name"] for s in report["stages"]][:6]
    for a, b in zip(names, names[1:], strict=False):
        assert stages[a]["total"]["docs_kept"] == stages[b]["total"]["docs_in"]
    assert stages["exact_dedup"]["total"]["dropped"]["exact_duplicate"]["docs"] == 1
    near = stages["near_dedup"]["total"]["dropped"]
    assert near["near_duplicate"]["docs"] >= 1  # the para(i) family shares most shingles
    meta = json.loads((out / "meta.json").read_text())
    assert sum(s["documents"] for s in meta["splits"].values()) == inv["documents_out"]
    # dropped documents are written out for inspection, one file per stage
    dropped = [json.loads(ln) for p in sorted((out / "stages").glob("*/dropped/*.jsonl"))
               for ln in p.read_text().splitlines()]
    assert len(dropped) == inv["dropped"]
    assert "# Prep report" in (out / "report.md").read_text()


def test_text_reader_per_line(tmp_path):
    p = tmp_path / "lines.txt"
    p.write_bytes(b"first line\n\nsecond \xff line\nthird line\n")
    recs = list(read_source(SourceConfig(kind="text", path=str(p), per="line")))
    assert [type(r).__name__ for r in recs] == ["Document", "BadRecord", "Document"]
    assert recs[0].id == "text:lines.txt:1" and recs[2].text == "third line"
    assert isinstance(recs[1], BadRecord) and recs[1].reason == "invalid_utf8"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list(read_source(SourceConfig(kind="jsonl", path=str(tmp_path / "nope*.jsonl"))))


def test_hub_reader_streams_records(monkeypatch):
    import datasets

    calls = {}

    def fake_load(name, config=None, split=None, streaming=None):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"content": "hello world"}, {"content": None}, {"other": 1}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = SourceConfig(kind="hub", hub_name="org/corpus", hub_config="en", text_field="content")
    recs = list(read_source(cfg))
    assert calls == {"name": "org/corpus", "config": "en", "split": "train", "streaming": True}
    assert isinstance(recs[0], Document) and recs[0].text == "hello world"
    assert recs[0].id == "hub:org/corpus:0" and recs[0].source == "hub:org/corpus"
    assert [r.reason for r in recs[1:]] == ["missing_text_field", "missing_text_field"]


def test_hub_unreachable_says_so(monkeypatch):
    import datasets

    def failing(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(RuntimeError, match="hub reachable"):
        list(read_source(SourceConfig(kind="hub", hub_name="org/corpus")))


def test_shard_layout_and_pool_change_nothing(prepared, tmp_path):
    """The same corpus in shards of 3 documents, 2 worker processes: the same documents in the
    same order, the same drops and the same accounting as one shard per file in one process."""
    out, _ = prepared
    cfg = load_config(out.parent / "cfg.yaml", [f"out_dir={tmp_path / 'out'}", "workers=2",
                                                "ray.shard_docs=3"])
    run(cfg)

    volatile = {"seconds", "key", "cached", "docs_path", "signature_s", "signatures_per_s",
                "lsh_and_clustering_s", "task_peak_rss_bytes", "task_peak_rss_bytes_by_task",
                "task_rss_rise_bytes_by_task"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in volatile}
        return [strip(v) for v in x] if isinstance(x, list) else x

    def stages(root: Path) -> list[dict]:
        return strip(json.loads((root / "report.json").read_text())["stages"])

    assert stages(tmp_path / "out") == stages(out)
    read = tmp_path / "out" / "stages" / "00_read"
    assert len(list((read / "docs").glob("part-*.parquet"))) > 5
    for stage in ("00_read", "05_pii"):
        a = [(d.id, d.text) for d in read_docs(out / "stages" / stage / "docs")]
        b = [(d.id, d.text) for d in read_docs(tmp_path / "out" / "stages" / stage / "docs")]
        assert a == b
    names = sorted(p.name for p in out.glob("*.bin"))
    assert names and names == sorted(p.name for p in (tmp_path / "out").glob("*.bin"))
    for name in [*names, "tokenizer.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (out / name).read_bytes()
