"""The processes of a run: the Accelerator, thread counts, all-rank sums and a clean exit."""

from __future__ import annotations

import hashlib
import os
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator

from train import trackers
from train.config import TrainConfig


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


def global_sum(value: float | torch.Tensor, accelerator: Accelerator) -> float:
    """Sum of a scalar over all ranks."""
    t = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).clone()
    if accelerator.num_processes > 1:
        dist.all_reduce(t)
    return float(t)


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


def finish(accelerator: Accelerator) -> None:
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
