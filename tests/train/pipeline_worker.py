"""The training both sides of the pipeline parity tests run (tests/train/test_pipeline.py):
a tiny Transformer, a fixed random batch per step, AdamW; one process whole, or pp processes
each holding its stages (train.parallel.pipeline)."""

import gc
import json
import weakref
from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from train.checkpoint import load_whole_into_stages
from train.fsdp import load_sharded, save_sharded
from train.optim import param_groups
from train.parallel.pipeline import dp_pp_groups, split

LR = 1e-2
BATCH, SEQ, VOCAB = 8, 16, 64


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainer's two groups (`train.optim.param_groups`: decay on matrices),
    whose order a whole-model checkpoint's optimizer state follows."""
    return torch.optim.AdamW(param_groups(model, 0.01), lr=LR)


def build(tie: bool, n_layer: int = 4) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=n_layer, d_model=32,
                                   n_head=4, n_kv_head=2, ffn_hidden=64, tie_embeddings=tie))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [BATCH, SEQ] of a step, some targets ignored (-100): random starts,
    then next = (7 * token + 3) % VOCAB, a rule the model learns within a few steps."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=torch.Generator().manual_seed(step))
    x = [start]
    for _ in range(SEQ):
        x.append((7 * x[-1] + 3) % VOCAB)
    x = torch.cat(x, dim=1)
    targets = x[:, 1:].clone()
    targets[0, :3] = -100
    return x[:, :-1], targets


def one_process(tie: bool, steps: int) -> dict[str, list[float]]:
    """Loss and gradient norm per step of the whole model in one process."""
    model = build(tie)
    return one_process_steps(model, adamw(model), 0, steps)


def one_process_steps(model: Transformer, opt, first: int, steps: int) -> dict[str, list[float]]:
    """Steps first .. steps-1 of `one_process`'s training, from `model` and `opt` as they are."""
    out = {"loss": [], "grad_norm": []}
    for step in range(first, steps):
        idx, targets = batch(step)
        _, loss_sum = model(idx, targets)
        loss = loss_sum / (targets != -100).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
        opt.zero_grad()
        out["loss"].append(loss.item())
        out["grad_norm"].append(norm.item())
    return out


def pipelined(rank: int, schedule: str, microbatches: int, tie: bool, steps: int,
              path: str) -> None:
    """The same training with the model pipelined over the world's ranks (no data
    parallelism: the default pipeline group, the whole batch); rank 0 writes
    {"loss": [...], "grad_norm": [...], "bubble": [...]} to path."""
    pipe = split(build(tie), schedule, microbatches)
    train(rank, pipe, lambda idx, targets: pipe.step(idx, targets), steps, path)


def dp_pipelined(rank: int, dp: int, schedule: str, microbatches: int, tie: bool, steps: int,
                 path: str) -> None:
    """The same training on dp x pp ranks: replica d takes rows d::dp of every batch, its
    pipeline the model; gradients summed over replicas. Rank 0 writes losses as `pipelined`."""
    pp = torch.distributed.get_world_size() // dp
    pp_group, dp_group, tied_group = dp_pp_groups(dp, pp, tie)
    pipe = split(build(tie), schedule, microbatches, pp_group, tied_group)
    d = rank // pp

    def replica_step(idx, targets):
        loss, clock = pipe.step(idx[d::dp], targets[d::dp], (targets != -100).sum())
        pipe.reduce_dp(dp_group)
        torch.distributed.all_reduce(loss, group=dp_group)
        return loss, clock

    train(rank, pipe, replica_step, steps, path)


def train(rank: int, pipe, step_fn, steps: int, path: str, opt=None, first: int = 0) -> None:
    """AdamW steps (first .. steps-1) of `pipe`, step_fn(idx, targets) -> (loss, clock) doing
    forward and backward; rank 0 writes loss, gradient norm and bubble per step to path."""
    opt = opt or adamw(pipe.module)
    out = {"loss": [], "grad_norm": [], "bubble": []}
    for step in range(first, steps):
        loss, clock = step_fn(*batch(step))
        norm = pipe.clip_grad_norm_(0.0)
        opt.step()
        opt.zero_grad()
        out["loss"].append(loss.item())
        out["grad_norm"].append(norm.item())
        out["bubble"].append(clock.bubble)
    if rank == 0:
        Path(path).write_text(json.dumps(out))


def held(rank: int, schedule: str, tie: bool, n_layer: int, stage_split: str, path: str) -> None:
    """Split a model of `n_layer` blocks, take one AdamW step; each rank writes to path.RANK
    what it holds: its model's parameter names and element count, its pipeline modules'
    element count, its AdamW moments' element count, how many of the whole model's blocks
    are still alive (not freed), and every stage's blocks."""
    model = build(tie, n_layer)
    alive = [weakref.ref(block) for block in model.blocks]
    pipe = split(model, schedule, 4, stage_split=stage_split)
    opt = adamw(model)
    pipe.step(*batch(0))
    opt.step()
    gc.collect()
    Path(f"{path}.{rank}").write_text(json.dumps({
        "names": sorted(n for n, _ in model.named_parameters()),
        "numel": sum(p.numel() for p in model.parameters()),
        "module_numel": sum(p.numel() for p in pipe.module.parameters()),
        "moments_numel": sum(v.numel() for st in opt.state.values()
                             for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")),
        "blocks_alive": sum(ref() is not None for ref in alive),
        "ranges": [[r.start, r.stop] for r in pipe.ranges]}))


def save_pipelined(rank: int, schedule: str, tie: bool, steps: int, path: str) -> None:
    """`steps` pipelined AdamW steps, then every rank writes its stages' weights and AdamW
    state to directory path as a pipelined run's checkpoint does (train.fsdp.save_sharded,
    flat)."""
    model = build(tie)
    pipe = split(model, schedule, 4)
    opt = adamw(model)
    for step in range(steps):
        pipe.step(*batch(step))
        opt.step()
        opt.zero_grad()
    save_sharded(path, model, opt, flat=True)


def resume_pipelined(rank: int, schedule: str, tie: bool, checkpoint: str, first: int,
                     steps: int, path: str) -> None:
    """Load a checkpoint into this rank's stages: DCP of any layout (train.fsdp.load_sharded),
    or a whole-model one (train.checkpoint.load_whole_into_stages),
    then train steps first .. steps-1 as `pipelined`; rank 0 writes losses to path."""
    model = build(tie)
    pipe = split(model, schedule, 4)
    opt = adamw(model)
    if Path(checkpoint, "model.safetensors").exists():  # the one-process format
        load_whole_into_stages(Path(checkpoint), model, opt)
    else:
        load_sharded(checkpoint, model, opt, flat=True)
    train(rank, pipe, lambda idx, targets: pipe.step(idx, targets), steps, path, opt, first)
