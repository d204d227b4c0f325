"""The training the tensor/context-parallel parity tests run (tests/train/test_tp_cp.py): the
pipeline tests' tiny model and batches (tests/train/pipeline_worker.py), here split by
train.parallel.layout over the world's ranks."""

import json
from pathlib import Path

import torch
import torch.distributed as dist

from tests.train.pipeline_worker import adamw, batch, build
from train.parallel.layout import Layout, Parallel


def parallel_train(rank: int, tp: int, cp: int, sp: bool, tie: bool, steps: int, path: str,
                   shard: bool = False) -> None:
    """AdamW steps of the tiny model on tp x cp x dp ranks (dp = the rest; replica d takes rows
    d::dp of each batch), data parallel by DDP or, with `shard`, FSDP2; rank 0 writes {"loss": [...], "grad_norm": [...], "tp_comm_s": [...],
    "cp_comm_s": [...]} to path."""
    world = dist.get_world_size()
    layout = Layout(tp, cp, world // (tp * cp), rank, sp, shard)
    parallel = Parallel(layout)
    model = parallel.apply(build(tie))
    ddp = parallel.wrap(model)
    opt = adamw(model)  # the reference's groups: decay on matrices only
    clip = parallel.clip_grad_norm_(torch.nn.utils.clip_grad_norm_)
    out = {"loss": [], "grad_norm": [], "tp_comm_s": [], "cp_comm_s": []}
    for step in range(steps):
        idx, targets = batch(step)
        d, dp = layout.dp_rank, layout.dp
        _, loss_sum = ddp(idx[d::dp], targets[d::dp])
        # the whole batch's token count; DDP averages over dp x cp (layout.py's docstring)
        (loss_sum * dp / (targets != -100).sum()).backward()
        norm = clip(model.parameters(), float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP at tp=1
        opt.step()
        opt.zero_grad()
        loss = loss_sum.detach().double() / (targets != -100).sum()
        dist.all_reduce(loss)  # every rank of the grid: tp x cp copies of each dp share
        out["loss"].append(loss.item() / layout.replicas)
        out["grad_norm"].append(norm.item())
        for key, seconds in parallel.comm_seconds().items():
            out.setdefault(key, []).append(seconds)
    if rank == 0:
        Path(path).write_text(json.dumps(out))
