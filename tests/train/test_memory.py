import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train import memory
from train.config import load_config
from train.memory import check_memory, estimate_memory, loss_bytes

# One layer, d=64, 4 heads (n_kv_head = 4), SwiGLU width 8*64/3 = 170 -> 192, vocab 100, tied.
SMALL = ["model.n_layer=1", "model.d_model=64", "model.n_head=4", "model.vocab_size=100",
         "model.seq_len=32", "micro_batch_size=2", "batch_size=2"]


def test_estimate_by_hand():
    params = 100 * 64 + 4 * 64 * 64 + 3 * 64 * 192 + 3 * 64  # embedding, q k v o, SwiGLU, norms
    assert params == 59840
    est = estimate_memory(load_config(None, SMALL))
    assert (est.weights, est.grads, est.optimizer) == (4 * params, 4 * params, 8 * params)
    # s*b*h*(34 + 5*a*s/h) = 32*2*64*(34 + 10) bytes in 16-bit, x2 in fp32
    layer = 32 * 2 * 64 * 34 + 5 * 4 * 32 * 32 * 2
    assert layer == 180224
    assert est.activations == 2 * layer
    # the chunked loss, one chunk of 64 tokens: one fp32 [64, 100] logit buffer, the fp32 weight
    # gradient [100, 64] and input gradient [64, 64]; not the whole 2 * 4*s*b*V of before
    loss = 4 * 64 * 100 + 4 * 100 * 64 + 4 * 64 * 64
    assert est.loss == loss == 67584
    assert est.total == 16 * params + 2 * layer + loss

    bf16 = estimate_memory(load_config(None, SMALL + ["mixed_precision=bf16"]))
    # + the buffer's bf16 twin [64, 100] and the bf16 weight copy [100, 64]
    assert bf16.activations == layer and bf16.loss == loss + 2 * 64 * 100 + 2 * 100 * 64
    # full recomputation: the layer keeps its input (2*s*b*h), and is recomputed once in backward
    full = estimate_memory(load_config(None, SMALL + ["activation_checkpointing=full"]))
    assert full.activations == 2 * (2 * 32 * 2 * 64 + layer)
    attention = estimate_memory(load_config(None, SMALL + ["activation_checkpointing=attention"]))
    assert attention.activations == 2 * (32 * 2 * 64 * (34 - 11 + 2))
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


# Runs in its own process: glibc must serve every large tensor by mmap (a fixed
# MALLOC_MMAP_THRESHOLD_), so that freeing it returns the pages and the peak resident memory
# (VmHWM, reset by writing 5 to /proc/self/clear_refs) is the peak of what torch held.
PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from model.transformer import linear_cross_entropy
    torch.set_num_threads(1)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    for shape in sys.argv[1:]:
        N, d, V, chunk = map(int, shape.split(","))
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            h = torch.randn(N, d, requires_grad=True)
            w = torch.randn(V, d, requires_grad=True)
            t = torch.randint(0, V, (N,))
            linear_cross_entropy(h, w, t, dtype, chunk).backward()  # warm-up: lazy allocations
            h.grad = w.grad = None
            open("/proc/self/clear_refs", "w").write("5")
            base = status("VmRSS")
            linear_cross_entropy(h, w, t, dtype, chunk).backward()
            print(shape, name, status("VmHWM") - base)
""")
# (N, d, V, chunk): first the chunk's logits dominate; then d = 16n, where the [V, d] weight
# gradient does: its 16-bit product must be made in blocks, and the backward must not copy it;
# then a single chunk with d = 16n, whose 16-bit weight-gradient product is made whole
SHAPES = [(1024, 64, 8192, 256), (256, 1024, 8192, 64), (64, 1024, 8192, 256)]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_loss_estimate_matches_measured_peak():
    """loss_bytes against the peak memory torch really took for the chunked LM head and loss,
    forward and backward, on this CPU, in fp32 and bf16: within 10%. For the first shape the
    full-logits formula of before (2 x 4 x tokens x V) is 4x over it."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(root)}
    shapes = [",".join(map(str, shape)) for shape in SHAPES]
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *shapes], env=env, cwd=root,
                         check=True, capture_output=True, text=True, timeout=300).stdout
    measured = {(shape, name): int(v) for shape, name, v in
                (line.split() for line in out.strip().splitlines())}
    for (N, d, V, chunk), shape in zip(SHAPES, shapes, strict=True):
        for name, e in (("fp32", 4), ("bf16", 2)):
            est = loss_bytes(N, V, d, e, chunk)
            assert est == pytest.approx(measured[shape, name], rel=0.1), (shape, name, est)
    N, d, V, chunk = SHAPES[0]
    assert 2 * 4 * N * V > 4 * max(measured[shapes[0], name] for name in ("fp32", "bf16"))
