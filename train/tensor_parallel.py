"""Tensor-parallel shards of the fused projections (Megatron-LM style: Shoeybi et al. 2019).

Megatron splits attention by head and the MLP by hidden column: the projections into heads
(q, k, v) and into the hidden layer (gate, up) are column-parallel (rank r of N keeps 1/N of
their output rows), the projections out of them (attention's `wo`, the MLP's `w_down`) are
row-parallel (rank r keeps the matching 1/N of their input columns), and one all-reduce of
the partial outputs ends each sub-layer.

The model fuses q/k/v into `attn.wqkv` and gate/up into `mlp.w_gate_up`, stacking the separate
weights' rows (`model/transformer.py`). A contiguous 1/N of a fused weight's rows would hand
rank 0 all the queries and rank N-1 all the values, so each fused weight is sharded block by
block: rank r takes its 1/N of every block and stacks them again, which is exactly what
sharding the separate projections would have given it, in the fused layout, so the rank's
module runs the same forward with H/N query and H_kv/N key/value heads.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


def shard_blocks(weight: torch.Tensor, blocks: list[int], rank: int, world: int) -> torch.Tensor:
    """Rows of rank `rank` of `world` from each block of `weight` (blocks of `blocks` rows,
    stacked), stacked in the same order; every block must split evenly."""
    if sum(blocks) != weight.size(0):
        raise ValueError(f"blocks {blocks} do not add up to the weight's {weight.size(0)} rows")
    if not 0 <= rank < world or any(b % world for b in blocks):
        raise ValueError(f"rank {rank} of {world}: each block of {blocks} rows must split "
                         f"into {world} equal shards")
    return torch.cat([block.chunk(world)[rank] for block in weight.split(blocks)])


def shard_qkv(weight: torch.Tensor, cfg: ModelConfig, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s rows of `attn.wqkv.weight`: query heads [r H/N, (r+1) H/N) and key/value
    heads [r H_kv/N, (r+1) H_kv/N), so that query head h still reads key/value head h // n_rep
    on the same rank (N must divide n_kv_head)."""
    if cfg.n_kv_head % world:
        raise ValueError(f"tensor parallelism of {world} needs n_kv_head ({cfg.n_kv_head}) "
                         "divisible by it: a rank holds whole key/value heads")
    d = cfg.head_dim
    return shard_blocks(weight, [cfg.n_head * d, cfg.n_kv_head * d, cfg.n_kv_head * d],
                        rank, world)


def shard_gate_up(weight: torch.Tensor, hidden: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s rows of `mlp.w_gate_up.weight`: hidden columns [r h/N, (r+1) h/N) of the
    gate and of the up projection, so silu(gate) * up pairs the same columns on one rank."""
    return shard_blocks(weight, [hidden, hidden], rank, world)


def shard_columns(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s input columns of a row-parallel weight (`wo`, `w_down`)."""
    if weight.size(1) % world:
        raise ValueError(f"{weight.size(1)} input columns do not split into {world} shards")
    return weight.chunk(world, dim=1)[rank]
