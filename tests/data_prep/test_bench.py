"""python -m data_prep.bench on the tiny config: every stage timed, rates positive, and the
document counts those of an ordinary run of the pipeline."""

from __future__ import annotations

import importlib.util
import json

from data_prep.bench import main

from .conftest import TINY


def test_bench_tiny(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([str(TINY), "--repeats", "1", "--labelled-bases", "0", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["repeats"] == 1
    rows = {r["name"]: r for r in result["rows"]}
    report = json.loads((tiny_dir / "report.json").read_text())  # the same config, run normally
    names = [s["name"] for s in report["stages"]]
    assert names == ["read", "normalize", "filter", "exact_dedup", "near_dedup", "pii",
                     "tokenizer", "pack"]
    for st in report["stages"]:
        row = rows[st["name"]]
        assert st["name"] in table
        assert (row["docs"], row["bytes"]) == (st["total"]["docs_in"], st["total"]["bytes_in"])
        for step in st["steps"] if st["name"] != "read" else []:
            assert rows[f"{st['name']}/{step['name']}"]["docs"] == step["docs_in"]
    assert rows["filter/gopher_quality"]["docs"] > 0  # the filter steps are there, one by one
    assert rows["pipeline"]["docs"] == report["invariant"]["records_in"]
    near_in = rows["near_dedup"]["docs"]
    timed = ["near_dedup: signatures", "minhash serial",
             f"minhash parallel ({result['workers']} workers)"]
    if importlib.util.find_spec("datasketch"):  # in the dev extra: the side-by-side comparison
        timed.append("datasketch serial")
        assert "MinHash signatures on one core (128 permutations, word 5-grams)" in table
    for name in timed:
        assert rows[name]["docs"] == near_in and name in table
    for row in result["rows"]:
        assert not row["disabled"], row
        assert row["seconds"] > 0 and row["docs_per_s"] > 0 and row["mb_per_s"] > 0, row
        assert len(row["seconds_each"]) == 1


def test_markdown_has_the_measured_header():
    """The Markdown starts with contracts.measured.header: title, date, machine, torch, command."""
    from data_prep.bench import markdown

    result = {"config": "configs/prep/tiny.yaml", "overrides": [], "repeats": 1, "workers": 1,
              "cpus": 2, "rows": []}
    text = markdown(result, ["python", "-m", "data_prep.bench", "--repeats", "1"])
    lines = text.splitlines()
    assert lines[0] == "# data_prep bench"
    for key in ("- date: ", "- machine: ", "- torch ", "- command: `python -m data_prep.bench"):
        assert any(ln.startswith(key) for ln in lines), key
    assert "data_prep bench: configs/prep/tiny.yaml" in text


def test_publish_never_overwrites_a_table_of_the_same_day(tmp_path, monkeypatch):
    import data_prep.bench as bench_mod

    monkeypatch.setattr(bench_mod, "dated_path", lambda n: tmp_path / f"{n}-2026-12-07.md")
    assert bench_mod.unused_name("data_prep-scale-ray") == "data_prep-scale-ray"
    (tmp_path / "data_prep-scale-ray-2026-12-07.md").write_text("earlier")
    assert bench_mod.unused_name("data_prep-scale-ray") == "data_prep-scale-ray-2"
    (tmp_path / "data_prep-scale-ray-2-2026-12-07.md").write_text("second")
    assert bench_mod.unused_name("data_prep-scale-ray") == "data_prep-scale-ray-3"
