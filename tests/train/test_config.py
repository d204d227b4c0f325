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
