"""What a run records: one metrics.jsonl line per step, summary.json at the end, a report on stdout.

A step's record holds its loss, learning rate and gradient norm, the phase timings of
`train.clock.PhaseTimer`, throughput (tokens/s of all ranks), MFU and HFU against the peak of
all processes (one figure per machine for the whole run, `train.clock.PeakSampler`), peak memory
and an ETA (the median step time after warm-up, times the steps left). The loop writes the
records of a log interval together, at its log step, when it reads the device's figures.
summary.json (`contracts.run`) keeps medians and spread over the steps after
`warmup_steps_excluded`, because the first steps pay for allocation, compilation and cold caches.
An MFU above 100% cannot be a measurement (the FLOP count or the peak is wrong): the first such
step is logged as a warning, and the summary counts them all (`mfu_steps_above_100_percent`).
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from contracts.run import read_metrics
from model.flops import count_params, model_flops_per_token
from train.clock import PeakSampler, PhaseTimer, StepTimes, device_name, peak_memory_bytes
from train.data import BatchLoader
from train.distributed import global_sum

log = logging.getLogger("train")
SUMMARY_FORMAT = 1
ETA_WINDOW = 100  # steps whose median step time makes the ETA


@dataclass
class StepResult:
    """The figures of one optimizer step, the same on every rank (all-reduced).

    The training step leaves loss, grad_norm, skipped and bad as 0-d device tensors, so that
    it never waits for the device; `resolve_steps` reads those of many steps at once.
    """

    loss: float | torch.Tensor  # mean train loss per token over the step's tokens of all ranks
    grad_norm: float | torch.Tensor  # global gradient norm before clipping
    tokens: float  # target tokens of the step, all ranks
    skipped: bool | torch.Tensor  # no update was applied (non-finite values, or an fp16 overflow)
    bad: bool | torch.Tensor  # non-finite loss or gradient without a grad scaler to absorb it


DEVICE_FIELDS = {"loss": float, "grad_norm": float, "skipped": bool, "bad": bool}


def resolve_steps(results: list[StepResult]) -> list[StepResult]:
    """The steps' figures as Python numbers: every device tensor among them is read in one
    transfer (one wait for the device, at a log step, instead of several per step)."""
    slots = [(i, name) for i, r in enumerate(results) for name in DEVICE_FIELDS
             if isinstance(getattr(r, name), torch.Tensor)]
    values = torch.stack([getattr(results[i], name).detach().reshape(()).double()
                          for i, name in slots]).tolist() if slots else []
    resolved = [replace(r) for r in results]
    for (i, name), value in zip(slots, values, strict=True):
        setattr(resolved[i], name, DEVICE_FIELDS[name](value))
    return resolved


@dataclass
class RunInfo:
    """Facts of the run fixed at set-up, which turn step timings into FLOP rates."""

    steps: int  # the configured number of steps (for the ETA)
    world_size: int
    device: str  # "cpu", or the GPU's name
    params: int
    seq_len: int
    model_flops_per_token: float
    hardware_flops_per_token: float  # with activation recomputation
    techniques: dict
    threads_per_process: int
    warmup_steps_excluded: int = 0  # steps left out of the ETA (compilation, cold caches)

    @classmethod
    def of(cls, cfg, accelerator, model, optimizer, seq_len: int) -> RunInfo:
        from train.techniques import executed_flops_per_token, techniques_in_use

        return cls(
            steps=cfg.steps, world_size=accelerator.num_processes,
            device=device_name(accelerator.device), params=count_params(cfg.model), seq_len=seq_len,
            model_flops_per_token=model_flops_per_token(cfg.model, seq_len),
            hardware_flops_per_token=executed_flops_per_token(cfg, seq_len),
            techniques=techniques_in_use(cfg, optimizer),
            threads_per_process=torch.get_num_threads(),
            warmup_steps_excluded=cfg.warmup_steps_excluded)

    def describe(self, cfg, accelerator, accum: int, windows: int) -> str:
        """The start-up line: the model, the processes and the batch."""
        return (f"model: {self.params / 1e6:.2f}M params, {self.model_flops_per_token / 1e6:.1f} "
                f"MFLOP/token | {self.world_size} process(es) on {accelerator.device} "
                f"({accelerator.distributed_type}), {self.threads_per_process} threads each | "
                f"precision {cfg.mixed_precision} | batch {cfg.batch_size} x {self.seq_len} "
                f"tokens = {accum} micro-batch(es) of {cfg.micro_batch_size} per rank | "
                f"train windows {windows}")


def distribution(values: list[float]) -> dict:
    """Median and 10th/90th percentiles (nearest rank) of a list of numbers."""
    if not values:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"median": statistics.median(ordered), "p10": pct(0.1), "p90": pct(0.9), "n": len(ordered)}


@dataclass
class PendingStep:
    """A finished step whose figures are still on the device, until the next flush."""

    step: int
    lr: float
    tokens: int  # the run's tokens after this step
    result: StepResult
    times: StepTimes
    extra: dict  # val_loss, grad_allreduce_s at evaluation steps


def _writing(path: Path, needed: int):
    """A full or read-only disk during a write to `path`: one line naming it (train.rundir)."""
    from train.rundir import disk_space  # train.rundir imports this module

    return disk_space(path, needed)


@torch.no_grad()
def evaluate(model, loader: BatchLoader, batches: int, accelerator) -> float:
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


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (main process only); every
    rank keeps the records, from which the summary is computed."""

    def __init__(self, path: Path, enabled: bool, info: RunInfo, peaks: PeakSampler):
        self.path, self.enabled, self.info, self.peaks = path, enabled, info, peaks
        self.records: list[dict] = []
        self.warned_mfu = False
        self.steady_step_s: list[float] = []  # step times after warm-up, for the ETA

    def resume(self, step: int) -> None:
        """Keep the records up to `step` (those of the checkpoint resumed from) and drop the
        rest, so that a resumed run's file has every step exactly once."""
        records, torn = read_metrics(self.path)
        if torn:
            log.warning(f"{self.path}: its last line is torn (a crash or a full disk during an "
                        "append); resuming from the complete records before it")
        self.records = [r for r in records if r["step"] <= step]
        self.steady_step_s = [r["step_s"] for r in self.records if "step_s" in r
                              and r["step"] > self.info.warmup_steps_excluded]
        if self.enabled:
            text = "".join(json.dumps(r) + "\n" for r in self.records)
            with _writing(self.path, len(text.encode())):
                self.path.write_text(text)

    def flush(self, pending: list[PendingStep], account) -> dict | None:
        """Read the pending steps' figures (one wait for the device), then write each step's
        record in order and hand it to `account(step, result, record)`, which counts it and
        may stop the run there. Returns the last record.

        A training step never waits for the device: its loss, gradient norm and non-finite
        flag stay device tensors, and a non-finite step is skipped on the device (the fused
        AdamW's `found_inf`, as the grad scaler does: `train.optim.skip_update`). The loop
        flushes at log steps, step 1, evaluations, checkpoints, a stop and the last step, so
        metrics.jsonl still has every step. A run with `max_bad_steps` non-finite steps in a
        row stops at the next flush (its message names the step where the count was reached,
        and the metrics end there); checkpoints come at flushes, so "keep the last good
        checkpoint" is exact."""
        record = None
        for p, result in zip(pending, resolve_steps([p.result for p in pending]), strict=True):
            record = {**self.step_record(p.step, p.lr, result, p.tokens, p.times.resolve()),
                      **p.extra}
            self.write(record)
            account(p.step, result, record)
        pending.clear()
        return record

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            line = json.dumps(record) + "\n"
            with _writing(self.path, len(line) + 4096), open(self.path, "a") as f:
                f.write(line)

    def last_val_loss(self) -> float:
        return [r["val_loss"] for r in self.records if "val_loss" in r][-1]

    def step_record(self, step: int, lr: float, result: StepResult, tokens: int,
                    timer: PhaseTimer) -> dict:
        """The record of a step: its figures, timings, throughput and utilisation."""
        info, step_s = self.info, timer.total()
        tokens_per_s = result.tokens / step_s
        peak_total = self.peaks.median() * info.world_size
        record = {
            "step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
            "tokens": tokens, "step_s": step_s, **timer.phases,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_process": tokens_per_s / info.world_size,
            "model_tflops_per_s": info.model_flops_per_token * tokens_per_s / 1e12,
            "mfu": info.model_flops_per_token * tokens_per_s / peak_total,
            "hfu": info.hardware_flops_per_token * tokens_per_s / peak_total,
            "peak_mem_bytes": peak_memory_bytes(self.peaks.device),
            "eta_s": self.eta(step, step_s),
        }
        if result.skipped:
            record["skipped"] = True
        if record["mfu"] > 1.0 and not self.warned_mfu:
            self.warned_mfu = True
            log.warning(f"step {step}: MFU {record['mfu']:.1%} is above 100%, which no hardware "
                        f"reaches: the FLOP count or the peak ({self.peaks.source}) is wrong. "
                        "Every such step is counted in summary.json")
        return record


    def eta(self, step: int, step_s: float) -> float | None:
        """Seconds left: the median step time of the last ETA_WINDOW steps after warm-up
        (`warmup_steps_excluded`: compilation and cold caches would inflate it), times the
        steps left. None while every step so far is a warm-up step."""
        if step > self.info.warmup_steps_excluded:
            self.steady_step_s.append(step_s)
        recent = self.steady_step_s[-ETA_WINDOW:]
        return statistics.median(recent) * (self.info.steps - step) if recent else None


def step_line(record: dict, steps: int) -> str:
    """The progress log line of a step."""
    val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
    return (f"step {record['step']}/{steps} | loss {record['loss']:.4f}{val} | "
            f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | "
            f"MFU {record['mfu']:.1%} | data {record['data_wait_s'] * 1e3:.1f} ms | "
            + (f"ETA {record['eta_s']:.0f} s" if record.get("eta_s") is not None
               else "ETA after warm-up"))


def mfu_above_100(records: list[dict]) -> dict:
    """The steps whose MFU is above 100%: how many, the highest MFU, the first few steps."""
    above = [r for r in records if isinstance(r.get("mfu"), int | float) and r["mfu"] > 1.0]
    return {"count": len(above), "of_steps": sum("mfu" in r for r in records),
            "max": max((r["mfu"] for r in above), default=None),
            "steps": [r["step"] for r in above][:20]}


def summarize(cfg, info: RunInfo, metrics: MetricsLog, state) -> dict:
    """summary.json: medians and spread over the steps after warm-up, and the run's settings.
    `state` is the loop's TrainState (skipped steps, initial validation loss)."""
    records = metrics.records
    steady = [r for r in records if r.get("step", 0) > cfg.warmup_steps_excluded and "loss" in r]
    if not steady:  # a run shorter than the warm-up: summarise what there is
        steady = [r for r in records if "loss" in r]
    world, flops_tok, hw_flops_tok = info.world_size, info.model_flops_per_token, info.hardware_flops_per_token
    peak = metrics.peaks.spread()
    tok_s = distribution([r["tokens_per_s"] for r in steady])
    # MFU against the median peak, and the range the peak's spread implies.
    mfu = {k: (v * flops_tok / (peak["median"] * world) if isinstance(v, float) else v)
           for k, v in tok_s.items()}
    mfu_range = {"at_max_peak": tok_s["median"] * flops_tok / (peak["max"] * world),
                 "at_min_peak": tok_s["median"] * flops_tok / (peak["min"] * world)}
    summary = {
        "format": SUMMARY_FORMAT,
        "device": info.device,
        "world_size": world,
        "mixed_precision": cfg.mixed_precision,
        "activation_checkpointing": cfg.activation_checkpointing,
        "compile": info.techniques["compile"],  # what ran (compile=auto settled)
        "techniques": info.techniques,
        "threads_per_process": info.threads_per_process,
        "model": asdict(cfg.model) | {"params": info.params},
        "seq_len": info.seq_len,
        "batch_size": cfg.batch_size,
        "steps": len([r for r in records if "loss" in r]),
        "steps_in_summary": len(steady),
        "tokens": records[-1].get("tokens", 0),
        "model_flops_per_token": flops_tok,
        "hardware_flops_per_token": hw_flops_tok,
        "skipped_steps": state.skipped_steps,
        "initial_val_loss": state.initial_val_loss,
        "final_val_loss": metrics.last_val_loss(),
        "final_train_loss": records[-1].get("loss"),
        "tokens_per_s": tok_s,
        "tokens_per_s_per_process": {k: (v / world if isinstance(v, float) else v)
                                     for k, v in tok_s.items()},
        "mfu": mfu,
        "mfu_range_from_peak_spread": mfu_range,
        "hfu": {"median": tok_s["median"] * hw_flops_tok / (peak["median"] * world)},
        "peak_flops_per_process": peak,
        "peak_flops_machine": {**metrics.peaks.machine.to_dict(),
                               "processes_on_host": metrics.peaks.processes_on_host},
        "step_s": distribution([r["step_s"] for r in steady]),
        "data_wait_s": distribution([r["data_wait_s"] for r in steady]),
        "fwd_bwd_s": distribution([r["fwd_bwd_s"] for r in steady]),
        "optim_s": distribution([r["optim_s"] for r in steady]),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in steady),
        "grad_allreduce_s": distribution([r["grad_allreduce_s"] for r in records
                                          if "grad_allreduce_s" in r]),
        **{key: distribution([r[key] for r in steady]) for key in ("tp_comm_s", "cp_comm_s")
           if steady and all(key in r for r in steady)},  # exposed tensor/context-parallel collectives
        "mfu_steps_above_100_percent": (above := mfu_above_100(records)),
        "mfu_above_100_percent": above["count"] > 0,  # any step, warm-up included
    }
    return summary


def report(summary: dict, sample: str) -> None:
    """The end-of-run report on stdout."""
    peak, machine = summary["peak_flops_per_process"], summary["peak_flops_machine"]
    lines = [
        "",
        "=" * 72,
        f"run summary ({summary['world_size']} process(es), {summary['device']}, "
        f"precision {summary['mixed_precision']})",
        f"  val loss           {summary['initial_val_loss']:.4f} -> {summary['final_val_loss']:.4f}",
        f"  tokens/s (median)  {summary['tokens_per_s']['median']:,.0f} "
        f"(p10 {summary['tokens_per_s']['p10']:,.0f}, p90 {summary['tokens_per_s']['p90']:,.0f})",
        f"  MFU (median)       {summary['mfu']['median']:.2%} "
        f"(p10 {summary['mfu']['p10']:.2%}, p90 {summary['mfu']['p90']:.2%})",
        *([f"  MFU above 100%     at {above['count']} of {above['of_steps']} steps (max "
           f"{above['max']:.1%}): the FLOP count or the peak is wrong, not a measurement"]
          if (above := summary["mfu_steps_above_100_percent"])["count"] else []),
        f"  peak per process   {peak['median'] / 1e12:.4g} TFLOP/s = machine "
        f"{machine['flops'] / 1e12:.4g} / {machine['processes_on_host']} process(es) on the host "
        f"({machine['method']}" + (f": {machine['source']})" if machine["method"] == "catalog"
                                   else ")"),
        *[f"  {name:<18} {fig['flops'] / 1e12:.4g} TFLOP/s machine ({fig['source']})"
          for name in ("theoretical", "measured") if (fig := machine.get(name))],
        *([f"  peak note          {machine['note']}"] if machine.get("note") else []),
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
