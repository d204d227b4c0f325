import json
import sys

import pytest

from tests.utils import ROOT, run_cmd
from train.config import load_config
from train.distributed import build_accelerator


def train_cmd(data, out, *overrides):
    return [sys.executable, "-m", "train", "configs/train/tiny.yaml", f"data_dir={data}",
            f"out_dir={out}", *overrides]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # default tier under ~3 min on 2 busy cores
def test_loss_falls_over_50_steps(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_cmd(train_cmd(tiny_data, out, "steps=50"))
    summary = json.loads((out / "summary.json").read_text())
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(51))
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    assert records[-1]["loss"] < records[1]["loss"] - 0.5
    for key in ("tokens_per_s", "step_s", "data_wait_s", "mfu", "peak_mem_bytes"):
        assert records[-1][key] > 0, key
    # the ETA leaves out the warm-up steps (warmup_steps_excluded=2 in tiny.yaml)
    assert [r["eta_s"] for r in records[1:3]] == [None, None] and records[3]["eta_s"] > 0
    assert 0 < summary["mfu"]["median"] < 1
    machine = summary["peak_flops_machine"]  # one figure per machine, both CPU figures kept
    assert machine["method"] in ("theoretical", "measured") and machine["measured"]["flops"] > 0
    assert summary["peak_flops_per_process"]["median"] == machine["flops"]  # 1 process
    assert (out / "model.safetensors").is_file() and (out / "samples.txt").read_text()
    assert "data_dir" in (out / "config.yaml").read_text()
    assert "compile: 'false'" in (out / "config.yaml").read_text()  # compile=auto, settled on CPU
    assert summary["compile"] is False
    assert json.loads((out / "data_meta.json").read_text()) == json.loads(
        (tiny_data / "meta.json").read_text())
    assert summary["techniques"] == {
        "compile": False, "compile_scope": None, "compile_mode": None, "compile_optimizer": False,
        "fsdp": False, "activation_checkpointing": "none", "checkpoint_every_k": None,
        "checkpointed_layers": [], "mixed_precision": "no",
        "fused_optimizer": True}  # fused AdamW exists for CPU


@pytest.mark.slow
def test_two_processes_train_and_end_with_identical_weights(tiny_data, tmp_path):
    out = tmp_path / "run2"
    result = run_cmd(
        ["launch/cpu.sh", "configs/train/tiny.yaml", f"data_dir={tiny_data}", f"out_dir={out}",
         "steps=6", "eval_every=3", "tracker=none"],
        env={"NPROC": "2", "PY": sys.executable},
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2, result.stdout
    assert len(summary["rank_weight_sha256"]) == 2
    assert len(set(summary["rank_weight_sha256"])) == 1
    assert summary["final_val_loss"] < summary["initial_val_loss"]


def test_world_size_mismatch_fails_loudly(tiny_data, tmp_path):
    result = run_cmd(train_cmd(tiny_data, tmp_path / "r", "world_size=2"), check=False)
    assert result.returncode != 0
    assert "asked for world_size=2 but got 1" in result.stderr


def test_fp16_on_cpu_is_refused():
    cfg = load_config(ROOT / "configs/train/tiny.yaml", ["mixed_precision=fp16"])
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        build_accelerator(cfg)


def test_batch_not_divisible_is_refused(tiny_data, tmp_path):
    result = run_cmd(train_cmd(tiny_data, tmp_path / "r", "batch_size=6"), check=False)
    assert result.returncode != 0
    assert "batch_size=6 must be a multiple" in result.stderr
