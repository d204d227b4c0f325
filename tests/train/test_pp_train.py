"""Pipeline parallelism through the trainer (`python -m train ... parallel.pp=2`).

Slow tier: pp=2 on 2 gloo processes under each schedule trains the 4-block tiny model on the
same batches to the same losses as one process over 50 steps: every step's train loss and
every validation loss within rel 1e-5 (measured: at most 1.8e-7 under every schedule, the same
step 50 loss 5.415482; the pipeline sums the loss and the gradients in another order, nothing
else differs); dp=2 x pp=2 on 4
processes likewise over 6 steps; a pp=2 run killed at a random step resumes bit-exactly, and
its checkpoint, written by each rank for its own stages, loads in one process. Fast tier:
the one-line refusals."""

import json
import random
import sys

import pytest
import torch

from tests.faults.test_train_faults import kill_run, start, wait_for_step
from tests.utils import run_cmd
from train.config import TrainConfig, load_config
from train.parallel.pp_train import check_layout

SCHEDULES = ["gpipe", "1f1b", "interleaved", "zero_bubble", "dualpipev"]
COMMON = ["configs/train/tiny.yaml", "model.n_layer=4", "tracker=none"]
PARITY_STEPS = 50


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((out / "summary.json").read_text())


def train(data, out, nproc: int, *overrides):
    args = [*COMMON, f"data_dir={data}", f"out_dir={out}", *overrides]
    if nproc == 1:
        return run_cmd([sys.executable, "-m", "train", *args])
    return run_cmd(["launch/cpu.sh", *args], env={"NPROC": str(nproc), "PY": sys.executable})


def max_rel_difference(ours: list[dict], theirs: list[dict]) -> float:
    """The largest relative difference of any step's train or validation loss; the two runs
    must log the same steps and the same kinds of figures."""
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "val_loss"):
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                worst = max(worst, abs(a[key] - b[key]) / abs(b[key]))
    return worst


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp1") / "run"
    train(tiny_data, out, 1, f"steps={PARITY_STEPS}")
    return records(out)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_trains_as_one_process_for_50_steps(tiny_data, tmp_path, one_process, schedule):
    out = tmp_path / "run"
    train(tiny_data, out, 2, f"steps={PARITY_STEPS}", "parallel.pp=2",
          f"parallel.schedule={schedule}", "parallel.microbatches=4")
    ours = records(out)
    worst = max_rel_difference(ours, one_process)
    print(f"pp=2 {schedule}: step {PARITY_STEPS} loss {ours[-1]['loss']:.6f} vs one process "
          f"{one_process[-1]['loss']:.6f}, max rel difference {worst:.2e}")
    assert worst < 1e-5
    # the stages hold one process's initial weights bit for bit (built on meta, meta_build.py)
    assert ours[0]["val_loss"] == one_process[0]["val_loss"]
    assert one_process[-1]["loss"] < one_process[1]["loss"] - 0.5  # it trained
    pipeline = summary(out)["pipeline"]
    assert pipeline["schedule"] == schedule and pipeline["microbatches"] == 4
    assert pipeline["blocks_per_stage"] == ([2, 2] if schedule in ("gpipe", "1f1b") else [1] * 4)
    assert all(0 <= b < 1 for b in pipeline["bubble_median_per_rank"])
    clocks = ours[-1]
    assert len(clocks["pp_bubble_per_rank"]) == 2 and clocks["pp_forward_s"] > 0
    assert all(0 < c <= 1 for c in clocks["pp_compute_per_rank"])
    assert (clocks["pp_weight_s"] > 0) == (schedule in ("zero_bubble", "dualpipev"))
    assert len(set(summary(out)["rank_weight_sha256"])) == 1  # every rank gathered the model


@pytest.mark.slow
def test_pp2_balanced_split_trains_as_one_process(tiny_data, tmp_path):
    """stage_split=balanced on a model whose LM head (6Vd = 197k FLOPs per token at V=512,
    d=64) outweighs a narrow block's (ffn_hidden=32: 160k): 3 blocks on the first stage, 1
    beside the head, and the same losses as one process."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(tiny_data, ref, 1, "steps=20", "model.ffn_hidden=32")
    train(tiny_data, out, 2, "steps=20", "model.ffn_hidden=32", "parallel.pp=2",
          "parallel.stage_split=balanced")
    assert max_rel_difference(records(out), records(ref)) < 1e-5
    assert summary(out)["pipeline"]["blocks_per_stage"] == [3, 1]


@pytest.mark.slow
def test_dp2_x_pp2_trains_as_one_process(tiny_data, tmp_path):
    """4 processes: two replicas of a 2-stage 1F1B pipeline, each half of every batch (the
    same windows as one process's step), gradients summed over the replicas. Validation:
    eval_batches is per replica, so each replica takes half of one process's batches (the
    same windows again)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(tiny_data, ref, 1, "steps=6", "eval_every=3", "micro_batch_size=2", "eval_batches=4")
    train(tiny_data, out, 4, "steps=6", "eval_every=3", "micro_batch_size=2", "eval_batches=2",
          "parallel.pp=2")
    assert max_rel_difference(records(out), records(ref)) < 1e-5
    assert summary(out)["pipeline"]["dp"] == 2


@pytest.mark.slow
def test_pp2_sigkill_then_resume_is_bit_exact_and_loads_in_one_process(tiny_data, tmp_path):
    from train.load import load_run

    run = ["steps=16", "checkpoint_every=3", "eval_every=8", "keep_checkpoints=2",
           "parallel.pp=2", "parallel.schedule=interleaved"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(tiny_data, ref, 2, *run)
    args = ["launch/cpu.sh", *COMMON, f"data_dir={tiny_data}", f"out_dir={out}", *run]
    env = {"NPROC": "2", "PY": sys.executable}
    kill_after = random.randint(4, 13)
    proc = start(args, env=env)
    wait_for_step(out, kill_after, proc)
    kill_run(proc)
    result = run_cmd([*args, "resume=auto"], env=env)
    assert "resumed from" in result.stderr, kill_after
    assert summary(out)["rank_weight_sha256"] == summary(ref)["rank_weight_sha256"], kill_after
    trail = [{k: r.get(k) for k in ("step", "loss", "grad_norm", "val_loss")} for r in records(out)]
    assert trail == [{k: r.get(k) for k in ("step", "loss", "grad_norm", "val_loss")}
                     for r in records(ref)]
    # each rank wrote its own stages (DCP, no whole-model file), which load in one process
    # under the whole model's names; the last checkpoint also holds consolidated safetensors
    step15 = out / "checkpoints" / "step_00000015"
    assert sorted(p.name for p in step15.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step15 / "model.safetensors").exists()
    final = load_run(step15, trust_pickle=True).model
    whole = load_run(out).model.state_dict()
    assert final.cfg.n_layer == 4 and set(final.state_dict()) == set(whole)
    last = load_run(out / "checkpoints" / "step_00000016").model.state_dict()  # safetensors
    assert all(torch.equal(last[k], v) for k, v in whole.items())


@pytest.mark.parametrize("override, message", [
    ("fsdp=true", "parallel.pp=2 with fsdp=true: pipeline stages are not sharded"),
    ("compile=true", "parallel.pp=2 with compile=true: the pipeline stages are not compiled"),
    ("mixed_precision=fp8", "parallel.pp=2 with mixed_precision=fp8"),
    ("mixed_precision=bf16", "parallel.pp=2 with mixed_precision=bf16: the pipeline runs in fp32"),
    ("model.n_layer=3", "model.n_layer=3 must be >= 4"),
    ("parallel.stage_split=lumpy", "parallel.stage_split must be one of even, balanced, got 'lumpy'"),
])
def test_pipeline_refusals_are_one_line(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_config("configs/train/tiny.yaml",
                    ["parallel.pp=2", "parallel.schedule=interleaved", "model.n_layer=4", override])


def test_layout_refusals_name_the_numbers():
    cfg = load_config("configs/train/tiny.yaml", ["parallel.pp=2", "model.n_layer=4"])
    check_layout(cfg, 2)  # batch 8 = 2 micro-batches of 4
    with pytest.raises(ValueError, match="parallel.pp=2 does not divide the 3 processes"):
        check_layout(cfg, 3)
    cfg.parallel.microbatches = 3
    with pytest.raises(ValueError, match="parallel.microbatches=3 does not divide the 8 sequences"):
        check_layout(cfg, 2)
    cfg.parallel.microbatches, cfg.micro_batch_size = 0, 3
    with pytest.raises(ValueError, match="batch_size=8 must be a multiple of micro_batch_size x "
                                         "data-parallel replicas = 3 x 1"):
        check_layout(cfg, 2)
    assert isinstance(cfg, TrainConfig)


def test_a_split_other_than_even_is_part_of_the_resume_fingerprint():
    """Another stage split sums the gradient norm in another order, so the fingerprint's
    layout records the blocks per stage: a resume under the same ones is bit-exact, under
    others within summation order (`run_identity` leaves the layout out; test_pp_resume.py).
    Where they are the even split's (the only split of checkpoints written before
    parallel.stage_split existed), they are left out, so those checkpoints keep their layout."""
    from types import SimpleNamespace

    from train.checkpoint import fingerprint, fingerprint_differences

    meta = SimpleNamespace(tokenizer_sha256="0" * 64, vocab_size=512, dtype="uint16",
                           splits={"train": {"tokens": 1000, "shards": 1}})

    def layout(*overrides):
        cfg = load_config("configs/train/tiny.yaml", ["parallel.pp=2", "model.n_layer=4",
                                                      "model.vocab_size=512", *overrides])
        return fingerprint(cfg, meta, 2)

    assert layout("parallel.stage_split=even") == layout()  # tiny: balanced is [2, 2] too
    assert "blocks_per_stage" not in layout()["pipeline"]
    # a narrow block (ffn_hidden=32) weighs less than the head: balanced is [3, 1]
    assert fingerprint_differences(layout("model.ffn_hidden=32", "parallel.stage_split=even"),
                                   layout("model.ffn_hidden=32")) == [
        "pipeline.blocks_per_stage: None -> [3, 1]"]


def test_a_resume_may_change_the_pipeline_layout_but_not_the_data_parallel_replicas():
    """`world_size` counts a pipelined run's dp x pp processes: pp=2 on 2 processes has one
    replica, as one process has; dp=2 x pp=2 on 4 has two, as DDP on 2 has."""
    from types import SimpleNamespace

    from train.checkpoint import describe_layout, fingerprint, fingerprint_differences, run_identity

    meta = SimpleNamespace(tokenizer_sha256="0" * 64, vocab_size=512, dtype="uint16",
                           splits={"train": {"tokens": 1000, "shards": 1}})

    def fp(world, *overrides):
        cfg = load_config("configs/train/tiny.yaml", ["model.n_layer=4", "model.vocab_size=512",
                                                      *overrides])
        return fingerprint(cfg, meta, world)

    one, pp2, ddp2 = fp(1), fp(2, "parallel.pp=2"), fp(2)
    dp2_pp2 = fp(4, "parallel.pp=2", "parallel.schedule=interleaved")
    assert fingerprint_differences(pp2, one) != []  # the layout is recorded...
    assert run_identity(pp2) == run_identity(one)  # ...and may change on resume
    assert run_identity(dp2_pp2) == run_identity(ddp2)
    assert fingerprint_differences(run_identity(dp2_pp2), run_identity(pp2)) == [
        "data_parallel: 2 -> 1"]
    assert fingerprint_differences(run_identity(fp(1, "seed=7")), run_identity(pp2)) == [
        "seed: 7 -> 1337"]
    assert describe_layout(one) == "no pipeline (pp=1)"
    assert describe_layout(pp2) == "pp=2 1f1b microbatches=0 blocks per stage [2, 2]"
    assert describe_layout(dp2_pp2) == "pp=2 interleaved microbatches=0 blocks per stage [1, 1, 1, 1]"
