"""Resuming under another pipeline layout (slow tier).

A run stopped at step 4 and resumed under another layout (pp=2 -> one process, one process
-> pp=2, pp=2 1F1B even -> pp=2 1F1B balanced, and -> DualPipeV at 4 micro-batches) continues with the losses of
the uninterrupted run: the weights and AdamW state resharded by parameter name, the step
counter, RNG and data position carried over. The tolerance is the pp parity tests' (every
train and validation loss within rel 1e-5 of the uninterrupted run and of one process): another
layout sums the loss and the gradients in another order, so it is not bit-exact (the same
layout is: test_pp_train.py). The model has narrow blocks (ffn_hidden=32), so that the
balanced split ([3, 1]) differs from the even one ([2, 2]). A pipeline checkpoint under tp=2
is refused in one line naming both layouts.
"""

import shutil
import sys

import pytest

from tests.train.test_pp_train import COMMON, max_rel_difference, records, summary
from tests.utils import run_cmd

RUN = ["model.ffn_hidden=32", "steps=12", "checkpoint_every=4", "keep_checkpoints=0",
       "eval_every=6"]
STOP = 4  # the step the interrupted run resumes from
TOLERANCE = 1e-5  # test_pp_train.py's pp-vs-one-process parity bound


def train(data, out, nproc: int, *overrides, check: bool = True):
    args = [*COMMON, f"data_dir={data}", f"out_dir={out}", *RUN, *overrides]
    if nproc == 1:
        return run_cmd([sys.executable, "-m", "train", *args], check=check)
    return run_cmd(["launch/cpu.sh", *args], env={"NPROC": str(nproc), "PY": sys.executable},
                   check=check)


PP_EVEN = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2",
           "parallel.stage_split=even"]


@pytest.fixture(scope="module")
def pp_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppres") / "pp"
    train(tiny_data, out, 2, *PP_EVEN)
    assert summary(out)["pipeline"]["blocks_per_stage"] == [2, 2]
    return out


@pytest.fixture(scope="module")
def one_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppres") / "one"
    train(tiny_data, out, 1)
    return out


def stopped_copy(run, dest):
    """`run`'s directory as a run stopped right after checkpoint STOP: the later checkpoints
    gone (resume=auto then picks STOP; the metrics after it are dropped on resume)."""
    shutil.copytree(run, dest)
    for later in sorted((dest / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    assert [p.name for p in (dest / "checkpoints").iterdir()] == [f"step_{STOP:08d}"]
    return dest


def check_continues(resumed, uninterrupted, one, result, written: str, under: str):
    assert f"at step {STOP}" in result.stderr
    assert f"written under {written}, under {under}" in result.stderr
    ours = records(resumed)
    assert [r["step"] for r in ours if "loss" in r] == list(range(1, 13))
    assert ours[:STOP + 1] == records(uninterrupted)[:STOP + 1]  # steps 0..4: the copied file's

    def after_stop(rs):  # the resumed steps: what the other layout computed
        return [r for r in rs if r["step"] > STOP]

    against_run = max_rel_difference(after_stop(ours), after_stop(records(uninterrupted)))
    against_one = max_rel_difference(after_stop(ours), after_stop(records(one)))
    print(f"{written} -> {under}: step 12 loss {ours[-1]['loss']:.6f}, steps 5-12 max rel "
          f"difference {against_run:.2e} vs the uninterrupted run, {against_one:.2e} vs one "
          "process")
    assert against_run < TOLERANCE and against_one < TOLERANCE
    assert summary(resumed)["tokens"] == summary(uninterrupted)["tokens"]


PP_1F1B = "pp=2 1f1b microbatches=2 blocks per stage [2, 2]"


@pytest.mark.slow
def test_pp2_checkpoint_resumes_in_one_process(tiny_data, tmp_path, pp_run, one_run):
    out = stopped_copy(pp_run, tmp_path / "run")
    result = train(tiny_data, out, 1, "resume=auto")
    check_continues(out, pp_run, one_run, result, PP_1F1B, "no pipeline (pp=1)")


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_pp2_interleaved(tiny_data, tmp_path, pp_run,
                                                              one_run):
    out = stopped_copy(one_run, tmp_path / "run")
    result = train(tiny_data, out, 2, "resume=auto", "parallel.pp=2",
                   "parallel.schedule=interleaved", "parallel.microbatches=2")
    check_continues(out, one_run, one_run, result, "no pipeline (pp=1)",
                    "pp=2 interleaved microbatches=2 blocks per stage [1, 1, 1, 1]")
    assert summary(out)["pipeline"]["schedule"] == "interleaved"


@pytest.mark.slow
@pytest.mark.parametrize("overrides, under", [
    (["parallel.schedule=1f1b", "parallel.microbatches=2", "parallel.stage_split=balanced"],
     "pp=2 1f1b microbatches=2 blocks per stage [3, 1]"),
    (["parallel.schedule=dualpipev", "parallel.microbatches=4"],  # DualPipeV: M >= stages
     "pp=2 dualpipev microbatches=4 blocks per stage [1, 1, 1, 1]"),
])
def test_pp2_checkpoint_resumes_under_another_split_or_schedule(tiny_data, tmp_path, pp_run,
                                                                one_run, overrides, under):
    out = stopped_copy(pp_run, tmp_path / "run")
    result = train(tiny_data, out, 2, "resume=auto", "parallel.pp=2", *overrides)
    check_continues(out, pp_run, one_run, result, PP_1F1B, under)


@pytest.mark.slow
def test_pp2_checkpoint_under_tp2_is_refused_in_one_line(tiny_data, tmp_path, pp_run):
    out = stopped_copy(pp_run, tmp_path / "run")
    result = train(tiny_data, out, 2, "resume=auto", "parallel.tp=2", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    line = (f"it was written under {PP_1F1B}, this run is tp=2 x cp=1: pipeline stages are not "
            "resharded into tensor/context parallel; resume under pp or in one process")
    assert line in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_dp2_x_pp2_checkpoint_resumes_under_ddp(tiny_data, tmp_path):
    """4 processes, two replicas of a 2-stage pipeline, stopped at step 4 and resumed under
    DDP on 2 processes: as many replicas, so each reads its replica's RNG and data position
    (`test_pp_train.test_dp2_x_pp2_trains_as_one_process`'s batches)."""
    ref, ddp = tmp_path / "ref", tmp_path / "ddp"
    batches = ["micro_batch_size=2", "eval_batches=2"]
    train(tiny_data, ref, 4, *batches, "parallel.pp=2")
    train(tiny_data, ddp, 2, *batches)
    out = stopped_copy(ref, tmp_path / "run")
    result = train(tiny_data, out, 2, *batches, "resume=auto")
    check_continues(out, ref, ddp, result, "pp=2 1f1b microbatches=0 blocks per stage [3, 1]",
                    "no pipeline (pp=1)")
