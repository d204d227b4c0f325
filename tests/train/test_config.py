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
        (["mixed_precision=fp8"], "mixed_precision"),
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


def test_off_switches_in_a_yaml_file_and_resume(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\nresume: false\n")
    cfg = load_config(path)
    assert cfg.mixed_precision == "no" and cfg.resume == "none"
    assert load_config(None, ["resume=null"]).resume == "none"
    assert load_config(None, ["resume=no"]).resume == "none"  # YAML's False, not a path "no"
    assert load_config(None, ["mixed_precision=bf16"]).mixed_precision == "bf16"
