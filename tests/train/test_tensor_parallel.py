"""The fused q/k/v and gate/up weights shard by head and by hidden column exactly as separate
projections would (train/tensor_parallel.py): the shards equal the separate weights' shards,
and the N ranks' partial outputs, summed (the all-reduce), equal the unsharded sub-layer."""

import pytest
import torch

from model.config import ModelConfig
from model.hf import split_fused
from model.transformer import Transformer, apply_rope, causal_attention
from train.tensor_parallel import shard_blocks, shard_columns, shard_gate_up, shard_qkv

CFG = ModelConfig(vocab_size=61, seq_len=16, n_layer=1, d_model=64, n_head=8, n_kv_head=4)


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_shards_equal_the_separate_projections_shards(world):
    m = model()
    separate = split_fused(m.state_dict(), CFG)
    for rank in range(world):
        qkv = shard_qkv(m.blocks[0].attn.wqkv.weight, CFG, rank, world)
        expect = torch.cat([separate[f"blocks.0.attn.{w}.weight"].chunk(world)[rank]
                            for w in ("wq", "wk", "wv")])
        assert torch.equal(qkv, expect)
        gate_up = shard_gate_up(m.blocks[0].mlp.w_gate_up.weight, CFG.ffn_hidden, rank, world)
        expect = torch.cat([separate[f"blocks.0.mlp.{w}.weight"].chunk(world)[rank]
                            for w in ("w_gate", "w_up")])
        assert torch.equal(gate_up, expect)


@pytest.mark.parametrize("world", [2, 4])
def test_sum_of_rank_outputs_is_the_unsharded_sublayer(world):
    """Each rank runs the block's own forward on its heads / hidden columns; the sum of the
    ranks' outputs (what the all-reduce computes) is the full attention and MLP output."""
    m = model()
    attn, mlp = m.blocks[0].attn, m.blocks[0].mlp
    x = torch.randn(2, 16, CFG.d_model)
    cos, sin = m.rope_cos[:16], m.rope_sin[:16]
    H, H_kv, D = CFG.n_head // world, CFG.n_kv_head // world, CFG.head_dim
    attn_sum, mlp_sum = 0, 0
    with torch.no_grad():
        for r in range(world):
            qkv = x @ shard_qkv(attn.wqkv.weight, CFG, r, world).t()
            qk, v = qkv.view(2, 16, H + 2 * H_kv, D).split([H + H_kv, H_kv], 2)
            q, k = apply_rope(qk, cos[:, None], sin[:, None]).transpose(1, 2).split([H, H_kv], 1)
            rep = H // H_kv
            k, v = k.repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
            heads = causal_attention(q, k, v, 0).transpose(1, 2).reshape(2, 16, -1)
            attn_sum = attn_sum + heads @ shard_columns(attn.wo.weight, r, world).t()
            gate, up = (x @ shard_gate_up(mlp.w_gate_up.weight, CFG.ffn_hidden, r, world).t()
                        ).chunk(2, -1)
            hidden = torch.nn.functional.silu(gate) * up
            mlp_sum = mlp_sum + hidden @ shard_columns(mlp.w_down.weight, r, world).t()
        assert torch.allclose(attn_sum, attn(x, cos, sin), atol=1e-5)
        assert torch.allclose(mlp_sum, mlp(x), atol=1e-5)


def test_uneven_shards_are_refused():
    w = torch.zeros(12, 4)
    with pytest.raises(ValueError, match="must split into 5 equal shards"):
        shard_blocks(w, [6, 6], 0, 5)
    with pytest.raises(ValueError, match="do not add up"):
        shard_blocks(w, [6, 5], 0, 2)
    with pytest.raises(ValueError, match="n_kv_head \\(4\\) divisible"):
        shard_qkv(model().blocks[0].attn.wqkv.weight, CFG, 0, 8)
