"""The training loop: set-up around Accelerate, then a clocked step loop.

Launch with `accelerate launch -m train CONFIG [key=value ...]` (see the README for the CPU
multi-process command). Every rank runs this file; the main rank writes the run directory:
`config.yaml` (resolved), `metrics.jsonl`, `summary.json`, `model.safetensors`,
`tokenizer.json` and `samples.txt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_model

from model.flops import model_flops_per_token
from model.precision import precision
from model.transformer import Transformer
from train import trackers
from train.checkpoint import (
    Checkpointer,
    StopRequest,
    fingerprint,
    load,
    resume_path,
    rng_state,
    set_rng_state,
)
from train.clock import (
    MetricsLog,
    PeakSampler,
    PhaseTimer,
    distribution,
    peak_memory_bytes,
    time_allreduce,
)
from train.config import TrainConfig, to_yaml
from train.data import BatchLoader, TokenWindows, read_meta
from train.fsdp import full_copy
from train.optim import lr_at
from train.techniques import build_model, executed_flops_per_token, techniques_in_use

log = logging.getLogger("train")
SUMMARY_FORMAT = 1
EXIT_STOPPED = 75  # checkpointed and stopped on SIGTERM/SIGINT or time limit (EX_TEMPFAIL)


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for this config, refusing set-ups that would silently do something else."""
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "mixed_precision=fp16 needs a GPU: on CPU accelerate silently trains in fp32 instead. "
            "Use mixed_precision=bf16 or mixed_precision=no."
        )
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=trackers.log_with(cfg.tracker),  # wandb: online with credentials, else offline
        project_dir=cfg.out_dir,
    )
    expected = cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"asked for world_size={expected} but got {accelerator.num_processes} process(es) "
            f"(distributed type {accelerator.distributed_type}). On a CPU-only host launch with "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m train ..."
        )
    if cfg.batch_size % (cfg.micro_batch_size * accelerator.num_processes):
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size x world_size = "
            f"{cfg.micro_batch_size} x {accelerator.num_processes}"
        )
    return accelerator


def set_threads(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Share the cores between the processes of this machine instead of oversubscribing them."""
    if accelerator.device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(cfg.threads_per_process or max(1, (os.cpu_count() or 1) // local))
    torch.set_flush_denormal(True)  # denormals make fp32 CPU matmuls several times slower


def weight_checksums(model: torch.nn.Module, accelerator: Accelerator) -> list[str]:
    """SHA-256 of every rank's parameters, gathered on all ranks; raises if they differ (DDP
    keeps them identical, and under FSDP each rank checks its own unsharded copy)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    mine = digest.hexdigest()
    if accelerator.num_processes == 1:
        return [mine]
    gathered: list[str] = [""] * accelerator.num_processes
    dist.all_gather_object(gathered, mine)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {gathered}")
    return gathered


def log_changed_settings(saved: dict, cfg: TrainConfig) -> None:
    """Log the settings that differ from the checkpoint's run (allowed: lr, steps, logging...)."""
    current = dataclasses.asdict(cfg)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key) and key not in ("resume",):
            log.info(f"resuming with changed setting {key}: {saved.get(key)!r} -> {current.get(key)!r}")


def global_sum(value: float | torch.Tensor, accelerator: Accelerator) -> float:
    """Sum of a scalar over all ranks."""
    t = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).clone()
    if accelerator.num_processes > 1:
        dist.all_reduce(t)
    return float(t)


@torch.no_grad()
def evaluate(model, loader: BatchLoader, batches: int, accelerator: Accelerator) -> float:
    """Mean validation loss per token over `batches` micro-batches on every rank."""
    model.eval()
    loader.load_state_dict({"epoch": 0, "cursor": 0})  # the same val windows every time
    loss_sum, tokens = 0.0, 0
    for _ in range(min(batches, loader.per_rank // loader.micro_batch_size)):
        x, y = loader.next()
        _, batch_loss = model(x.to(accelerator.device), y.to(accelerator.device))
        loss_sum += float(batch_loss)
        tokens += y.numel()
    model.train()
    return global_sum(loss_sum, accelerator) / global_sum(tokens, accelerator)


def check_tokenizer(path: Path, meta: dict) -> None:
    """The dataset's tokenizer must exist and have the vocabulary its shards were written with."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} named by meta.json is missing")
    size = Tokenizer.from_file(str(path)).get_vocab_size()
    if size != meta["vocab_size"]:
        raise ValueError(
            f"tokenizer {path} has {size} tokens but meta.json says the shards use "
            f"vocab_size={meta['vocab_size']}: the tokenizer does not belong to these shards"
        )


def sample_text(model: Transformer, tokenizer_path: Path, cfg: TrainConfig, device,
                eos_id: int = 0) -> str:
    """Generate from the trained model with the dataset's tokenizer (main rank only); an empty
    prompt starts from the end-of-text token, as a new document does."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids = tokenizer.encode(cfg.sample_prompt).ids or [eos_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(
        idx, cfg.sample_tokens, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
        generator=gen,
    )
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary (also written to out_dir/summary.json)."""
    accelerator = build_accelerator(cfg)
    set_threads(cfg, accelerator)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")
    out = Path(cfg.out_dir)

    # Data first: the vocabulary size and token dtype come from the prepared dataset.
    meta = read_meta(cfg.data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's "
            f"vocab_size={meta['vocab_size']} ({cfg.data_dir}); use model.vocab_size=0 to follow the data"
        )
    check_tokenizer(Path(cfg.data_dir) / meta.get("tokenizer", "tokenizer.json"), meta)
    seq_len = cfg.seq_len or cfg.model.seq_len
    rank, world = accelerator.process_index, accelerator.num_processes
    train_loader = BatchLoader(
        TokenWindows(cfg.data_dir, "train", seq_len, cfg.model.vocab_size),
        cfg.micro_batch_size, rank, world, cfg.seed,
    )
    val_loader = BatchLoader(
        TokenWindows(cfg.data_dir, "val", seq_len, cfg.model.vocab_size),
        cfg.micro_batch_size, rank, world, cfg.seed, shuffle=False,
    )
    accum = cfg.batch_size // (cfg.micro_batch_size * world)

    model, optimizer = build_model(cfg, accelerator)  # techniques, DDP or FSDP, optimizer
    raw_model = accelerator.unwrap_model(model)

    checkpointer = Checkpointer(out, cfg.keep_checkpoints, rank, accelerator.wait_for_everyone)
    run_fingerprint = fingerprint(cfg, meta, world)
    state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_steps": 0, "initial_val_loss": None}
    resume_from = resume_path(cfg.resume, checkpointer)
    if resume_from is not None:
        saved, rank_state = load(resume_from, raw_model, optimizer, rank, run_fingerprint)
        state.update({k: saved[k] for k in state})
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])  # fp16 loss scale and its tracker
        train_loader.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        log_changed_settings(saved["config"], cfg)
        log.info(f"resumed from {resume_from} at step {state['step']}")

    flops_tok = model_flops_per_token(cfg.model, seq_len)
    hw_flops_tok = executed_flops_per_token(cfg, seq_len)
    peaks = PeakSampler(accelerator.device, precision(cfg.mixed_precision))
    peaks.sample()

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        if resume_from is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.copy(Path(cfg.data_dir) / meta.get("tokenizer", "tokenizer.json"), out / "tokenizer.json")
        # the dataset's meta.json travels with the run: generate and export read its eos token
        shutil.copy(Path(cfg.data_dir) / "meta.json", out / "data_meta.json")
    if cfg.tracker != "none":
        accelerator.init_trackers(**trackers.init_args(cfg, out))
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    metrics.resume(state["step"])
    n_params = raw_model.num_params()
    log.info(
        f"model: {n_params / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOP/token | "
        f"{world} process(es) on {accelerator.device} ({accelerator.distributed_type}), "
        f"{torch.get_num_threads()} threads each | precision {cfg.mixed_precision} | "
        f"batch {cfg.batch_size} x {seq_len} tokens = {accum} micro-batch(es) of "
        f"{cfg.micro_batch_size} per rank | train windows {len(train_loader.windows)}"
    )
    log.info(f"peak FLOP/s per process: {peaks.median() / 1e12:.3f} TFLOP/s ({peaks.source})")

    if resume_from is None:
        state["initial_val_loss"] = evaluate(model, val_loader, cfg.eval_batches, accelerator)
        log.info(f"step 0: val loss {state['initial_val_loss']:.4f}")
        metrics.write({"step": 0, "val_loss": state["initial_val_loss"]})
    val_loss = [r["val_loss"] for r in metrics.records if "val_loss" in r][-1]
    timer = PhaseTimer(accelerator.device)
    stop_request, started, save_s = StopRequest(), time.monotonic(), 0.0

    def save_checkpoint(step: int) -> None:
        trainer = {**state, "fingerprint": run_fingerprint, "config": dataclasses.asdict(cfg),
                   "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None}
        path = checkpointer.save(step, raw_model, optimizer, trainer,
                                 {"rng": rng_state(), "data": train_loader.state_dict()})
        log.info(f"step {step}: saved checkpoint {path}")

    for step in range(state["step"] + 1, cfg.steps + 1):
        lr = lr_at(step - 1, cfg.steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        timer.start()
        batches = [train_loader.next() for _ in range(accum)]
        timer.lap("data_wait_s")
        # Normalise by the number of target tokens of the whole step on all ranks, so that
        # every token weighs the same however it is split into micro-batches and ranks (DDP
        # averages gradients over ranks, hence the factor `world`).
        step_tokens = global_sum(sum(y.numel() for _, y in batches), accelerator)
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, (x, y) in enumerate(batches):
            sync = contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(model)
            with sync:
                _, batch_loss = model(x.to(accelerator.device), y.to(accelerator.device))
                if step in cfg.inject_nan_at_steps:
                    batch_loss = batch_loss * float("nan")
                accelerator.backward(batch_loss * world / step_tokens)
            loss_sum += batch_loss.detach()
        timer.lap("fwd_bwd_s")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        train_loss = global_sum(loss_sum, accelerator) / step_tokens
        # A non-finite loss or gradient skips the update (the same on every rank: both are
        # all-reduced). Under fp16 the grad scaler skips overflowing steps by itself.
        finite = math.isfinite(train_loss) and math.isfinite(float(grad_norm))
        if finite or accelerator.scaler is not None:
            optimizer.step()
        skipped = not finite or accelerator.optimizer_step_was_skipped
        optimizer.zero_grad(set_to_none=True)
        timer.lap("optim_s")
        bad = not math.isfinite(train_loss) or (not finite and accelerator.scaler is None)
        state["bad_steps"] = state["bad_steps"] + 1 if bad else 0
        state["skipped_steps"] += int(skipped)
        state["step"], state["tokens"] = step, state["tokens"] + int(step_tokens)
        step_s = timer.total()
        tokens_per_s = step_tokens / step_s
        peak_total = peaks.median() * world
        record = {
            "step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
            "tokens": state["tokens"], "step_s": step_s, **timer.phases,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_process": tokens_per_s / world,
            "model_tflops_per_s": flops_tok * tokens_per_s / 1e12,
            "mfu": flops_tok * tokens_per_s / peak_total,
            "hfu": hw_flops_tok * tokens_per_s / peak_total,
            "peak_mem_bytes": peak_memory_bytes(accelerator.device),
            "eta_s": step_s * (cfg.steps - step),
        }
        if skipped:
            record["skipped"] = True
            log.warning(f"step {step}: non-finite loss or gradient, update skipped "
                        f"({state['bad_steps']} in a row)")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["val_loss"] = val_loss = evaluate(model, val_loader, cfg.eval_batches, accelerator)
            if len(peaks.samples) < cfg.peak_samples:
                peaks.sample()  # interleave peak measurements with the work
            if world > 1:
                record["grad_allreduce_s"] = time_allreduce(n_params, accelerator.device)
        metrics.write(record)
        if cfg.tracker != "none":
            accelerator.log(record, step=step)
        if main and (step % cfg.log_every == 0 or step == 1 or "val_loss" in record):
            val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
            log.info(
                f"step {step}/{cfg.steps} | loss {train_loss:.4f}{val} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s | MFU {record['mfu']:.1%} | "
                f"data {timer.phases['data_wait_s'] * 1e3:.1f} ms | ETA {record['eta_s']:.0f} s"
            )
        if state["bad_steps"] >= cfg.max_bad_steps:
            last = checkpointer.latest_valid()
            raise RuntimeError(
                f"{state['bad_steps']} non-finite steps in a row (up to step {step}): stopping. "
                f"Last good checkpoint: {last or 'none'}. Lower optim.lr or inspect the data."
            )
        # Stop on a signal or before the time limit; all ranks must agree, so they vote.
        late = cfg.time_limit_s and (time.monotonic() - started + 2 * step_s + save_s) >= cfg.time_limit_s
        stop = global_sum(float(stop_request.signal is not None or bool(late)), accelerator) > 0
        periodic = cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps)
        if (periodic or stop) and state["bad_steps"] == 0:
            t0 = time.monotonic()
            save_checkpoint(step)
            save_s = time.monotonic() - t0
        if stop:
            reason = "time limit" if late else "signal"
            log.warning(f"stopping at step {step} ({reason}); resume with resume=auto")
            finish(accelerator)
            raise SystemExit(EXIT_STOPPED)

    raw_model = full_copy(raw_model)  # unsharded under fsdp=true: checksums, export, samples
    summary = summarize(cfg, metrics.records, peaks, accelerator, state, val_loss, optimizer,
                        n_params, flops_tok, hw_flops_tok, seq_len)
    summary["rank_weight_sha256"] = weight_checksums(raw_model, accelerator)
    if main:
        write_outputs(out, cfg, summary, raw_model, accelerator.device, meta.get("eos_id", 0))
    finish(accelerator)
    return summary


def finish(accelerator) -> None:
    """End the run on every rank: wait for the others, close the trackers and destroy the
    process group (accelerate's end_training), then sleep briefly with the GIL released.

    Why the sleep: after the last barrier a gloo worker thread still has to free that
    collective's work, which drops Python-owned tensors and so needs the GIL. If the main
    thread meanwhile frees the DDP/FSDP model, the model's reducer frees the process group,
    whose destructor joins the worker threads while holding the GIL: both wait forever (a
    known PyTorch hazard, pytorch/pytorch#56297). It hung a 2-process run here at exit, after
    all its files were written. Sleeping lets the worker finish first."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        time.sleep(0.2)


def write_outputs(out: Path, cfg: TrainConfig, summary: dict, model: Transformer, device,
                  eos_id: int) -> None:
    """The main rank's end-of-run files (summary.json, model.safetensors, samples.txt) and the
    report on stdout."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    save_model(model, str(out / "model.safetensors"))
    text = sample_text(model, out / "tokenizer.json", cfg, device, eos_id)
    (out / "samples.txt").write_text(f"prompt: {cfg.sample_prompt!r}\n\n{text}\n")
    report(summary, text)


def summarize(cfg, records, peaks, accelerator, state, val_loss, optimizer, n_params, flops_tok,
              hw_flops_tok, seq_len) -> dict:
    """summary.json: medians and spread over the steps after warm-up, and the run's settings."""
    steady = [r for r in records if r.get("step", 0) > cfg.warmup_steps_excluded and "loss" in r]
    if not steady:  # a run shorter than the warm-up: summarise what there is
        steady = [r for r in records if "loss" in r]
    world = accelerator.num_processes
    peak = peaks.spread()
    tok_s = distribution([r["tokens_per_s"] for r in steady])
    # MFU against the median peak, and the range the peak's spread implies.
    mfu = {k: (v * flops_tok / (peak["median"] * world) if isinstance(v, float) else v)
           for k, v in tok_s.items()}
    mfu_range = {"at_max_peak": tok_s["median"] * flops_tok / (peak["max"] * world),
                 "at_min_peak": tok_s["median"] * flops_tok / (peak["min"] * world)}
    summary = {
        "format": SUMMARY_FORMAT,
        "device": accelerator.device.type if accelerator.device.type != "cuda"
        else torch.cuda.get_device_name(accelerator.device),
        "world_size": world,
        "mixed_precision": cfg.mixed_precision,
        "activation_checkpointing": cfg.activation_checkpointing,
        "compile": cfg.compile,
        "techniques": techniques_in_use(cfg, optimizer),
        "threads_per_process": torch.get_num_threads(),
        "model": dataclasses.asdict(cfg.model) | {"params": n_params},
        "seq_len": seq_len,
        "batch_size": cfg.batch_size,
        "steps": len([r for r in records if "loss" in r]),
        "steps_in_summary": len(steady),
        "tokens": records[-1].get("tokens", 0),
        "model_flops_per_token": flops_tok,
        "hardware_flops_per_token": hw_flops_tok,
        "skipped_steps": state["skipped_steps"],
        "initial_val_loss": state["initial_val_loss"],
        "final_val_loss": val_loss,
        "final_train_loss": records[-1].get("loss"),
        "tokens_per_s": tok_s,
        "tokens_per_s_per_process": {k: (v / world if isinstance(v, float) else v)
                                     for k, v in tok_s.items()},
        "mfu": mfu,
        "mfu_range_from_peak_spread": mfu_range,
        "hfu": {"median": tok_s["median"] * hw_flops_tok / (peak["median"] * world)},
        "peak_flops_per_process": peak,
        "step_s": distribution([r["step_s"] for r in steady]),
        "data_wait_s": distribution([r["data_wait_s"] for r in steady]),
        "fwd_bwd_s": distribution([r["fwd_bwd_s"] for r in steady]),
        "optim_s": distribution([r["optim_s"] for r in steady]),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in steady),
        "grad_allreduce_s": distribution([r["grad_allreduce_s"] for r in records
                                          if "grad_allreduce_s" in r]),
        "mfu_above_100_percent": bool(mfu["median"] and mfu["median"] > 1.0),
    }
    if summary["mfu_above_100_percent"]:
        log.error("MFU above 100%: the FLOP count or the measured peak is wrong; see summary.json")
    return summary


def report(summary: dict, sample: str) -> None:
    """The end-of-run report on stdout."""
    peak = summary["peak_flops_per_process"]
    lines = [
        "",
        "=" * 72,
        f"run summary ({summary['world_size']} process(es), {summary['device']}, "
        f"precision {summary['mixed_precision']})",
        f"  val loss           {summary['initial_val_loss']:.4f} -> {summary['final_val_loss']:.4f}",
        f"  tokens/s (median)  {summary['tokens_per_s']['median']:,.0f} "
        f"(p10 {summary['tokens_per_s']['p10']:,.0f}, p90 {summary['tokens_per_s']['p90']:,.0f})",
        f"  MFU (median)       {summary['mfu']['median']:.2%} "
        f"(peak spread gives {summary['mfu_range_from_peak_spread']['at_max_peak']:.2%}"
        f"..{summary['mfu_range_from_peak_spread']['at_min_peak']:.2%})",
        f"  peak per process   {peak['median'] / 1e12:.3f} TFLOP/s, min {peak['min'] / 1e12:.3f}, "
        f"max {peak['max'] / 1e12:.3f} ({peak['source']})",
        f"  step time          {summary['step_s']['median'] * 1e3:.0f} ms median, data wait "
        f"{summary['data_wait_s']['median'] * 1e3:.2f} ms",
        f"  peak memory        {summary['peak_mem_bytes'] / 2**20:.0f} MiB per process",
        *([f"  grad all-reduce    {summary['grad_allreduce_s']['median'] * 1e3:.1f} ms alone "
           "(overlapped with backward in the step)"] if summary["grad_allreduce_s"]["n"] else []),
        "-" * 72,
        "sample:",
        sample,
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)
