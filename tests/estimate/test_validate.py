import math
import statistics

import pytest

from estimate.validate import check_run, load_runs, summarize, validate

REQUIRED_RUNS = ["GPT-3 175B", "OPT-175B", "BLOOM-176B", "LLaMA-65B", "Llama 2 70B",
                 "Llama 3.1 405B", "DeepSeek-V3", "PaLM 540B"]


def test_published_runs_cited():
    runs = load_runs()
    names = [r["name"] for r in runs]
    for name in REQUIRED_RUNS:
        assert name in names
    for r in runs:
        assert r["citations"], r["name"]
        for c in r["citations"]:
            assert len(c["source"]) > 15 and c["what"]


def test_key_published_figures():
    runs = {r["name"]: r for r in load_runs()}
    assert runs["LLaMA-65B"]["reported"]["accelerator_hours"] == 1022362
    assert runs["Llama 2 70B"]["reported"]["accelerator_hours"] == 1720320
    assert runs["BLOOM-176B"]["reported"]["accelerator_hours"] == 1082990
    assert runs["OPT-175B"]["reported"]["accelerator_hours"] == 992 * 34 * 24
    assert runs["Llama 3.1 405B"]["reported"]["accelerator_hours"] == pytest.approx(30.84e6)
    assert runs["DeepSeek-V3"]["reported"]["accelerator_hours"] == pytest.approx(2.664e6)
    assert runs["PaLM 540B"]["reported"]["accelerator_hours"] == 6144 * 1200 + 3072 * 336
    assert runs["GPT-3 175B"]["reported"]["accelerator_hours"] is None  # not in the paper


def test_validate_runs_and_summary_statistics():
    checks, stats = validate()
    assert stats["n"] == sum(c.reported_hours is not None for c in checks) >= 8
    errors = [c.error for c in checks if c.error is not None]
    assert all(math.isfinite(e) for e in errors)
    assert stats["median_abs_pct_error"] == pytest.approx(statistics.median(100 * abs(e) for e in errors))
    for c in checks:
        lo, hi = c.predicted_range
        assert lo < c.predicted_hours < hi


def test_prediction_does_not_use_the_runs_own_mfu():
    runs = {r["name"]: r for r in load_runs()}
    palm = runs["PaLM 540B"]
    changed = dict(palm, reported=dict(palm["reported"], mfu=0.99))
    assert check_run(changed).predicted_hours == check_run(palm).predicted_hours


def test_implied_mfu_and_derived_hours_by_hand():
    runs = {r["name"]: r for r in load_runs()}
    llama = check_run(runs["LLaMA-65B"])
    flops = 1.4e12 * (6 * 65.2e9 + 12 * 80 * 8192 * 2048)
    assert llama.projection.total_model_flops == pytest.approx(flops)
    assert llama.implied_mfu == pytest.approx(flops / (1022362 * 3600 * 312e12))
    gpt3 = check_run(runs["GPT-3 175B"])
    assert gpt3.hours_derived and gpt3.reported_hours == pytest.approx(10000 * 14.8 * 24)
    # GPT-3's own FLOP count (6ND, 3.14e23) is close to ours (6N + attention)
    assert 1.0 < gpt3.flops_ratio < 1.1


def test_summarize_empty():
    assert summarize([]) == {"n": 0}


def test_load_runs_rejects_uncited(tmp_path):
    bad = tmp_path / "runs.yaml"
    bad.write_text(
        "runs:\n  - {name: x, model: tiny, params: 1, active_params: 1, tokens: 1B, accelerator: TPU-v4,\n"
        "     precision: bf16, count: 1, citations: [], uncertain: [],\n"
        "     reported: {accelerator_hours: 1, days: null, flops: null, mfu: null}}\n")
    with pytest.raises(ValueError, match="citations"):
        load_runs(bad)
