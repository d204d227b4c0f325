"""Run by tests/train/test_techniques.py under a 2-process CPU launch: sharded checkpoints.

Trains a sharded tiny model 2 steps, saves a sharded checkpoint, loads it into a freshly built
sharded model and optimizer, then takes one more step with both: the weights must stay equal,
which needs the optimizer state (Adam's moments and step) to have been restored too.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

from contracts.checkpoint import write_manifest
from model.config import get_preset
from model.transformer import Transformer
from train import fsdp
from train.config import OptimConfig
from train.optim import build_optimizer


def build(acc: Accelerator, seed: int):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", vocab_size=512))
    fsdp.shard(model)
    return model, acc.prepare_optimizer(build_optimizer(model, OptimConfig(lr=1e-2), acc.device))


def step(model, optimizer, seed: int) -> None:
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(seed))
    _, loss = model(x, x)
    (loss / x.numel()).backward()
    optimizer.step()
    optimizer.zero_grad()


def main(path: str) -> None:
    acc = Accelerator()
    rank = acc.process_index
    model, optimizer = build(acc, seed=0)
    shard_numel = sum(p.to_local().numel() for p in model.parameters())
    assert shard_numel < 0.6 * model.num_params(), "parameters are not sharded"
    for s in range(2):
        step(model, optimizer, seed=10 * s + rank)
    fsdp.save_sharded(path, model, optimizer)
    if rank == 0:  # as train/checkpoint.py does: load_sharded refuses files without a manifest
        write_manifest(Path(path), 2, {})
    dist.barrier()
    other, other_optimizer = build(acc, seed=1)  # different initial weights
    fsdp.load_sharded(path, other, other_optimizer)
    for m, o in ((model, optimizer), (other, other_optimizer)):
        step(m, o, seed=100 + rank)
    a, b = fsdp.full_copy(model).state_dict(), fsdp.full_copy(other).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    dist.barrier()
    if rank == 0:
        print("sharded checkpoint round trip: OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
