import pytest
import yaml

from estimate.target import resolve_target
from model.config import get_preset
from model.flops import count_params, model_flops_per_token


def test_preset_target_matches_model_flops():
    t = resolve_target("llama3-405b")
    cfg = get_preset("llama3-405b")
    assert t.model_flops_per_token == pytest.approx(model_flops_per_token(cfg))
    assert t.params == count_params(cfg)
    # 6N + attention: N is the matmul weights, the attention term is 12 * L * d * T
    assert t.attention_flops_per_token == pytest.approx(12 * 126 * 16384 * 8192)
    assert t.model_flops_per_token == pytest.approx(6 * t.active_params + t.attention_flops_per_token)


def test_moe_uses_active_parameters():
    t = resolve_target("deepseek-v3")
    assert t.is_moe
    assert 600e9 < t.params < 720e9  # ~671B total
    assert 30e9 < t.active_params < 45e9  # ~37B active
    # per-token FLOPs are far below what the total parameter count would give
    assert t.model_flops_per_token < 0.1 * 6 * t.params
    assert t.model_flops_per_token == pytest.approx(6 * t.active_params + t.attention_flops_per_token)


def test_params_override_on_dense_and_moe():
    dense = resolve_target("llama2-70b", params=70e9)
    assert dense.active_params == 70e9 and dense.params == 70e9
    assert dense.model_flops_per_token == pytest.approx(6 * 70e9 + 12 * 80 * 8192 * 4096)
    moe = resolve_target("deepseek-v3", params=671e9)
    assert moe.params == 671e9
    assert moe.active_params == resolve_target("deepseek-v3").active_params  # FLOPs unchanged
    both = resolve_target("deepseek-v3", params=671e9, active_params=37e9)
    assert both.active_params == 37e9


def test_size_becomes_a_stated_shape():
    """Issue 19: a size is a shape by estimate.shapes' rule (printed in the notes)."""
    t = resolve_target(params=8.03e9)
    # Llama 3 8B's size: its width, kv heads and vocabulary; the MLP at the rule's 3.0 x d_model
    # (fitted on published shapes, estimate.shapes) rather than Llama 3's 3.5, so 36 layers, not 32
    assert t.cfg is not None and (t.cfg.d_model, t.cfg.n_layer) == (4096, 36)
    assert (t.cfg.n_kv_head, t.cfg.ffn_hidden, t.cfg.vocab_size) == (8, 12288, 128256)
    assert "d_model 4096" in t.notes[0] and "context 4096" in t.notes[0]
    assert t.attention_flops_per_token > 0
    moe = resolve_target(params=100e9, active_params=10e9)
    assert moe.is_moe and moe.cfg.n_experts_active == 8
    assert moe.active_params == pytest.approx(10e9, rel=0.1)
    assert count_params(moe.cfg) == pytest.approx(100e9, rel=0.05)
    mixtral = resolve_target(params=46.7e9, active_params=12.9e9, experts=8)
    assert mixtral.cfg.n_experts == 8 and mixtral.cfg.n_experts_active == 2
    with pytest.raises(ValueError, match="give a model"):
        resolve_target()
    with pytest.raises(ValueError, match="exceeds"):
        resolve_target(params=1e9, active_params=2e9)


def test_recompute_ratios_ordered():
    r = resolve_target("gpt2-124m").recompute_ratio
    assert r["none"] == 1.0 < r["selective"] < r["full"] < 1.5


def test_seq_len_changes_attention_term_only():
    short = resolve_target("llama2-70b", seq_len=2048)
    long = resolve_target("llama2-70b", seq_len=8192)
    assert long.active_params == short.active_params
    assert long.attention_flops_per_token == pytest.approx(4 * short.attention_flops_per_token)


def test_yaml_model_file_and_run_config(tmp_path):
    fields = {"vocab_size": 1000, "seq_len": 128, "n_layer": 2, "d_model": 64, "n_head": 4}
    bare = tmp_path / "m.yaml"
    bare.write_text(yaml.safe_dump(fields))
    run_cfg = tmp_path / "config.yaml"
    run_cfg.write_text(yaml.safe_dump({"model": fields, "lr": 3e-4}))
    a, b = resolve_target(str(bare)), resolve_target(str(run_cfg))
    assert a.name == "m"
    assert a.model_flops_per_token == b.model_flops_per_token > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(fields | {"n_layers": 3}))
    with pytest.raises(ValueError, match="unknown model field"):
        resolve_target(str(bad))


def test_unknown_model_lists_presets():
    with pytest.raises(ValueError, match="llama3-405b"):
        resolve_target("llama-9000")
