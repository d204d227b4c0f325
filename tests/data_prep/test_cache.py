"""Re-runs skip finished stages; a changed config re-runs exactly the stages it affects."""

from __future__ import annotations

import json

from data_prep import load_config, run
from data_prep.__main__ import main

from .conftest import TINY


def cached(out) -> dict[str, bool]:
    report = json.loads((out / "report.json").read_text())
    return {s["name"]: s["cached"] for s in report["stages"]}


def test_reruns_skip_and_changes_rerun_downstream(tmp_path):
    base = [f"out_dir={tmp_path}", "progress=false", "workers=1", "sources.0.include=[json/*,pydoc/a*]"]
    out = run(load_config(TINY, base))
    first = json.loads((out / "meta.json").read_text())
    assert not any(cached(out).values())

    run(load_config(TINY, base))
    assert all(cached(out).values())
    assert json.loads((out / "meta.json").read_text())["splits"] == first["splits"]

    run(load_config(TINY, [*base, "filters.gopher_quality.min_words=60"]))
    assert cached(out) == {
        "read": True, "normalize": True, "filter": False, "exact_dedup": False,
        "near_dedup": False, "pii": False, "tokenizer": False, "pack": False,
    }

    run(load_config(TINY, [*base, "filters.gopher_quality.min_words=60", "tokenizer.vocab_size=300"]))
    c = cached(out)
    assert not c["tokenizer"] and not c["pack"]
    assert all(v for k, v in c.items() if k not in ("tokenizer", "pack"))
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 300

    run(load_config(TINY, [*base, "filters.gopher_quality.min_words=60", "tokenizer.vocab_size=300",
                           "shards.shard_tokens=5000"]))
    c = cached(out)
    assert not c["pack"] and all(v for k, v in c.items() if k != "pack")
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert sorted(p.name for p in out.glob("train_*.bin")) == meta["splits"]["train"]["shards"]


def test_cli(tmp_path, capsys):
    assert main([str(TINY), f"out_dir={tmp_path}", "progress=false", "sources.0.include=[json/*]"]) == 0
    assert (tmp_path / "meta.json").exists() and (tmp_path / "report.md").exists()
    assert main([str(TINY), "tokenizer.vocab_sise=3"]) == 2
    assert "tokenizer.vocab_sise" in capsys.readouterr().err
