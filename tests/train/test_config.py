import pytest

from train.config import load_config


def test_defaults_preset_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  n_layer: 3\nsteps: 7\n")
    cfg = load_config(path, ["optim.lr=3e-4", "batch_size=4"])
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 64  # preset, then overridden
    assert cfg.steps == 7 and cfg.optim.lr == 3e-4 and cfg.batch_size == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["nonsense=1"], "nonsense"),
        (["model.preset=nope"], "nope"),
        (["mixed_precision=fp4"], "mixed_precision"),
        (["compile=maybe"], "compile must be one of auto, true, false, got 'maybe'"),
        (["compile_mode=fast"], "compile_mode must be one of default, reduce-overhead"),
        (["activation_checkpointing=some"], "activation_checkpointing"),
        (["steps=abc"], "steps"),
        (["steps"], "key=value"),
        (["model.n_head=3"], "n_head"),
    ],
)
def test_bad_config_is_refused_with_its_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_unknown_key_in_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config(path)


@pytest.mark.parametrize("value", ["no", "false", "False", "off", "null", "None", "none"])
def test_off_switches_read_yaml_booleans_and_nulls_as_off(value):
    """YAML reads `no`/`off`/`false` as False and `null` as None; the switches still mean off."""
    keys = ("mixed_precision", "activation_checkpointing", "tracker")
    cfg = load_config(None, [f"{key}={value}" for key in keys])
    assert (cfg.mixed_precision, cfg.activation_checkpointing, cfg.tracker) == ("no", "none", "none")


@pytest.mark.parametrize("value, expected", [("true", "true"), ("True", "true"), ("yes", "true"),
                                             ("auto", "auto"), ("false", "false"), ("no", "false"),
                                             ("off", "false"), ("null", "false")])
def test_compile_is_auto_true_or_false(value, expected):
    """`compile` takes auto (the default) and YAML's booleans in any spelling."""
    assert load_config(None, []).compile == "auto"
    assert load_config(None, [f"compile={value}"]).compile == expected


def test_off_switches_in_a_yaml_file_and_resume(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\nresume: false\n")
    cfg = load_config(path)
    assert cfg.mixed_precision == "no" and cfg.resume == "none"
    assert load_config(None, ["resume=null"]).resume == "none"
    assert load_config(None, ["resume=no"]).resume == "none"  # YAML's False, not a path "no"
    assert load_config(None, ["mixed_precision=bf16"]).mixed_precision == "bf16"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=0"], "optim.lr must be > 0, got 0"),
        (["optim.lr=-1e-3"], "optim.lr must be > 0"),
        (["eval_batches=0"], "eval_batches must be > 0, got 0"),
        (["optim.warmup_steps=-5"], "optim.warmup_steps must be >= 0, got -5"),
        (["seq_len=-4"], r"seq_len must be >= 0 \(0 = model.seq_len\), got -4"),
    ],
)
def test_bad_numbers_are_refused_at_config_time(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_seq_len_zero_means_the_models():
    assert load_config(None, ["seq_len=0"]).seq_len == 0


def test_preset_override_recomputes_derived_fields(tmp_path):
    """`small` derives its SwiGLU width 704 from d_model=256; d_model=384 must give 1024."""
    cfg = load_config(None, ["model.preset=small", "model.d_model=384"])
    assert cfg.model.ffn_hidden == 1024
    assert cfg.model.n_kv_head == 4  # set explicitly by the preset: kept
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: small\n  d_model: 384\n  n_head: 4\n  n_kv_head: null\n")
    cfg = load_config(path)
    assert (cfg.model.ffn_hidden, cfg.model.n_kv_head) == (1024, 4)
    assert load_config(None, ["model.d_model=384"]).model.ffn_hidden == 1024  # no preset
    assert load_config(None, ["model.preset=small"]).model.ffn_hidden == 704


def test_explicit_derived_fields_are_kept():
    cfg = load_config(None, ["model.preset=small", "model.d_model=384", "model.ffn_hidden=512"])
    assert cfg.model.ffn_hidden == 512
    # gpt2-124m sets ffn_hidden itself: a preset's explicit field stays
    assert load_config(None, ["model.preset=gpt2-124m", "model.d_model=384"]).model.ffn_hidden == 2048
    moe = load_config(None, ["model.preset=small", "model.n_experts=4", "model.n_experts_active=2",
                             "model.d_model=384"]).model
    assert moe.moe_ffn_hidden == moe.ffn_hidden == 1024


def test_get_preset_recomputes_derived_fields():
    from model.config import PRESETS, get_preset

    assert PRESETS["small"].ffn_hidden == 704
    assert get_preset("small", d_model=384).ffn_hidden == 1024
    assert get_preset("small", d_model=384, ffn_hidden=512).ffn_hidden == 512
    assert get_preset("llama2-70b", n_layer=2) == PRESETS["llama2-70b"].replace(n_layer=2)
