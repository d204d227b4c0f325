"""Pipeline parallelism splits the model, not what a step computes: pp=2 processes under each
schedule train the same tiny model on the same batches to the same losses and gradient norms
as one process, in float32, over 50 steps within rel 1e-5 on the loss and 5e-5 on the gradient
norm (measured before the fused projections at most 1.2e-6 on the loss and 6.3e-6 on the
gradient norm, after them 1.1e-5 on the gradient norm of one step of ZB-V and DualPipeV with tied
embeddings: the two sides sum the loss and the gradients in another order, nothing else
differs). Tied and untied embeddings both: tied, the first and the last stage
each hold the matrix and sum its gradients. dp=2 x pp=2 on 4 processes likewise."""

import json

import pytest

from tests.train.pipeline_worker import dp_pipelined, one_process, pipelined
from train.parallel.pipeline import block_ranges, bubble_formula, rank_stages, split
from train.parallel.procs import spawn

SCHEDULES = ["gpipe", "1f1b", "interleaved", "zero_bubble", "dualpipev"]


def run_pipelined(tmp_path, schedule: str, tie: bool, steps: int, microbatches: int = 4) -> dict:
    path = tmp_path / f"{schedule}-{tie}.json"
    spawn(pipelined, 2, schedule, microbatches, tie, steps, str(path))
    return json.loads(path.read_text())


def assert_same_training(pp: dict, one: dict) -> None:
    for key, rel in (("loss", 1e-5), ("grad_norm", 5e-5)):
        assert pp[key] == pytest.approx(one[key], rel=rel), key
    assert one["loss"][-1] < one["loss"][0]  # it trained: not a vacuous comparison
    assert all(0 <= b < 1 for b in pp["bubble"])


def test_pipeline_1f1b_tied_trains_as_one_process(tmp_path):
    """Fast tier: 3 steps of 1F1B with tied embeddings (the default model)."""
    assert_same_training(run_pipelined(tmp_path, "1f1b", True, 3), one_process(True, 3))


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_trains_as_one_process_for_50_steps(tmp_path, schedule, tie):
    one = one_process(tie, 50)
    assert_same_training(run_pipelined(tmp_path, schedule, tie, 50), one)
    assert one["loss"][-1] < one["loss"][0] - 1.0  # 50 steps learn a lot of a fixed batch set


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_dp2_x_pp2_trains_as_one_process(tmp_path, tie):
    """4 processes: 2 replicas of a 2-stage 1F1B pipeline, each replica half of every batch;
    gradients summed over the replicas, the loss divided by the global token count."""
    path = tmp_path / "dp-pp.json"
    spawn(dp_pipelined, 4, 2, "1f1b", 2, tie, 10, str(path))
    assert_same_training(json.loads(path.read_text()), one_process(tie, 10))


def test_blocks_split_evenly_with_the_extra_on_the_first_stages():
    assert block_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert block_ranges(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    with pytest.raises(ValueError, match="n_layer >= 4"):
        block_ranges(3, 4)


def test_stage_placement_looped_and_v():
    assert [rank_stages("1f1b", 4, r) for r in range(4)] == [[0], [1], [2], [3]]
    assert [rank_stages("interleaved", 2, r) for r in range(2)] == [[0, 2], [1, 3]]
    # V: both ends of the model on rank 0
    assert [rank_stages("dualpipev", 2, r) for r in range(2)] == [[0, 3], [1, 2]]
    assert [rank_stages("zero_bubble", 3, r) for r in range(3)] == [[0, 5], [1, 4], [2, 3]]


def test_bubble_formulas():
    assert bubble_formula("1f1b", 2, 4) == pytest.approx(1 / 5)
    assert bubble_formula("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_formula("interleaved", 2, 8) == pytest.approx(1 / 17)
    assert bubble_formula("dualpipev", 2, 8) is None


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="parallel.schedule='pipedream'"):
        split(None, "pipedream", 4)


@pytest.mark.slow  # a 2-process bench run, 4 s
def test_bench_pp_prints_measured_bubble_beside_the_formula(capfd):
    from train.parallel.bench_pp import main

    main(["--schedules", "1f1b", "dualpipev", "--microbatches", "4", "--steps", "1",
          "--warmup", "0", "--mb", "1", "--n_layer", "4", "--d_model", "64", "--seq", "16"])
    rows = {line.split()[0]: line.split() for line in capfd.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("1f1b", "dualpipev")}
    assert rows["1f1b"][1] == "4" and rows["1f1b"][-2] == "0.200"  # (p-1)/(m+p-1), p=2, m=4
    assert 0 <= float(rows["1f1b"][-3]) < 1  # the measured mean idle share
    assert rows["dualpipev"][-1] in ("<", ">=") or rows["dualpipev"][-2] in ("<", ">=")


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
@pytest.mark.parametrize("pp, m", [(2, 4), (2, 8), (4, 4), (4, 8), (3, 6)])
def test_torch_orders_leave_the_formula_bubble_with_equal_stages(schedule, pp, m):
    """torch's own 1F1B and interleaved orders, run with equal stages and free transfers,
    idle every rank by exactly the formula; a slower last stage (the LM head) idles the
    other ranks more, the slowest one less."""
    from train.parallel.schedule_sim import simulated_bubble

    idle = simulated_bubble(schedule, pp, m)
    assert list(idle.values()) == pytest.approx([bubble_formula(schedule, pp, m)] * pp, abs=1e-12)
    slow_last = simulated_bubble(schedule, pp, m, head=0.3)
    assert slow_last[0] > idle[0] and slow_last[pp - 1] < idle[pp - 1]


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("interleaved", 2)])
@pytest.mark.parametrize("pp, m", [(2, 4), (2, 8), (4, 4), (4, 8), (3, 6)])
def test_perf_bubble_with_unequal_stages_against_torch_orders(schedule, v, pp, m):
    """estimate.perf's bubble for unequal stages (the steady state at the slowest rank) on
    torch's own orders: exact when the last stage is the slow one (the LM head and loss), an
    upper bound within 0.08 of the share when another one is."""
    from estimate.perf import bubble_fraction, rank_costs
    from train.parallel.schedule_sim import interleaved_order, one_f_one_b_order, simulate

    n, chunk = pp * v, 2.0 / v
    orders = one_f_one_b_order(pp, m) if v == 1 else interleaved_order(pp, v, m)
    for slow, extra in [(n - 1, 0.3), (n - 1, 1.4), (0, 0.3), (n // 2, 1.0)]:
        scale = [1 + (extra if s == slow else 0.0) for s in range(n)]
        idle = simulate(orders, n, lambda kind, s, x=scale: (1 if kind == "F" else 2) * chunk * x[s])
        measured = sum(idle.values()) / pp
        b = bubble_fraction("1f1b", pp, m, v, rank_costs([3 * chunk * x for x in scale], pp))
        if slow == n - 1:
            assert b / (1 + b) == pytest.approx(measured, abs=1e-12)
        else:
            assert measured - 1e-12 <= b / (1 + b) <= measured + 0.08
