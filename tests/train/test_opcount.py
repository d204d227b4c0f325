"""Dispatched operations per training step (train/opcount.py, `train.bench --count-ops`): a
guard on the lean step's count, and the counter itself (views skipped, phases split)."""

import torch

from model.config import get_preset
from model.transformer import Transformer
from train.bench import adamw
from train.opcount import OpCounter, count_step, summarize

# What the lean step reached (issue 25) at the tiny preset (2 layers, d 64, 4 heads, 2 kv
# heads), vocab 256, batch 1 x 32, bf16 autocast on CPU: 105 forward + 108 backward. Before
# it (dd19323): 155 + 192 = 347. The guard fails at more than 5% above.
LEAN_FWD_BWD = 213


def tiny_step_counts(bf16: bool = True) -> dict:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=256))
    optimizer, _ = adamw(model)
    x, y = torch.randint(0, 256, (2, 1, 32))
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": bf16}

    def loss():
        return model(x, y)[1] / y.numel()

    count_step(loss, optimizer, autocast)  # the first step builds the optimizer state
    return summarize(count_step(loss, optimizer, autocast))


def test_lean_step_op_count_does_not_grow():
    counts = tiny_step_counts()
    print(counts)
    assert counts["fwd_bwd"] <= 1.05 * LEAN_FWD_BWD, counts["top_fwd_bwd"]
    assert counts["optimizer"] <= 10  # the fused AdamW: one kernel per parameter group and step


def test_counter_skips_views_and_splits_phases():
    a = torch.randn(4, 6, requires_grad=True)
    with OpCounter() as counter:
        b = a.t().contiguous().view(24)[:5]  # t, view, slice: views; contiguous: a copy
        loss = (b * 2).sum()
        counter.phase = "backward"
        loss.backward()
    assert counter.counts["forward"] == {"clone": 1, "mul": 1, "sum": 1}
    assert counter.counts["backward"]["mul"] == 1  # grad * 2; the rest is views and copies
