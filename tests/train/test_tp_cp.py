"""Tensor and context parallelism split the model and the sequence, not what a step computes:
tp=2 (with and without sequence parallelism) and cp=2 on 2 gloo processes, and tp=2 x cp=2,
dp=2 x tp=2, and tp=2 and cp=2 each with FSDP2 over dp_shard=2 on 4, train the tiny model of the
pipeline tests on the same batches to the same losses and gradient norms as one process, in
float32, over 50 steps within rel 1e-5 on the loss and 5e-5 on the gradient norm, the pipeline
tests' tolerances (measured at most 3.3e-6 on the loss and 1.3e-5 on the gradient norm: the
ranks sum partial products in another order)."""

import json
import sys

import pytest

from estimate.perf import Layout as PerfLayout
from estimate.perf import tp_step_collectives
from tests.train.pipeline_worker import BATCH, SEQ, build, one_process
from tests.train.tp_worker import parallel_train
from tests.utils import run_cmd
from train.config import load_config
from train.parallel.layout import Layout
from train.parallel.procs import spawn

LAYOUTS = {"tp2-sp": (2, 1, True), "tp2": (2, 1, False), "cp2": (1, 2, True),
           "tp2xcp2": (2, 2, True), "dp2xtp2": (2, 1, True),
           "dp_shard2xtp2": (2, 1, True), "dp_shard2xcp2": (1, 2, True)}
PROCESSES = {"tp2xcp2": 4, "dp2xtp2": 4, "dp_shard2xtp2": 4, "dp_shard2xcp2": 4}


def run_parallel(tmp_path, name: str, tie: bool, steps: int) -> dict:
    tp, cp, sp = LAYOUTS[name]
    path = tmp_path / f"{name}-{tie}.json"
    spawn(parallel_train, PROCESSES.get(name, 2), tp, cp, sp, tie, steps, str(path),
          name.startswith("dp_shard"))
    return json.loads(path.read_text())


def assert_same_training(par: dict, one: dict) -> None:
    for key, rel in (("loss", 1e-5), ("grad_norm", 5e-5)):
        assert par[key] == pytest.approx(one[key], rel=rel), key
    assert one["loss"][-1] < one["loss"][0]  # it trained: not a vacuous comparison


@pytest.mark.parametrize("name", ["tp2-sp", "cp2"])
def test_two_ranks_train_as_one_process(tmp_path, name):
    """Fast tier: 3 steps, tied embeddings (the default model)."""
    par = run_parallel(tmp_path, name, True, 3)
    assert_same_training(par, one_process(True, 3))
    key = "tp_comm_s" if name.startswith("tp") else "cp_comm_s"
    assert len(par[key]) == 3 and all(s > 0 for s in par[key])  # the collectives were clocked
    if name.startswith("tp"):  # the performance model counts the collectives a step issues
        cfg = build(True).cfg
        lay = PerfLayout(tp=2, micro_batch=BATCH, global_batch_tokens=BATCH * SEQ)
        charged = sum(c for _, _, c in tp_step_collectives(cfg, SEQ, lay, 4.0))
        assert par["tp_collectives"] == [charged] * 3


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_trains_as_one_process_for_50_steps(tmp_path, name, tie):
    one = one_process(tie, 50)
    assert_same_training(run_parallel(tmp_path, name, tie, 50), one)
    assert one["loss"][-1] < one["loss"][0] - 1.0


def launch(tiny_data, out, nproc: int, *overrides) -> list[dict]:
    """`python -m train` (1 process) or launch/cpu.sh (nproc); the run's metrics records."""
    args = ["configs/train/tiny.yaml", f"data_dir={tiny_data}", f"out_dir={out}", "steps=20",
            "keep_checkpoints=0", *overrides]
    if nproc == 1:
        run_cmd([sys.executable, "-m", "train", *args])
    else:
        run_cmd(["launch/cpu.sh", *args], env={"NPROC": str(nproc), "PY": sys.executable})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict], first: int = 1) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["step"] >= first and "loss" in r}


@pytest.mark.slow
def test_trainer_tp2_and_cp2_and_their_checkpoints_resume_under_another_layout(tiny_data, tmp_path):
    """The real trainer: tp=2 and cp=2 (2 processes) give one process's losses over 20 steps;
    tp=2's step-10 checkpoint resumes at tp=1, and one process's at tp=2, to the same losses."""
    one = launch(tiny_data, tmp_path / "one", 1, "checkpoint_every=10")
    tp2 = launch(tiny_data, tmp_path / "tp2", 2, "parallel.tp=2", "checkpoint_every=10")
    cp2 = launch(tiny_data, tmp_path / "cp2", 2, "parallel.cp=2")
    for run, key in ((tp2, "tp_comm_s"), (cp2, "cp_comm_s")):
        assert losses(run) == pytest.approx(losses(one), rel=1e-5)
        assert all(r[key] > 0 for r in run if "loss" in r)
    summary = json.loads((tmp_path / "tp2" / "summary.json").read_text())
    assert summary["tp_comm_s"]["median"] > 0 and len(set(summary["rank_weight_sha256"])) == 1
    step10 = "checkpoints/step_00000010"
    to_one = launch(tiny_data, tmp_path / "tp2-to-1", 1, f"resume={tmp_path / 'tp2' / step10}")
    to_tp2 = launch(tiny_data, tmp_path / "1-to-tp2", 2, "parallel.tp=2",
                    f"resume={tmp_path / 'one' / step10}")
    for resumed in (to_one, to_tp2):
        assert losses(resumed, 11) == pytest.approx(losses(one, 11), rel=1e-5)


@pytest.mark.slow
def test_trainer_tp2_x_dp_shard2_resumes_exactly_and_its_checkpoint_loads_under_tp1_and_fsdp(
        tiny_data, tmp_path):
    """The real trainer at tp=2 x dp_shard=2 (4 processes: FSDP2 over each tp index's two
    data-parallel ranks) gives the losses of plain data parallel on 2 processes (the same
    batches) over 20 steps; its step-10 checkpoint (whole tensors, safetensors) resumes at the
    same layout to the same losses exactly, and at tp=1 with DDP and with plain FSDP (2
    processes) to the reference's."""
    dp2 = launch(tiny_data, tmp_path / "dp2", 2)
    run = launch(tiny_data, tmp_path / "tp2-shard2", 4, "parallel.tp=2", "parallel.dp_shard=2",
                 "checkpoint_every=10")
    assert losses(run) == pytest.approx(losses(dp2), rel=1e-5)
    assert all(r["tp_comm_s"] > 0 for r in run if "loss" in r)
    out = tmp_path / "tp2-shard2"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["techniques"]["fsdp"] is True and len(set(summary["rank_weight_sha256"])) == 1
    step10 = out / "checkpoints" / "step_00000010"
    assert not json.loads((step10 / "trainer.json").read_text())["sharded"]
    assert sorted(p.name for p in step10.glob("rank_*")) == ["rank_00000.pt", "rank_00001.pt"]
    again = launch(tiny_data, tmp_path / "again", 4, "parallel.tp=2", "parallel.dp_shard=2",
                   f"resume={step10}")
    assert losses(again, 11) == losses(run, 11)  # exact
    for name, overrides in (("tp1", []), ("fsdp", ["fsdp=true"])):
        resumed = launch(tiny_data, tmp_path / name, 2, *overrides, f"resume={step10}")
        assert losses(resumed, 11) == pytest.approx(losses(dp2, 11), rel=1e-5), name


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=2", "parallel.pp=2"], r"what runs: tp/cp x data parallel \(DDP, or FSDP2"),
    (["parallel.tp=3"], r"needs model.n_kv_head \(2\) divisible"),
    (["parallel.cp=3"], "seq_len=64 must be a multiple of 6"),
    (["parallel.tp=2", "compile=true"], "compile=true"),
    (["parallel.tp=2", "model.n_experts=4", "model.n_experts_active=1"], "MoE"),
])
def test_unsupported_layouts_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        load_config("configs/train/tiny.yaml", overrides)
    assert "\n" not in str(e.value)


def test_dp_shard_is_fsdp_and_its_layouts_are_checked_at_launch():
    """parallel.dp_shard > 1 resolves to fsdp=true; Layout.plan refuses, in one line, a sharded
    layout with nothing to shard over, hybrid sharding and a dp_shard the world does not give."""
    cfg = load_config("configs/train/tiny.yaml", ["parallel.tp=2", "parallel.dp_shard=2"])
    assert cfg.fsdp and Layout.plan(cfg.parallel, 3, 4, cfg.fsdp) == Layout(2, 1, 2, 3, True, True)
    for overrides, world, message in [
        (["parallel.tp=2", "fsdp=true"], 2, "nothing to shard over"),
        (["parallel.tp=2", "fsdp=true", "parallel.dp_replicate=2"], 8, "hybrid sharding"),
        (["parallel.cp=2", "parallel.dp_shard=2"], 8, "leave 4 data-parallel ranks"),
    ]:
        cfg = load_config("configs/train/tiny.yaml", overrides)
        with pytest.raises(ValueError, match=message) as e:
            Layout.plan(cfg.parallel, 0, world, cfg.fsdp)
        assert "\n" not in str(e.value)
