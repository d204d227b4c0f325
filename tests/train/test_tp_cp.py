"""Tensor and context parallelism split the model and the sequence, not what a step computes:
tp=2 (with and without sequence parallelism) and cp=2 on 2 gloo processes train the tiny model
of the pipeline tests on the same batches to the same losses and gradient norms as one
process, in float32, within rel 1e-5 (the ranks sum partial products in another order)."""

import json

import pytest

from tests.train.pipeline_worker import one_process
from tests.train.tp_worker import parallel_train
from train.parallel.procs import spawn

LAYOUTS = {"tp2-sp": (2, 1, True), "tp2": (2, 1, False), "cp2": (1, 2, True)}


def run_parallel(tmp_path, name: str, tie: bool, steps: int, nprocs: int = 2) -> dict:
    tp, cp, sp = LAYOUTS[name]
    path = tmp_path / f"{name}-{tie}.json"
    spawn(parallel_train, nprocs, tp, cp, sp, tie, steps, str(path))
    return json.loads(path.read_text())


def assert_same_training(par: dict, one: dict, rel: float = 1e-5) -> None:
    for key in ("loss", "grad_norm"):
        assert par[key] == pytest.approx(one[key], rel=rel), key
    assert one["loss"][-1] < one["loss"][0]  # it trained: not a vacuous comparison


@pytest.mark.parametrize("name", ["tp2-sp", "cp2"])
def test_two_ranks_train_as_one_process(tmp_path, name):
    """Fast tier: 3 steps, tied embeddings (the default model)."""
    par = run_parallel(tmp_path, name, True, 3)
    assert_same_training(par, one_process(True, 3))
    key = "tp_comm_s" if name.startswith("tp") else "cp_comm_s"
    assert len(par[key]) == 3 and all(s > 0 for s in par[key])  # the collectives were clocked


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_trains_as_one_process_for_50_steps(tmp_path, name, tie):
    one = one_process(tie, 50)
    assert_same_training(run_parallel(tmp_path, name, tie, 50), one)
    assert one["loss"][-1] < one["loss"][0] - 1.0
