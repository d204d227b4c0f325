from types import SimpleNamespace

import pytest
import torch

from train import memory
from train.config import load_config
from train.memory import check_memory, estimate_memory

# One layer, d=64, 4 heads (n_kv_head = 4), SwiGLU width 8*64/3 = 170 -> 192, vocab 100, tied.
SMALL = ["model.n_layer=1", "model.d_model=64", "model.n_head=4", "model.vocab_size=100",
         "model.seq_len=32", "micro_batch_size=2", "batch_size=2"]


def test_estimate_by_hand():
    params = 100 * 64 + 4 * 64 * 64 + 3 * 64 * 192 + 3 * 64  # embedding, q k v o, SwiGLU, norms
    assert params == 59840
    est = estimate_memory(load_config(None, SMALL))
    assert (est.weights, est.grads, est.optimizer) == (4 * params, 4 * params, 8 * params)
    # s*b*h*(34 + 5*a*s/h) = 32*2*64*(34 + 10) bytes in 16-bit, x2 in fp32; logits 2*4*s*b*V
    layer = 32 * 2 * 64 * 34 + 5 * 4 * 32 * 32 * 2
    assert layer == 180224
    assert est.activations == 2 * layer + 2 * 4 * 32 * 2 * 100
    assert est.total == 16 * params + 2 * layer + 51200

    bf16 = estimate_memory(load_config(None, SMALL + ["mixed_precision=bf16"]))
    assert bf16.activations == layer + 51200
    # full recomputation: the layer keeps its input (2*s*b*h), and is recomputed once in backward
    full = estimate_memory(load_config(None, SMALL + ["activation_checkpointing=full"]))
    assert full.activations == 2 * (2 * 32 * 2 * 64 + layer) + 51200
    attention = estimate_memory(load_config(None, SMALL + ["activation_checkpointing=attention"]))
    assert attention.activations == 2 * (32 * 2 * 64 * (34 - 11 + 2)) + 51200
    sharded = estimate_memory(load_config(None, SMALL + ["fsdp=true"]), world=2)
    assert sharded.weights == 2 * params and sharded.optimizer == 4 * params


def test_too_big_is_refused_before_allocation(monkeypatch):
    cfg = load_config(None, ["model.vocab_size=512", "model.d_model=16384", "model.n_layer=64",
                             "model.n_head=128"])
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"needs ~3,4\d\d\.\d GB .*weights 82\d\.\d GB.* is "
                                         r"available on this host"):
        check_memory(cfg, accelerator)
    tiny = load_config(None, SMALL)
    assert check_memory(tiny, accelerator).total < 2e6
    monkeypatch.setattr(memory, "free_memory", lambda device, local: (10**6, "free on cuda:0"))
    with pytest.raises(ValueError, match="only 1.0 MB is free on cuda:0"):
        check_memory(tiny, accelerator)
