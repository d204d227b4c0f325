"""Trackers: wandb online only with credentials (an explicit WANDB_MODE wins), TensorBoard event
files with the step metrics, and configs flattened to the scalars TensorBoard's hparams accept."""

import sys

import pytest

from tests.utils import run_cmd
from train.config import TrainConfig, load_config
from train.trackers import flat_config, log_with, wandb_has_credentials, wandb_mode


def test_wandb_mode(tmp_path):
    netrc = tmp_path / "netrc"
    no_file = {"NETRC": str(tmp_path / "missing")}
    assert wandb_mode(no_file) == "offline"
    assert wandb_mode({**no_file, "WANDB_API_KEY": "k" * 40}) == "online"
    assert wandb_mode({**no_file, "WANDB_API_KEY": "k" * 40, "WANDB_MODE": "disabled"}) == "disabled"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_has_credentials({"NETRC": str(netrc)})
    assert wandb_mode({"NETRC": str(netrc)}) == "online"
    # a key for another host (a self-hosted server not configured) is not a wandb login
    assert not wandb_has_credentials({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"})


def test_log_with(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert log_with("wandb") == "wandb"
    assert log_with("tensorboard") == "tensorboard"
    assert log_with("none") is None
    with pytest.raises(ValueError, match="valid: wandb, tensorboard, none"):
        log_with("mlflow")
    with pytest.raises(ValueError, match="tracker must be one of wandb, tensorboard, none, got 'mlflow'"):
        load_config("configs/train/tiny.yaml", ["tracker=mlflow"])


def test_flat_config():
    flat = flat_config(TrainConfig())
    assert flat["model.d_model"] == TrainConfig().model.d_model
    assert flat["optim.lr"] == TrainConfig().optim.lr
    assert flat["inject_nan_at_steps"] == "[]"
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())


@pytest.mark.slow  # a trainer run with tensorboard: 5 s: the default tier stays under 3 minutes
def test_tensorboard_run(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_cmd([sys.executable, "-m", "train", "configs/train/tiny.yaml", f"data_dir={tiny_data}",
             f"out_dir={out}", "steps=4", "eval_every=4", "tracker=tensorboard"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert {"tokens_per_s", "mfu", "val_loss", "step_s"} <= set(events.Tags()["scalars"])
