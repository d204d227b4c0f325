"""Faults found by hand in data_prep (issue 15, items 9-12), one test each.

The promise under test: bad input is never fatal and nothing is lost silently; every physical
input record is counted (records_in = kept + dropped by reason) with a one-line reason that
says what is wrong. Each test builds its bad input in tmp_path and runs the real reader and
stages on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import load_config
from data_prep.config import SourceConfig
from data_prep.document import BadRecord
from data_prep.pipeline import check_invariant, run_document_stages
from data_prep.read_stage import Read
from data_prep.readers import read_source
from data_prep.stage import StageResult, run_stage

PROSE = (
    "The river ran past the mill and under the old stone bridge, and the children of the "
    "village liked to watch the boats go by. In spring the water rose and covered the fields."
)


def config(tmp_path: Path, path: Path, *overrides: str):
    """A prep config reading `path` as jsonl into tmp_path/out, serial and quiet."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        f"""
out_dir: {tmp_path / "out"}
progress: false
workers: 1
sources:
  - {{kind: jsonl, path: "{path}"}}
report: {{examples_per_reason: 100}}
"""
    )
    return load_config(cfg_path, list(overrides))


def read_stage(cfg) -> StageResult:
    return run_stage(cfg, Read(), 0, None)


def dropped(res: StageResult) -> dict[str, int]:
    assert res.total is not None
    return {r: c.docs for r, c in res.total.dropped.items()}


def details(res: StageResult, reason: str) -> list[str]:
    assert res.total is not None
    return [e["detail"] for e in res.total.examples.get(reason, [])]


# ------------------------------------------------------------------ 9: broken symlinks
def test_broken_symlinks_are_unreadable_files_not_fatal(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.jsonl").write_text(json.dumps({"text": PROSE}) + "\n")
    os.symlink(corpus / "loop_b.jsonl", corpus / "loop_a.jsonl")  # a -> b -> a
    os.symlink(corpus / "loop_a.jsonl", corpus / "loop_b.jsonl")
    os.symlink(tmp_path / "gone.jsonl", corpus / "dangling.jsonl")
    cfg = config(tmp_path, corpus)

    results = run_document_stages(cfg)  # the read stage fingerprints and reads every file
    read = results[0]
    assert dropped(read) == {"unreadable_file": 3}
    assert read.total is not None and read.total.kept.docs == 1
    got = details(read, "unreadable_file")
    for name in ("loop_a.jsonl", "loop_b.jsonl", "dangling.jsonl"):
        assert sum(name in d for d in got) == 1, (name, got)
    inv = check_invariant(results)
    assert inv["records_in"] == 4 == inv["documents_out"] + inv["dropped"]

    # a glob that names a dangling link reports it too, instead of reading nothing
    cfg.sources[0].path = str(corpus / "dangl*.jsonl")
    recs = list(read_source(cfg.sources[0]))
    assert len(recs) == 1 and isinstance(recs[0], BadRecord)
    assert recs[0].reason == "unreadable_file" and "dangling.jsonl" in recs[0].detail


# ------------------------------------------------------------------ 10: blank jsonl lines
def test_blank_jsonl_lines_are_counted_as_empty(tmp_path):
    lines = [json.dumps({"text": f"Story {i}. {PROSE}"}) for i in range(96)]
    for at in (10, 50, 97):  # 99 physical lines, 3 of them blank (one only whitespace)
        lines.insert(at, "   " if at == 50 else "")
    path = tmp_path / "blank.jsonl"
    path.write_text("\n".join(lines) + "\n")
    physical = len(path.read_bytes().splitlines())
    assert physical == 99
    cfg = config(tmp_path, path, "dedup.minhash.enabled=false")

    results = run_document_stages(cfg)
    inv = check_invariant(results)  # raises AccountingError when documents went missing
    assert inv["records_in"] == physical
    assert inv["records_in"] == inv["documents_out"] + inv["dropped"]
    assert dropped(results[0]) == {"empty": 3}
    assert sorted(details(results[0], "empty")) == sorted(
        f"blank.jsonl:{n}: blank line" for n in (11, 51, 98)
    )


# ------------------------------------------------------------------ 11: size of the document
def test_size_limit_applies_to_the_text_not_the_escaped_line(tmp_path):
    # 5,000,000 UTF-8 bytes of text whose JSON line is three times that (é -> \u00e9)
    limit = 5_000_000
    fits = "é" * (limit // 2)
    over = fits + "x"
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"text": fits}) + "\n" + json.dumps({"text": over}) + "\n")
    assert len(path.read_bytes().splitlines()[0]) > 3 * limit

    cfg = config(tmp_path, path)
    assert cfg.read.max_doc_bytes == limit  # the default limit, the default line guard
    res = read_stage(cfg)
    assert res.total is not None and res.total.kept.docs == 1
    assert res.total.kept.bytes == limit
    assert dropped(res) == {"too_large": 1}
    assert details(res, "too_large") == [f"{limit + 1} bytes > read.max_doc_bytes={limit}"]


def test_raw_line_guard_has_its_own_reason_and_key(tmp_path):
    path = tmp_path / "lines.jsonl"
    small, big = json.dumps({"text": "a" * 40}), json.dumps({"text": "b" * 400})
    path.write_text(small + "\n" + big + "\n")
    cfg = config(tmp_path, path, "read.max_doc_bytes=50", "read.max_line_bytes=200")
    res = read_stage(cfg)
    assert dropped(res) == {"line_too_large": 1}
    assert details(res, "line_too_large") == [
        f"lines.jsonl:2: line of {len(big) + 1} bytes > read.max_line_bytes=200"
    ]
    with pytest.raises(ValueError, match="would drop documents the document limit allows"):
        config(tmp_path, path, "read.max_doc_bytes=500", "read.max_line_bytes=200")


# ------------------------------------------------------------------ 12: messages
def test_reasons_do_not_contradict_themselves(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                b'{"id": 1, "source": "web", "text": null}',  # 1: null, not missing
                b'{"text": "a\x01b"}',  # 2: raw control character inside a string
                b'{"text": "unterminated',  # 3
                b"null",  # 4: a JSON null, not an object
                b"42",  # 5
                b'{"text": 42}',  # 6
                b'{"text": ["a"]}',  # 7
                b'{"body": "x"}',  # 8: really missing
            ]
        )
        + b"\n"
    )
    src = config(tmp_path, path).sources[0]
    got = {}
    for r in read_source(src):
        assert isinstance(r, BadRecord), r
        got[r.id.rsplit(":", 1)[1]] = (r.reason, r.detail)

    assert got["1"] == ("missing_text_field", "bad.jsonl:1: 'text' is null")
    assert got["2"] == ("malformed_json", "bad.jsonl:2: Invalid control character at column 12")
    assert got["3"] == ("malformed_json", "bad.jsonl:3: Unterminated string starting at column 10")
    assert got["4"] == ("malformed_json", "bad.jsonl:4: the record is null, not a JSON object")
    assert got["5"] == ("malformed_json", "bad.jsonl:5: the record is a number, not a JSON object")
    assert got["6"] == ("bad_text_field", "bad.jsonl:6: 'text' is a number, not a string")
    assert got["7"] == ("bad_text_field", "bad.jsonl:7: 'text' is an array, not a string")
    assert got["8"] == ("missing_text_field", "bad.jsonl:8: no 'text' field (fields: ['body'])")
    for _, detail in got.values():
        assert " at at " not in detail and "NoneType" not in detail, detail

    # a parquet file without the text column lists all its columns, not just the id column
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "t.parquet")
    src = SourceConfig(kind="parquet", path=str(tmp_path / "t.parquet"), id_field="id")
    [rec] = read_source(src)
    assert isinstance(rec, BadRecord)
    assert rec.detail == "t.parquet:row 0: no 'text' field (fields: ['body', 'id'])"
    # an unreadable file is named once, not twice
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "dangling.jsonl")
    [rec] = read_source(SourceConfig(kind="jsonl", path=str(tmp_path / "dangling.jsonl")))
    assert isinstance(rec, BadRecord) and rec.reason == "unreadable_file"
    assert rec.detail == f"{tmp_path / 'dangling.jsonl'}: No such file or directory"
    # an empty document says what it measured against which limit
    res = read_stage(config(tmp_path, path, "read.min_doc_chars=5"))
    assert details(res, "empty") == []  # the bad lines above are not documents
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "  a b  "}) + "\n")
    res = read_stage(config(tmp_path, tmp_path / "short.jsonl", "read.min_doc_chars=5"))
    assert details(res, "empty") == [
        "3 characters once whitespace is stripped < read.min_doc_chars=5"
    ]
