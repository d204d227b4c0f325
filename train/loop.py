"""The training loop: set-up around Accelerate, then one clocked step after another.

Launch with `accelerate launch -m train CONFIG [key=value ...]` (see the README for the CPU
multi-process command). Every rank runs this file; the main rank writes the run directory
(`contracts.run.RunDir`): config.yaml, metrics.jsonl, checkpoints/, and at the end
summary.json, model.safetensors and samples.txt.

Each step: set the learning rate, take the step (`train_step`), evaluate every `eval_every`
steps, log, checkpoint every `checkpoint_every` steps, and stop early on a signal or before the
time limit (exit code 75: resume with `resume=auto`). A step never waits for the device: its
figures are read at "flush" steps only (`MetricsLog.flush` says which, and what that means for
`max_bad_steps`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed

from contracts import lock
from contracts.run import RunDir
from model.precision import precision
from train import trackers
from train.checkpoint import (
    Checkpointer,
    fingerprint,
    log_changed_settings,
    resume_path,
    rng_state,
    set_rng_state,
)
from train.clock import PeakSampler, PhaseTimer, time_allreduce
from train.config import TrainConfig
from train.data import BatchLoader, DeviceBatches, TokenWindows
from train.distributed import (
    PeerWatch,
    build_accelerator,
    finish,
    global_sum,
    set_threads,
    weight_checksums,
)
from train.memory import check_memory
from train.metrics import (
    MetricsLog,
    PendingStep,
    RunInfo,
    StepResult,
    evaluate,
    step_line,
    summarize,
)
from train.optim import compile_step, lr_at, set_lr, skip_update
from train.parallel.layout import Layout, Parallel
from train.parallel.pp_train import PipelineRun
from train.rundir import (
    claim_out_dir,
    disk_space,
    open_dataset,
    prepare_run_dir,
    state_bytes,
    write_outputs,
)
from train.stop import EXIT_STOPPED, Stopper
from train.techniques import build_model, resolve_compile

log = logging.getLogger("train")


@dataclasses.dataclass
class TrainState:
    """The loop's counters; a checkpoint's trainer.json holds them under these names."""

    step: int = 0  # the last finished step
    tokens: int = 0  # target tokens trained on, all ranks
    bad_steps: int = 0  # non-finite steps in a row: max_bad_steps of them end the run
    skipped_steps: int = 0  # steps without an update, in the whole run
    initial_val_loss: float | None = None

    def advance(self, step: int, tokens: float) -> None:
        """A step finished (known at once, without reading the device)."""
        self.step, self.tokens = step, self.tokens + int(tokens)

    def count(self, result: StepResult) -> None:
        """A step's non-finite and skip flags, once read (`resolve_steps`)."""
        self.bad_steps = self.bad_steps + 1 if result.bad else 0
        self.skipped_steps += int(result.skipped)


def train_step(model, optimizer, batches: list, accelerator: Accelerator, timer: PhaseTimer,
               grad_clip: float, poison: bool = False, replicas: int = 1,
               clip_grad_norm_=None) -> StepResult:
    """Forward and backward over this rank's micro-batches, then one update of the weights,
    without waiting for the device: the result's loss, grad norm and flags are device tensors.
    `poison` turns the loss into NaN (inject_nan_at_steps, to test the handling below).
    Under tensor/context parallel `replicas` ranks share each batch (train/parallel/layout.py)
    and `clip_grad_norm_` is the layout's."""
    device, world = accelerator.device, accelerator.num_processes
    # Normalise by the number of target tokens of the whole step on all ranks, so that
    # every token weighs the same however it is split into micro-batches and ranks (DDP
    # averages gradients over ranks, hence the factor `world`). Every micro-batch is full
    # and every rank has the same shapes (`BatchLoader`), and no target is ignored (-100),
    # so the count follows from the shapes, with no all-reduce.
    step_tokens = float(world * sum(y.numel() for _, y in batches))
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        # Gradients are all-reduced once per step, in the last micro-batch's backward.
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if poison:
                loss = loss * float("nan")
            accelerator.backward(loss * world / step_tokens)
        loss_sum += loss.detach()
    timer.lap("fwd_bwd_s")
    clip = clip_grad_norm_ or accelerator.clip_grad_norm_
    grad_norm = clip(model.parameters(), grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    loss_total = loss_sum.double()  # summed over ranks, as the logged loss and the NaN check need
    if world > 1:
        dist.all_reduce(loss_total)  # queued on the device like any collective; nobody waits
    train_loss = loss_total / step_tokens
    # A non-finite loss or gradient skips the update (the same on every rank: both are
    # all-reduced). Under fp16 the grad scaler skips overflowing steps by itself.
    loss_bad = ~torch.isfinite(train_loss)
    found_inf = loss_bad | ~torch.isfinite(grad_norm.detach().to(loss_bad.device))
    fp16 = accelerator.scaler is not None
    if fp16:
        optimizer.step()
    else:
        skip_update(optimizer, found_inf)
    skipped = True if fp16 and accelerator.optimizer_step_was_skipped else found_inf
    optimizer.zero_grad(set_to_none=True)
    timer.lap("optim_s")
    return StepResult(train_loss, grad_norm, step_tokens / replicas, skipped,
                      loss_bad if fp16 else found_inf)


def build_training(cfg: TrainConfig, accelerator: Accelerator, layout: Layout,
                   pipeline: PipelineRun | None):
    """This layout's hooks, model, optimizer, step and evaluation: the pipeline's, or the model
    with its techniques, split by tensor/context parallel and wrapped for data parallel. The
    loop and `train.ablate`'s memory probe take their step from here."""
    parallel = Parallel(layout, accelerator.device.type)  # its groups and mesh, when tp or cp > 1
    if pipeline:
        return parallel, pipeline.model, pipeline.optimizer, pipeline.train_step, pipeline.evaluate
    model, optimizer = build_model(cfg, accelerator, parallel)  # techniques, DDP or FSDP, optimizer
    step_fn = functools.partial(train_step, replicas=layout.replicas,
                                clip_grad_norm_=parallel.clip_grad_norm_(None))
    eval_fn = functools.partial(evaluate, model, accelerator=accelerator)
    return parallel, model, optimizer, step_fn, eval_fn


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary (also written to out_dir/summary.json).
    A rank that stops answering for collective_timeout_s ends the run on the others with one
    line naming it (PeerLost); the last good checkpoint stays."""
    accelerator = build_accelerator(cfg)
    watch = PeerWatch(accelerator.process_index, accelerator.num_processes,
                      cfg.collective_timeout_s)
    with watch.watching():
        return train_on_rank(cfg, accelerator, watch)


def train_on_rank(cfg: TrainConfig, accelerator: Accelerator, watch: PeerWatch) -> dict:
    """The run on this rank, once its process group is up."""
    set_threads(cfg, accelerator)
    set_seed(cfg.seed)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")
    claim_out_dir(cfg.out_dir, accelerator)  # one run per directory: refused while another lives
    resolve_compile(cfg, accelerator.device)  # compile=auto settled, bad modes refused: early

    # Data first: the vocabulary size and token dtype come from the prepared dataset.
    meta = open_dataset(cfg)
    seq_len = cfg.seq_len or cfg.model.seq_len
    # tp x cp x dp: the ranks of one dp index read alike (train/parallel/layout.py); under
    # pipeline parallel a replica's pp ranks load the same data (train/parallel/pp_train.py)
    layout = Layout.plan(cfg.parallel, rank, world, cfg.fsdp)
    pipeline = PipelineRun(cfg, accelerator) if cfg.parallel.pp > 1 else None
    data_rank, data_world = (pipeline.dp_rank, pipeline.dp) if pipeline else (layout.dp_rank, layout.dp)
    train_loader = BatchLoader(TokenWindows(meta, "train", seq_len, cfg.model.vocab_size),
                               cfg.micro_batch_size, data_rank, data_world, cfg.seed)
    val_loader = BatchLoader(TokenWindows(meta, "val", seq_len, cfg.model.vocab_size),
                             cfg.micro_batch_size, data_rank, data_world, cfg.seed, shuffle=False)
    accum = cfg.batch_size // (cfg.micro_batch_size * data_world)
    check_memory(cfg, accelerator)  # refuse a model too big for the device before allocating it
    parallel, model, optimizer, step_fn, eval_fn = build_training(cfg, accelerator, layout, pipeline)
    raw_model = accelerator.unwrap_model(model)

    # Resume, when asked, from a verified checkpoint of the same run (same fingerprint):
    # weights, optimizer, counters, grad scaler, and this rank's RNG states and data position.
    # RNG and data position are saved by data-parallel rank (one writer per dp index), so that
    # a layout with as many replicas (other tp, cp or pipeline stages) reads them
    state_rank, saves_state = ((pipeline.dp_rank, pipeline.pp_rank == 0) if pipeline else
                               (layout.dp_rank, layout.tp_rank == 0 and layout.cp_rank == 0))
    checkpointer = Checkpointer(cfg.out_dir, cfg.keep_checkpoints, rank, accelerator.wait_for_everyone,
                                state_rank, saves_state)
    run_fingerprint = fingerprint(cfg, meta, layout.dp)  # tp and cp may change on resume
    state = TrainState()
    resume_from = resume_path(cfg.resume, checkpointer)
    if resume_from is not None:
        saved, rank_state = parallel.load(resume_from, raw_model, optimizer, run_fingerprint,
                                            state_rank)
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)})
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])  # fp16 loss scale and its tracker
        train_loader.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        if cfg.compile_optimizer:
            compile_step(optimizer)  # the loaded groups carry the saved run's settings
        log_changed_settings(saved["config"], cfg)
        log.info(f"resumed from {resume_from} at step {state.step}")

    peaks = PeakSampler(accelerator.device, precision(cfg.mixed_precision), world=world,
                        local_main=accelerator.is_local_main_process,
                        barrier=accelerator.wait_for_everyone)  # one figure for the whole run
    info = RunInfo.of(cfg, accelerator, raw_model, optimizer, seq_len)
    if main:
        prepare_run_dir(cfg, meta, fresh=resume_from is None)
    if cfg.tracker != "none":
        accelerator.init_trackers(**trackers.init_args(cfg, RunDir(cfg.out_dir).root))
    metrics = MetricsLog(RunDir(cfg.out_dir).metrics, main, info, peaks)
    metrics.resume(state.step)
    log.info(info.describe(cfg, accelerator, accum, len(train_loader.windows)))
    log.info(peaks.describe())
    if resume_from is None:
        state.initial_val_loss = eval_fn(val_loader, cfg.eval_batches)
        log.info(f"step 0: val loss {state.initial_val_loss:.4f}")
        metrics.write({"step": 0, "val_loss": state.initial_val_loss})

    def save_checkpoint(step: int) -> None:
        trainer = {**dataclasses.asdict(state), "fingerprint": run_fingerprint,
                   "config": dataclasses.asdict(cfg),
                   "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None}
        whole, whole_optimizer = parallel.to_save(raw_model, optimizer)  # full tensors under tp
        with disk_space(checkpointer.root, lambda: state_bytes(whole, whole_optimizer)):
            path = checkpointer.save(step, whole, whole_optimizer, trainer,
                                     {"rng": rng_state(), "data": train_batches.state_dict()})
        log.info(f"step {step}: saved checkpoint {path}")

    def account(step: int, result: StepResult, record: dict) -> None:
        """Count a written step's non-finite update; stop where max_bad_steps in a row."""
        state.count(result)
        if result.skipped:
            log.warning(f"step {step}: non-finite loss or gradient, update skipped "
                        f"({state.bad_steps} in a row)")
        if cfg.tracker != "none":
            accelerator.log(record, step=step)
        if state.bad_steps >= cfg.max_bad_steps:
            raise RuntimeError(
                f"{state.bad_steps} non-finite steps in a row (up to step {step}): stopping. "
                f"Last good checkpoint: {checkpointer.latest_valid() or 'none'}. "
                "Lower optim.lr or inspect the data."
            )

    watch.where = lambda: (f"at step {state.step + 1}; last good checkpoint: "
                           f"{checkpointer.latest_valid() or 'none'}")
    train_batches = DeviceBatches(train_loader, accelerator.device)  # pinned, ahead, on GPU
    timer = PhaseTimer(accelerator.device)
    # The stop vote: a collective (and a wait) per step with several ranks; none with one.
    any_rank = ((lambda flag: global_sum(float(flag), accelerator) > 0) if world > 1 else bool)
    stopper = Stopper(cfg.time_limit_s, any_rank)
    pending: list[PendingStep] = []
    for step in range(state.step + 1, cfg.steps + 1):
        lr = lr_at(step - 1, cfg.steps, cfg.optim)
        set_lr(optimizer, lr)
        timer.start()
        parallel.comm_seconds()  # from here on, this step's tp/cp collectives (not evaluation's)
        batches = [train_batches.next() for _ in range(accum)]
        timer.lap("data_wait_s")
        result = step_fn(model, optimizer, batches, accelerator, timer, cfg.optim.grad_clip,
                         poison=step in cfg.inject_nan_at_steps)
        state.advance(step, result.tokens)
        pending.append(PendingStep(step, lr, state.tokens, result, timer.snapshot(),
                                   {**parallel.comm_seconds(),
                                    **(pipeline.last_record if pipeline else {})}))

        evaluated = step % cfg.eval_every == 0 or step == cfg.steps
        if evaluated:
            pending[-1].extra["val_loss"] = eval_fn(val_loader, cfg.eval_batches)
            if data_world > 1:
                pending[-1].extra["grad_allreduce_s"] = time_allreduce(info.params,
                                                                       accelerator.device)
        stop = stopper.check(timer.wall(), checkpointer.last_save_s)
        periodic = cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps)
        logged = step % cfg.log_every == 0 or step == 1 or evaluated
        if logged or periodic or stop:
            record = metrics.flush(pending, account)
            if main and logged:
                log.info(step_line(record, cfg.steps))
        if (periodic or stop) and state.bad_steps == 0:  # keep the last good checkpoints
            save_checkpoint(step)
        if stop:
            log.warning(f"stopping at step {step} ({stop}); resume with resume=auto")
            finish(accelerator)
            raise SystemExit(EXIT_STOPPED)

    # unsharded (fsdp, tp, cp) or assembled from the stages (pp): checksums, export
    raw_model = pipeline.full_model() if pipeline else parallel.full_model(raw_model)
    if (cfg.fsdp or pipeline) and main and not parallel.active:  # the last (DCP) checkpoint gets safetensors too
        with disk_space(checkpointer.root, lambda: state_bytes(raw_model)):
            checkpointer.consolidate(cfg.steps, raw_model)
    summary = summarize(cfg, info, metrics, state)
    if pipeline:
        summary["pipeline"] = pipeline.summary(metrics.records, cfg.warmup_steps_excluded)
    summary["rank_weight_sha256"] = weight_checksums(raw_model, accelerator)
    if main:
        write_outputs(cfg, summary, raw_model, accelerator.device, meta.eos_id)
    finish(accelerator)
    lock.release(cfg.out_dir)
    return summary
