"""Bad input at the command line: refused early, in one line, blaming the right place
(issue 15 items 5 and 8)."""

import errno
import importlib
import re
import sys
from pathlib import Path

import pytest

from contracts.cli import DEBUG_ENV, NoSpace, report, run_main
from tests.utils import ROOT, run_cmd

TRAIN_CONFIG = "configs/train/tiny.yaml"
PREP_CONFIG = "configs/prep/tiny.yaml"


@pytest.mark.parametrize("module, path", [("train.config", TRAIN_CONFIG),
                                          ("data_prep.config", PREP_CONFIG)])
def test_unknown_override_is_blamed_on_the_command_line(module, path):
    load_config = importlib.import_module(module).load_config
    with pytest.raises(ValueError) as e:
        load_config(ROOT / path, ["no_such_key=1"])
    message = str(e.value)
    assert "command-line override 'no_such_key=1'" in message
    assert path not in message  # not blamed on the YAML file


def test_run_main_prints_one_line_and_exits_2(capsys, monkeypatch):
    def bad():
        raise ValueError("optim.lr must be > 0, got 0")

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_main(bad) == 2
    assert capsys.readouterr().err == "error: optim.lr must be > 0, got 0\n"
    assert run_main(lambda: None) == 0
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        run_main(bad)
    with pytest.raises(FileNotFoundError):
        report(FileNotFoundError("x"))


def _one_error_line(stderr: str, *words: str) -> None:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert "Traceback" not in stderr, stderr
    for word in words:
        assert word in lines[-1], stderr


@pytest.mark.slow  # several trainer CLI runs: 9 s: the default tier stays under 3 minutes
def test_train_user_errors_are_one_line(tmp_path):
    """A bad value at config time, and a missing dataset at run time (a traceback before)."""
    bad = run_cmd([sys.executable, "-m", "train", TRAIN_CONFIG, "eval_batches=0"], check=False)
    assert bad.returncode == 2
    _one_error_line(bad.stderr, "eval_batches must be > 0, got 0")
    missing = tmp_path / "nothing"
    result = run_cmd([sys.executable, "-m", "train", TRAIN_CONFIG, f"data_dir={missing}",
                      f"out_dir={tmp_path / 'run'}", "tracker=none"], check=False)
    assert result.returncode == 2
    _one_error_line(result.stderr, str(missing))
    debug = run_cmd([sys.executable, "-m", "train", TRAIN_CONFIG, f"data_dir={missing}",
                     f"out_dir={tmp_path / 'run'}", "tracker=none"], env={DEBUG_ENV: "1"},
                    check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("module", ["train.generate", "train.export"])
def test_generate_and_export_missing_run_is_one_line(module, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    args = [str(tmp_path / "nope")] + ([str(tmp_path / "out")] if module == "train.export" else [])
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(args)
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, "nope")


def test_prep_and_estimate_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from data_prep.__main__ import main as prep
    from estimate.__main__ import main as estimate

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert prep([str(tmp_path / "missing.yaml")]) == 2
    _one_error_line(capsys.readouterr().err, "missing.yaml")
    assert estimate(["project", "--model", "nope", "--tokens", "1T", "--accelerator", "H100"]) == 2
    _one_error_line(capsys.readouterr().err, "nope")


def test_console_scripts_exist_and_answer_help(capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"tokenclock-train", "tokenclock-prep", "tokenclock-estimate"}
    for name, target in scripts.items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name


def test_train_help_lists_keys_defaults_and_presets(capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for text in ("optim.lr=0.001", "eval_batches=8", "model.ffn_hidden=(derived)",
                 "--print-config", "small", "llama3-405b", DEBUG_ENV):
        assert text in out, text


def test_print_config_prints_the_resolved_config_and_exits(capsys):
    from train.__main__ import main

    assert main([TRAIN_CONFIG, "model.preset=small", "model.d_model=384", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "d_model: 384" in out and "ffn_hidden: 1024" in out and "data_dir:" in out


def test_model_too_big_for_the_device_is_refused_before_allocation(tiny_data, tmp_path):
    """d_model=16384 n_layer=64 (~3.5 TB to train) used to fail after ~51 s in the allocator
    with a 35-line traceback; now it is refused with the estimate before build_model."""
    result = run_cmd([sys.executable, "-m", "train", TRAIN_CONFIG, f"data_dir={tiny_data}",
                      f"out_dir={tmp_path / 'run'}", "tracker=none", "model.d_model=16384",
                      "model.n_layer=64", "model.n_head=128"], check=False)
    assert result.returncode == 2
    _one_error_line(result.stderr, "the model does not fit", "GB (weights", "activations",
                    "micro_batch_size=")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_space_names_the_path_and_the_size(tmp_path, monkeypatch):
    from train import rundir

    with pytest.raises(NoSpace, match=rf"^no space left on device: {tmp_path} needs ~3 MB$"):
        with rundir.disk_space(tmp_path, 3_000_000):
            _enospc()
    # torch.save's report of a full disk carries no errno: the free space decides
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty free: not the disk
        with rundir.disk_space(tmp_path, 10):
            raise RuntimeError("unexpected pos 1053760 vs 1053648")
    monkeypatch.setattr(rundir, "_free_bytes", lambda path: 100)
    with pytest.raises(NoSpace, match="needs ~1 MB"):
        with rundir.disk_space(tmp_path / "summary.json", lambda: 1_000_000):
            raise RuntimeError("unexpected pos 1053760 vs 1053648")


def _train_in_process(tiny_data, out, *overrides) -> int:
    from train.__main__ import main

    return main([TRAIN_CONFIG, f"data_dir={tiny_data}", f"out_dir={out}", "tracker=none",
                 "steps=2", "eval_every=2", "eval_batches=1", "sample_tokens=4", *overrides])


@pytest.mark.parametrize("where", ["checkpoint", "summary", "config"])
def test_full_disk_is_one_line(where, tiny_data, tmp_path, capsys, monkeypatch):
    """A full disk during a run's writes: one line naming the path and the size needed (was
    `unexpected pos 1053760 vs 1053648` and a traceback)."""
    from train import checkpoint, rundir

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    out = tmp_path / "run"
    if where == "checkpoint":
        monkeypatch.setattr(checkpoint.Checkpointer, "save", _enospc)
        expected = rf"{out / 'checkpoints'} needs ~\d+ MB"
    elif where == "summary":
        def torn(*args):
            raise RuntimeError("unexpected pos 1053760 vs 1053648")
        monkeypatch.setattr(rundir, "write_summary", torn)
        monkeypatch.setattr(rundir, "_free_bytes", lambda path: 0)
        expected = rf"{out / 'summary.json'} needs ~1 MB"
    else:
        monkeypatch.setattr(Path, "write_text", _enospc)
        expected = rf"{out} needs ~\d+ MB"
    assert _train_in_process(tiny_data, out, "checkpoint_every=2") == 2
    err = capsys.readouterr().err
    _one_error_line(err, "no space left on device: ")
    assert re.search(expected, err.splitlines()[-1]), err
