import pytest
import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.transformer import Transformer
from train.parallel.procs import spawn

CFG = dict(vocab_size=64, seq_len=16, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
           ffn_hidden=128)


def _check_tp_harness(rank: int) -> None:
    """The harness's Megatron-sharded model trains like the whole one: same loss, and each
    sharded weight's gradient is its slice of the whole model's (tolerance: fp32 summation
    order)."""
    from train.parallel.collectives_bench import tensor_parallel
    from train.tensor_parallel import shard_columns, shard_qkv

    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    whole = Transformer(cfg)
    torch.manual_seed(0)
    tp = tensor_parallel(Transformer(cfg))
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    _, loss_whole = whole(idx, idx)
    _, loss_tp = tp(idx, idx)
    loss_whole.backward()
    loss_tp.backward()
    torch.testing.assert_close(loss_tp, loss_whole, rtol=1e-5, atol=1e-5)
    for i in range(cfg.n_layer):
        w, t = whole.blocks[i].attn, tp.blocks[i].attn
        torch.testing.assert_close(t.wqkv.weight.grad, shard_qkv(w.wqkv.weight.grad, cfg, rank, 2),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t.wo.weight.grad, shard_columns(w.wo.weight.grad, rank, 2),
                                   rtol=1e-4, atol=1e-5)
    # replicated parameters see the whole gradient (f's all-reduce of the input gradients)
    torch.testing.assert_close(tp.tok_emb.weight.grad, whole.tok_emb.weight.grad,
                               rtol=1e-4, atol=1e-5)
    dist.barrier()  # both ranks done before the group is torn down


@pytest.mark.slow
def test_tensor_parallel_harness_matches_one_process():
    spawn(_check_tp_harness, 2)
