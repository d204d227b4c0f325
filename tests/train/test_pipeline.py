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
import torch
from safetensors.torch import save_model

from contracts.checkpoint import write_manifest
from model.config import ModelConfig, preset_fields
from model.transformer import Transformer
from tests.train.pipeline_worker import (
    adamw,
    build,
    dp_pipelined,
    held,
    one_process,
    one_process_steps,
    pipelined,
    resume_pipelined,
    save_pipelined,
)
from train.fsdp import load_sharded, save_sharded
from train.parallel.pipeline import (
    balanced_ranges,
    block_ranges,
    bubble_formula,
    rank_stages,
    split,
    stage_ranges,
)
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


def test_balanced_split_evens_the_stages_flops():
    """The last stage's LM head and loss cost blocks: balanced moves blocks off it (Llama 3,
    sec. 3.3.2, one layer fewer on the first and last stages); equal costs split as even."""
    # the ablation's `small` preset: head 6Vd = 1.21 blocks of training FLOPs at V=4096
    small = ModelConfig.from_dict({**preset_fields("small"), "vocab_size": 4096})
    assert stage_ranges(small, 2, "even") == [range(0, 2), range(2, 4)]
    assert stage_ranges(small, 2, "balanced") == [range(0, 3), range(3, 4)]  # max 3 vs 3.21
    assert stage_ranges(small, 4, "balanced") == block_ranges(4, 4)  # one block each: no choice
    # ends worth a block each: one block fewer on the first and the last stage, as Llama 3
    assert balanced_ranges([1.0] * 14, 1.0, 1.0, 4) == [range(0, 3), range(3, 7), range(7, 11),
                                                        range(11, 14)]
    assert balanced_ranges([1.0] * 8, 0.0, 0.0, 4) == block_ranges(8, 4)
    with pytest.raises(ValueError, match="parallel.stage_split='lumpy'"):
        stage_ranges(small, 2, "lumpy")


def whole_names(tie: bool, n_layer: int) -> dict[str, int]:
    return {n: p.numel() for n, p in build(tie, n_layer).named_parameters()}


@pytest.mark.parametrize("schedule, tie, n_layer, how", [
    ("1f1b", True, 4, "even"), ("1f1b", False, 6, "balanced"),
    pytest.param("interleaved", True, 8, "even", marks=pytest.mark.slow),
    pytest.param("dualpipev", True, 4, "even", marks=pytest.mark.slow)])
def test_a_pipeline_rank_holds_only_its_stages(tmp_path, schedule, tie, n_layer, how):
    """Each rank's model, pipeline modules and AdamW moments are its stages' parameters
    exactly (the other blocks freed); the ranks' shares add up to the whole model, a tied
    matrix once per rank that holds an end of the model."""
    spawn(held, 2, schedule, tie, n_layer, how, str(tmp_path / "held"))
    ranks = [json.loads((tmp_path / f"held.{r}").read_text()) for r in range(2)]
    whole = whole_names(tie, n_layer)
    ranges = [range(a, b) for a, b in ranks[0]["ranges"]]
    n = len(ranges)
    copies = 0
    for r, mine in enumerate(ranks):
        stages = rank_stages(schedule, 2, r)
        blocks = {i for s in stages for i in ranges[s]}
        want = {name for name in whole
                if name.startswith("blocks.") and int(name.split(".")[1]) in blocks}
        if 0 in stages or (tie and n - 1 in stages):  # tied: one name on every rank
            want.add("tok_emb.weight")
        if n - 1 in stages:
            want |= {"norm.weight"} | ({"lm_head.weight"} if not tie else set())
        numel = sum(whole[name] for name in want)
        assert mine["names"] == sorted(want), r
        assert mine["numel"] == mine["module_numel"] == numel
        assert mine["moments_numel"] == 2 * numel  # AdamW's exp_avg and exp_avg_sq
        assert mine["blocks_alive"] == len(blocks) < n_layer  # the others' blocks are freed
        copies += tie and (0 in stages or n - 1 in stages)
    extra = (copies - 1) * whole["tok_emb.weight"] if tie else 0
    assert sum(m["numel"] for m in ranks) == sum(whole.values()) + extra


@pytest.mark.slow  # 9 s: the default tier keeps the per-rank checks above
def test_pipelined_checkpoint_loads_in_one_process_and_back(tmp_path):
    """Layouts change through the checkpoint (DCP, by parameter name): a pp=2 checkpoint of
    2 steps, each rank writing its stages, loads into one process, whose next steps are the
    one-process run's; a one-process checkpoint, DCP or whole-model, loads into pp=2's stages
    likewise."""
    one = one_process(True, 4)
    pp_ckpt = tmp_path / "pp"
    spawn(save_pipelined, 2, "1f1b", True, 2, str(pp_ckpt))
    write_manifest(pp_ckpt, 2, {})
    model = build(True)
    opt = adamw(model)
    load_sharded(pp_ckpt, model, opt, flat=True)
    assert one_process_steps(model, opt, 2, 4)["loss"] == pytest.approx(one["loss"][2:], rel=1e-5)

    whole_ckpt = tmp_path / "one"
    model = build(True)
    opt = adamw(model)
    one_process_steps(model, opt, 0, 2)
    save_sharded(whole_ckpt, model, opt, flat=True)
    write_manifest(whole_ckpt, 2, {})
    out = tmp_path / "resumed.json"
    spawn(resume_pipelined, 2, "interleaved", True, str(whole_ckpt), 2, 4, str(out))
    assert json.loads(out.read_text())["loss"] == pytest.approx(one["loss"][2:], rel=1e-5)

    # the one-process format (model.safetensors, index-keyed optimizer.pt), also what pipelined
    # runs wrote before their checkpoints were sharded by stage
    whole_ckpt = tmp_path / "one-safetensors"
    whole_ckpt.mkdir()
    save_model(model, str(whole_ckpt / "model.safetensors"))
    torch.save(opt.state_dict(), whole_ckpt / "optimizer.pt")
    spawn(resume_pipelined, 2, "1f1b", True, str(whole_ckpt), 2, 4, str(out))
    assert json.loads(out.read_text())["loss"] == pytest.approx(one["loss"][2:], rel=1e-5)


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


@pytest.mark.parametrize("schedule, pp, tie, how", [
    ("1f1b", 2, True, "even"), ("1f1b", 2, False, "balanced"), ("interleaved", 2, True, "even"),
    ("dualpipev", 2, True, "even"), ("gpipe", 4, False, "even"),
])
def test_stages_built_on_meta_hold_one_process_init_bit_for_bit(schedule, pp, tie, how):
    """`build_part` makes only a rank's stages real, with the very values a whole build from
    the same seed draws (the generator's every draw replayed), and leaves the generator where
    the whole build does, so later draws match too."""
    from train.parallel.meta_build import build_part
    from train.parallel.pipeline import keep_stages

    cfg = ModelConfig(**{**preset_fields("tiny"), "n_layer": 8, "vocab_size": 256,
                         "tie_embeddings": tie, "ffn_hidden": 32})
    torch.manual_seed(3)
    whole = Transformer(cfg).state_dict()
    after_whole = torch.get_rng_state()
    held: set[str] = set()
    for rank in range(pp):
        torch.manual_seed(3)
        part = build_part(cfg, lambda m, rank=rank: keep_stages(m, schedule, pp, rank, how))
        assert torch.equal(torch.get_rng_state(), after_whole)
        state = part.state_dict()
        assert state and not any(t.is_meta for t in state.values())
        assert all(torch.equal(t, whole[name]) for name, t in state.items())
        if tie and part.lm_head is not None:  # one Parameter under both names, as one process
            assert part.lm_head.weight is part.tok_emb.weight
        held |= set(state)
    assert held == set(whole)  # every parameter on some rank


def test_a_parameter_that_is_not_initialised_in_place_is_refused_on_meta():
    from train.parallel.meta_build import build_part

    cfg = ModelConfig(**{**preset_fields("tiny"), "vocab_size": 256})

    def add_uninitialised(model):
        model.extra = torch.nn.Parameter(torch.empty(3, device="meta"))
        return model

    with pytest.raises(ValueError, match="extra is not initialised in place; build the model whole"):
        build_part(cfg, add_uninitialised)
