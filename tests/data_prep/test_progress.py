"""Progress bars with an ETA: `expected_records` knows how many records a source has when that
is known without reading it, and the stages' bars count their tasks (one per shard) against
the number of tasks, so both have a total."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import load_config, run
from data_prep.config import SourceConfig
from data_prep.readers import expected_records, read_source

from .conftest import TINY


def _count(src: SourceConfig) -> int:
    return sum(1 for _ in read_source(src))


def test_expected_records_is_the_number_read(tmp_path):
    emb = SourceConfig(kind="embedded", include=["json/*", "pydoc/a*"])
    assert expected_records(emb) == _count(emb) > 5
    for name, rows in (("a.parquet", 7), ("b.parquet", 3)):
        pq.write_table(pa.table({"text": [f"doc {i}" for i in range(rows)]}), tmp_path / name)
    par = SourceConfig(kind="parquet", path=str(tmp_path))
    assert expected_records(par) == _count(par) == 10
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i in range(4):
        (txt_dir / f"{i}.txt").write_text(f"line one\nline two {i}\n")
    per_file = SourceConfig(kind="text", path=str(txt_dir), per="file")
    assert expected_records(per_file) == _count(per_file) == 4
    # unknown without reading: no total, unless max_documents bounds it
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5)))
    assert expected_records(SourceConfig(kind="jsonl", path=str(tmp_path / "d.jsonl"))) is None
    assert expected_records(SourceConfig(kind="text", path=str(txt_dir), per="line")) is None
    capped = SourceConfig(kind="jsonl", path=str(tmp_path / "d.jsonl"), max_documents=3)
    assert expected_records(capped) == _count(capped) == 3
    few = SourceConfig(kind="parquet", path=str(tmp_path), max_documents=4)
    assert expected_records(few) == _count(few) == 4


def test_read_and_exact_dedup_bars_have_a_total(tmp_path, capsys):
    cfg = load_config(TINY, [f"out_dir={tmp_path}", "progress=true", "workers=1",
                             "sources.0.include=[json/*,pydoc/a*]", "tokenizer.vocab_size=300"])
    run(cfg)
    err = capsys.readouterr().err
    # the stages run as tasks, one per shard: each bar counts its stage's tasks
    # tqdm with a total prints "n/total" and a percentage
    read = len(list((tmp_path / "stages" / "00_read" / "shards").glob("*.json")))
    assert read >= 2  # the stdlib files and the pydoc topics are separate read tasks
    assert re.search(rf"read: 100%.*\b{read}/{read} \[", err), err[-2000:]
    n = len(list((tmp_path / "stages" / "02_filter" / "docs").glob("part-*.parquet")))
    assert re.search(rf"exact_dedup hash: 100%.*\b{n}/{n} \[", err), err[-2000:]
