"""The file contracts: readers refuse what they cannot read with one line naming it, and
tolerate what a crash leaves behind."""

import json

import pytest

from contracts.checkpoint import verify_checkpoint, write_manifest
from contracts.dataset import DatasetMeta, read_dataset_meta, write_dataset_meta
from contracts.run import read_metrics, read_summary


def test_torn_metrics_line_is_skipped_and_reported(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    records, torn = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1] and torn
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)
    assert read_metrics(tmp_path / "none.jsonl") == ([], False)


def test_torn_metrics_tail_cut_inside_a_utf8_character_is_torn_too(tmp_path):
    """A crash mid-append can cut a multi-byte character (or leave junk bytes): the tail is
    torn like a cut JSON record; the same bytes mid-file are an error naming file and line."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1}\n{"step": 2, "note": "\xc3')
    records, torn = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1] and torn
    path.write_bytes(b'{"step": 0}\n\xff\xfe\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"^{path}: line 2 is not UTF-8$"):
        read_metrics(path)


def test_dataset_meta_round_trip_and_refusals(tmp_path):
    meta = DatasetMeta(tmp_path, "uint16", 4096, 0, "<|endoftext|>", "tokenizer.json", "abc",
                       {"train": {"shards": ["train_000000.bin"], "tokens": 3, "documents": 1}})
    write_dataset_meta(meta)
    back = read_dataset_meta(tmp_path)
    assert back.to_dict() == meta.to_dict() and back.created_utc
    assert back.shard_paths("train") == [tmp_path / "train_000000.bin"]
    with pytest.raises(ValueError, match="split 'val' not in"):
        back.shard_paths("val")
    (tmp_path / "meta.json").write_text(json.dumps({**meta.to_dict(), "format": 9}))
    with pytest.raises(ValueError, match="format 9 is not supported"):
        read_dataset_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare a dataset first"):
        read_dataset_meta(tmp_path / "nowhere")


def test_summary_reader_names_what_is_missing(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match="missing key"):
        read_summary(tmp_path)
    with pytest.raises(ValueError, match="no summary.json"):
        read_summary(tmp_path / "nowhere")


def test_manifest_catches_a_flipped_byte(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    write_manifest(tmp_path, 3, {"x": 1})
    assert verify_checkpoint(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"0123456780")
    assert "does not match its SHA-256" in verify_checkpoint(tmp_path)
