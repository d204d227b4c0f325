"""The size rule (estimate.shapes) against published shapes: the check `probe` prints."""

import statistics

import pytest

from estimate import probe, shapes
from model.flops import count_params


@pytest.mark.parametrize("name, published", [
    ("Qwen2.5-7B", 7.61e9), ("Qwen3-8B", 8.19e9), ("Mistral-7B-v0.1", 7.24e9),
    ("Gemma-2-9B", 9.24e9), ("OLMo-2-7B", 7.30e9), ("Qwen2.5-0.5B", 0.49e9),
    # below 1B: MobileLLM Table 9 (arXiv:2402.14905), Pythia Table 1, Gemma 3 model cards
    ("MobileLLM-125M", 124.6e6), ("MobileLLM-350M", 345.3e6), ("MobileLLM-600M", 603.1e6),
    ("MobileLLM-1B", 1.0e9), ("MobileLLM-1.5B", 1.5e9), ("Pythia-160M", 162.3e6),
    ("Pythia-410M", 405.3e6), ("Gemma-3-270M", 268.1e6), ("Gemma-3-1B", 999.9e6),
])
def test_published_configs_give_their_published_sizes(name, published):
    """A transcription error in PUBLISHED_CONFIGS shows as a wrong parameter count (model cards)."""
    assert probe.config_params(*probe.PUBLISHED_CONFIGS[name]) == pytest.approx(published, rel=0.01)


def test_shape_check_covers_runs_and_configs():
    rows, summary = probe.shape_check()
    assert summary["config"]["n"] == len(probe.PUBLISHED_CONFIGS)
    assert summary["all"]["n"] == summary["run"]["n"] + summary["config"]["n"]
    assert all(r["rule_d"] > 0 and r["rule_L"] > 0 for r in rows)


def _total(summary, group):
    s = summary[group]
    return s["ln_d_abs"] + s["ln_L_abs"] + s["ln_ffn_abs"]


def test_mlp_ratio_is_the_shape_fit(monkeypatch):
    """The rule's MLP ratio leaves its depth unbiased on the published shapes and fits both sets
    (runs, other configs) better than Llama 3's 3.5 did."""
    _, fitted = probe.shape_check()
    assert abs(fitted["all"]["ln_L"]) <= 0.05
    monkeypatch.setattr(shapes, "FFN_RATIO", 3.5)
    _, llama3 = probe.shape_check()
    assert llama3["all"]["ln_L"] < -0.05  # 3.5: the rule too shallow
    for group in ("run", "config"):
        assert _total(fitted, group) < _total(llama3, group)


def test_135m_is_deep_and_narrow_at_its_size():
    """135M parameters (SmolLM: 30 blocks of 576; MobileLLM 125M the same) give a model of many
    narrow blocks, not one block beside a 128K vocabulary's embedding (the rule before
    2026-12-08: one block of width 1024)."""
    c = shapes.shape_from_size(135e6)
    assert c.n_layer >= 10 and c.d_model <= 768
    assert count_params(c) == pytest.approx(135e6, rel=0.10)
    assert c.d_model % c.n_head == 0 and c.n_head % c.n_kv_head == 0


def _errors(rows):
    return sum(statistics.fmean(abs(r[k]) for r in rows) for k in ("ln_d", "ln_L", "ln_ffn"))


def test_small_rule_fits_published_shapes_below_1b_and_keeps_the_rest(monkeypatch):
    """Below 1B the rule's width, depth and MLP errors on the published shapes are at most half
    those of the Llama 3 rule extended down, every shape within the 10% size check; at and
    above 1B its shapes are the Llama 3 rule's."""
    rows, _ = probe.shape_check()
    small = [r for r in rows if r["params"] < shapes.SMALL_BELOW]
    assert len(small) >= 10
    for r in small:
        assert count_params(shapes.shape_from_size(r["params"])) == pytest.approx(r["params"], rel=0.10), r["name"]
    monkeypatch.setattr(shapes, "SMALL_BELOW", 0)  # the Llama 3 anchors all the way down
    old, _ = probe.shape_check()
    old_small = [r for r in old if r["params"] < 1e9]
    assert _errors(small) < 0.5 * _errors(old_small)
    big = [(r["name"], r["rule_d"], r["rule_L"], r["rule_ffn_ratio"]) for r in rows if r["params"] >= 1e9]
    assert big == [(r["name"], r["rule_d"], r["rule_L"], r["rule_ffn_ratio"]) for r in old if r["params"] >= 1e9]
