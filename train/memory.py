"""Will the model fit? An estimate of training memory, checked before anything is allocated.

Per process, in bytes (P = parameters, `model.flops.count_params`):
- weights 4P, gradients 4P: parameters stay fp32 under mixed precision (autocast computes in
  16-bit, so the fp32 weights are also the master weights), and
- AdamW state 8P: two fp32 moments;
  the three divided by the world size under `fsdp=true` (sharded);
- activations of one micro-batch, after Korthikanti et al. 2022 (eq. 2, no tensor
  parallelism): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit (s = sequence length, b =
  micro-batch, h = d_model, a = heads), twice that in fp32 (mixed_precision=no). A layer whose
  whole forward is recomputed (activation_checkpointing full / every_k) keeps only its input,
  2*s*b*h, and one such layer's full activations exist during its backward; recomputing the
  attention sub-layer (attention) drops its 11*s*b*h + 5*a*s^2*b and keeps the input (2*s*b*h).
- the LM head and cross-entropy (`loss_bytes`): the model computes them chunk by chunk
  (`model.loss.linear_cross_entropy`, `Transformer.loss_chunk` tokens at a time), so
  only one chunk's logits exist, never the [s*b, V] float32 copy a plain cross-entropy keeps.

It is an estimate (fused attention kernels store less, the allocator more), used to refuse a
model that cannot fit long before it fails in the allocator: the free memory is
`torch.cuda.mem_get_info` on a GPU, and on a CPU the host's available memory
(`psutil.virtual_memory().available`) shared by the processes on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from model.flops import count_params, recomputed_layers
from model.transformer import Transformer
from train.config import TrainConfig


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    loss: int  # LM head + cross-entropy, chunked (loss_bytes)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.loss

    def describe(self) -> str:
        parts = ", ".join(f"{name} {_gb(getattr(self, name))}"
                          for name in ("weights", "grads", "optimizer", "activations", "loss"))
        return f"~{_gb(self.total)} ({parts})"


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def loss_bytes(tokens: int, vocab_size: int, d_model: int, compute_bytes: int,
               chunk: int = Transformer.loss_chunk) -> int:
    """Peak bytes of `linear_cross_entropy` over one micro-batch of `tokens` tokens, on top of
    what the model holds anyway (n = min(chunk, tokens) tokens per chunk, e = compute_bytes):

    - one chunk's logits in a float32 buffer, worked in place into the loss and the logits'
      gradient, and freed before the next chunk's matmul: 4nV;
    - under 16-bit compute, the buffer's 16-bit twin beside it (the matmul's output, then the
      gradient fed to the backward matmuls): e nV more (the weight gradient's 16-bit product
      is made in row blocks that stay below the buffer, except with a single chunk, where it
      is made whole, e V d, after the buffer is freed: fewer kernels for small batches);
    - held from the forward pass to the backward: the weight gradient in float32 (4Vd) and
      the input gradient (4 x tokens x d), scaled in place by the backward, and during the
      forward under 16-bit compute the weight's 16-bit copy (e V d).

    Measured against the process's peak resident memory in tests/train/test_memory.py."""
    n = min(chunk, tokens)
    chunk_bytes = 4 * n * vocab_size
    held = 4 * vocab_size * d_model + 4 * tokens * d_model
    if compute_bytes < 4:
        chunk_bytes += compute_bytes * n * vocab_size
        if tokens <= chunk:  # the single chunk's whole weight-gradient product, buffer freed
            chunk_bytes = max(chunk_bytes, compute_bytes * (n * vocab_size + vocab_size * d_model))
        held += compute_bytes * vocab_size * d_model
    return chunk_bytes + held


def estimate_memory(cfg: TrainConfig, world: int = 1) -> MemoryEstimate:
    """Bytes one process needs to train `cfg` (model.vocab_size must be known)."""
    m = cfg.model
    params = count_params(m)
    shards = world if cfg.fsdp else 1
    s, b, h, a = cfg.seq_len or m.seq_len, cfg.micro_batch_size, m.d_model, m.n_head
    scale = 2 if cfg.mixed_precision == "no" else 1  # the formula counts 16-bit activations
    full = s * b * h * 34 + 5 * a * s * s * b  # one layer, nothing recomputed
    kept = 2 * s * b * h  # a layer's input, all a recomputed layer keeps
    mode = cfg.activation_checkpointing
    if mode == "attention":
        per_layer = [full - 11 * s * b * h - 5 * a * s * s * b + kept] * m.n_layer
    else:
        recomputed = set(recomputed_layers(m.n_layer, mode, cfg.checkpoint_every_k))
        per_layer = [kept if i in recomputed else full for i in range(m.n_layer)]
        per_layer += [full] if recomputed else []  # the layer being recomputed in backward
    loss = loss_bytes(s * b, m.vocab_size, h, 4 if cfg.mixed_precision == "no" else 2)
    return MemoryEstimate(weights=4 * params // shards, grads=4 * params // shards,
                          optimizer=8 * params // shards,
                          activations=scale * sum(per_layer), loss=loss)


def free_memory(device, local_processes: int = 1) -> tuple[int, str]:
    """Bytes free for one process on `device`, and where the figure comes from."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device} (torch.cuda.mem_get_info)"
    import psutil

    available = psutil.virtual_memory().available
    return available // local_processes, (
        f"available on this host{f' / {local_processes} processes' if local_processes > 1 else ''}"
    )


def check_memory(cfg: TrainConfig, accelerator) -> MemoryEstimate:
    """Refuse (ValueError) a run whose estimate exceeds the free memory; before build_model."""
    world = accelerator.num_processes
    if accelerator.device.type not in ("cpu", "cuda"):
        return estimate_memory(cfg, world)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    need = estimate_memory(cfg, world)
    free, source = free_memory(accelerator.device, local)
    if need.total > free:
        raise ValueError(
            f"the model does not fit: training it needs {need.describe()} per process at "
            f"micro_batch_size={cfg.micro_batch_size}, seq_len={cfg.seq_len or cfg.model.seq_len}, "
            f"but only {_gb(free)} is {source}; use a smaller model, micro_batch_size or "
            "seq_len, activation_checkpointing=full, or fsdp=true over more processes"
        )
    return need
