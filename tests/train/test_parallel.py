"""Data parallelism changes how a step's work is split, not what the step computes.

2 processes with micro-batch B each and 1 process with micro-batch 2B see the same windows in
every step: the loader deals a seeded permutation round-robin (rank r takes positions r, r+2,
r+4, ...), so the two ranks' first B windows are exactly the first 2B windows the single
process takes, and likewise for every later micro-batch of the epoch. The loss is a sum over
tokens divided by the step's global token count, so the gradient, and the update, must be the
same up to float summation order.
"""

import json
import sys

import pytest
from safetensors.torch import load_file

from tests.utils import run_cmd

# Real training subprocesses: `make test-slow` (CI runs both tiers).
pytestmark = pytest.mark.slow

COMMON = ["steps=3", "eval_every=100", "eval_batches=1", "sample_tokens=1", "tracker=none",
          "optim.warmup_steps=1"]  # fp32 (the default precision)


def train(data, out, nproc: int, port: int, *overrides: str) -> tuple[list[dict], dict]:
    """Per-step metrics and final weights of a run (1 process without the launcher)."""
    args = ["configs/train/tiny.yaml", f"data_dir={data}", f"out_dir={out}", *COMMON, *overrides]
    if nproc == 1:
        run_cmd([sys.executable, "-m", "train", *args])
    else:
        run_cmd(["launch/cpu.sh", *args],
                env={"NPROC": str(nproc), "PY": sys.executable, "MASTER_PORT": str(port)})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    "accumulation, sharding",
    [(1, "fsdp=false"), (2, "fsdp=false"), (2, "fsdp=true")],
    ids=["ddp", "ddp-accumulation-2", "fsdp2-accumulation-2"],
)
def test_two_processes_equal_one_process_with_twice_the_batch(tiny_data, tmp_path, accumulation,
                                                              sharding):
    """DDP, and FSDP2 (each rank holds half of every parameter and optimizer state)."""
    B = 4
    batch = 2 * B * accumulation  # global sequences per step, the same in both runs
    port = 29610 + accumulation + 10 * (sharding == "fsdp=true")
    steps2, weights2 = train(tiny_data, tmp_path / "two", 2, port,
                             f"batch_size={batch}", f"micro_batch_size={B}", sharding)
    steps1, weights1 = train(tiny_data, tmp_path / "one", 1, port,
                             f"batch_size={batch}", f"micro_batch_size={2 * B}")
    assert [r["tokens"] for r in steps1] == [r["tokens"] for r in steps2]
    # the same loss and gradient norm at every step: the same data and the same gradients
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in steps2] == pytest.approx([r[key] for r in steps1], rel=1e-5), key
    assert steps1[-1]["loss"] < steps1[0]["loss"]  # the weights did move: not a vacuous check
    # The same weights after 3 AdamW steps. Each step moves a weight by about lr (Adam's
    # update is ~ g / sqrt(v)); where a gradient is ~0 that ratio can amplify a rounding
    # difference to a fraction of lr for a single weight. So: every weight within 3% of lr,
    # and each tensor's difference 1000 times smaller than one step's change, lr * sqrt(numel).
    lr = 3e-3  # configs/train/tiny.yaml
    assert weights1.keys() == weights2.keys()
    for name, w1 in weights1.items():
        diff = weights2[name] - w1
        assert diff.abs().max() < 0.03 * lr, f"{name}: max |difference| {diff.abs().max():.2e}"
        assert diff.norm() < 1e-3 * lr * w1.numel() ** 0.5, f"{name}: {diff.norm():.2e}"
