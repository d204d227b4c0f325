"""A decoder-only transformer, readable top to bottom.

Llama-style: token embedding -> n_layer pre-norm blocks -> final RMSNorm -> LM head.
Each block is `x + attn(norm(x))` then `x + mlp(norm(x))`, with
- RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm,
- rotary position embeddings (RoPE, Su et al. 2021) on queries and keys, no learned positions,
- causal attention through `F.scaled_dot_product_attention`, grouped-query attention
  (Ainslie et al. 2023) when n_kv_head < n_head, or multi-head latent attention (DeepSeek-V2)
  when kv_lora_rank > 0,
- a SwiGLU MLP (Shazeer 2020), or a mixture of SwiGLU experts in layers >= n_dense_layers,
- no biases anywhere, optionally tied input/output embeddings.

This module knows nothing of training or parallelism: `train/` wraps `model.blocks[i]` for
activation checkpointing / compile from the outside, so a block takes positional tensors
`(x, cos, sin)` and returns a tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    """x / rms(x) * weight, accumulated in float32 even for bf16 inputs: `F.rms_norm`, one
    fused kernel forward and one backward on a GPU. On a CPU torch composes it from 6 ops
    forward and 15 backward; `_RMSNormCPU` is the same function with a backward of 8. A bf16 x
    with a float32 weight is first brought to float32, as the product of the two always was
    (mixed dtypes would miss the fused kernel); the residual stream is already float32 under
    autocast, so in a block this cast never runs."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype:
            dtype = torch.promote_types(x.dtype, w.dtype)
            x, w = x.to(dtype), w.to(dtype)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return _RMSNormCPU.apply(x, w, self.eps)
        return F.rms_norm(x, w.shape, w, self.eps)


class _RMSNormCPU(torch.autograd.Function):
    """y = xhat * w with xhat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), float32, as
    torch's composite rms_norm computes it; the backward by hand, from the saved xhat:
    dw = sum(g * xhat), dx = rstd * (g w - xhat * mean(g w * xhat))."""

    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        gw = (g * xhat).flatten(0, -2).sum(0)
        gx = g * w
        gx = (gx - xhat * (gx * xhat).mean(-1, keepdim=True)) * rstd
        return gx, gw, None


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of the rotation angles, each [seq_len, head_dim]: position p rotates
    channel pair (i, i + head_dim/2) by p * theta^(-2i/head_dim). Both halves of a row hold the
    same angles; sin's first half is negated, so that `apply_rope` is two multiplies and an add."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x [..., head_dim] ("rotate half" layout):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), i.e. x * cos + (x2, x1) * (-sin, sin), with
    the tables of `rope_tables` broadcast against x (already in x's dtype: `Transformer` keeps
    them in the compute dtype, so nothing is cast here)."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x's device run in: autocast's when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class LayerKV:
    """One layer's cached keys and values, [B, H_kv, max_len, D] each, allocated on first use
    with the dtype and device of the keys (so the cache follows autocast). Keys are stored with
    n_kv_head heads, before they are repeated for grouped-query attention.

    Each block is handed its own LayerKV and the position as an argument: nothing in a block's
    forward depends on its layer index, so a compiled block (or the compiled model) is one
    graph for every layer instead of one per layer.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, T, D] at positions [start, start+T); return all keys/values."""
        if self.k is None:
            B, H, _, _ = k.shape
            self.k = k.new_zeros(B, H, self.max_len, k.size(-1))
            self.v = v.new_zeros(B, H, self.max_len, v.size(-1))
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for positions [0, pos), for incremental decoding: one
    `LayerKV` per layer. `Transformer.forward` advances `pos`."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.pos = 0
        self.layers = [LayerKV(max_len) for _ in range(n_layer)]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE and grouped-query key/value heads.

    One projection makes queries, keys and values: the rows of `wqkv.weight` are the n_head
    query heads, then the n_kv_head key heads, then the n_kv_head value heads, head_dim rows
    each (the blocks of separate q, k, v weights, stacked). One matmul instead of three, and
    queries and keys, side by side, are rotated in one RoPE pass. Tensor parallelism shards
    it by head from outside (train/tensor_parallel.py): rank r of N takes heads
    [r H/N, (r+1) H/N) of each of the three blocks, the same rows as sharding three separate
    projections would give it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim,
                              bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: LayerKV | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        qk, v = self.wqkv(x).view(B, T, H + 2 * H_kv, self.head_dim).split([H + H_kv, H_kv], 2)
        qk = apply_rope(qk, cos[:, None], sin[:, None])  # tables [T, 1, D]: all heads at once
        q, k = qk.transpose(1, 2).split([H, H_kv], dim=1)  # [B, H, T, D], [B, H_kv, T, D]
        v = v.transpose(1, 2)

        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start)
        if H_kv != H:  # query head h reads key/value head h // n_rep
            n_rep = H // H_kv
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)

        return self.wo(causal_attention(q, k, v, start).transpose(1, 2).reshape(B, T, -1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, H, T, D] heads, each query seeing the keys up to its
    own position; `start` is the position of the first query (> 0 when decoding with a cache)."""
    if start == 0:  # training and prefill: no mask tensor, so SDPA may take the flash kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.size(2)
    mask = None  # T == 1: one query sees every key
    if T > 1:  # new queries see the whole cache, and each other causally
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-AI 2024, DeepSeek-V2 sec. 2.1): keys and values
    are expanded from one compressed latent per token (kv_lora_rank channels, what a cache
    would keep), queries from another (q_lora_rank; 0 = full rank). Each head's query and key
    join a part without position (qk_nope_head_dim) and a RoPE part (qk_rope_head_dim), whose
    key is shared by all heads. This cache stores the expanded keys and values: simple, not
    the memory saving MLA is built for.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_out = cfg.n_head * (self.nope + self.rope)
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(cfg.d_model, q_out, bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_head * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_head * self.v_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: LayerKV | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_head
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.wkv_b.in_features, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = apply_rope(k_rope[:, None], cos, sin).expand(B, H, T, self.rope)
        q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start)
        return self.wo(causal_attention(q, k, v, start).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one projection whose rows are the
    gate's, then the up's (tensor parallelism takes the same columns of each half)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class MoE(nn.Module):
    """Mixture of SwiGLU experts: each token goes to its top-k routed experts, weighted by the
    router's softmax probability of each (not renormalised, so the router gets a gradient even
    with k=1, as in Switch Transformer and DeepSeek-V2), plus the shared experts, which see
    every token (DeepSeek-MoE). The n_shared_experts shared experts are one SwiGLU of width
    n_shared_experts * moe_ffn_hidden: the same parameters and FLOPs as summing separate ones.

    No load-balancing auxiliary loss is computed: for the short runs this project trains, some
    expert imbalance is harmless; a long MoE run would add one (Switch Transformer's
    n_experts * sum_e f_e * P_e) or DeepSeek-V3's bias-based balancing.

    Experts run in a plain loop over the tokens routed to each: clear rather than fast. Every
    expert runs, even on zero tokens, so every parameter gets a (possibly zero) gradient, which
    keeps DDP/FSDP from waiting for gradients that never come.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.n_experts_active
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(cfg.d_model, cfg.moe_ffn_hidden) for _ in range(cfg.n_experts)
        )
        shared = cfg.n_shared_experts * cfg.moe_ffn_hidden
        self.shared = MLP(cfg.d_model, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]: routing is per token
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k] each
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            y = expert(x[token]) * weights[token, slot, None].type_as(x)
            out = out.index_add(0, token, y)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = LatentAttention(cfg) if cfg.is_mla else Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.d_model, cfg.ffn_hidden)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: LayerKV | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model described by a `ModelConfig`."""

    loss_chunk = 2048  # tokens per chunk of the LM head + cross-entropy (linear_cross_entropy)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size must be > 0 to build the model, got {cfg.vocab_size} "
                "(0 means 'take it from the prepared dataset'; train/ resolves it first)"
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables are derived, not learned: non-persistent buffers stay out of checkpoints.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight N(0, init_std), the residual output projections (attention
        out, MLP down) with std / sqrt(2 * n_layer) so the residual stream's variance does not
        grow with depth (GPT-2), RMSNorm weights to 1, and (re)build the RoPE tables.

        Public so that a model built on the `meta` device can be initialised after
        `to_empty()`, as FSDP-style large-model setups do.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                out_proj = name.endswith(("attn.wo", "w_down"))  # also MLA's wo
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if out_proj else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # With tied embeddings the loop above visits the shared matrix twice (embedding, then
        # head), both times with N(0, std): fine.
        device = self.tok_emb.weight.device
        cos, sin = rope_tables(self.cfg.rope_dim, self.cfg.seq_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def num_params(self, embeddings: bool = True) -> int:
        """Number of parameters (a tied embedding counted once); `embeddings=False` leaves out
        the vocabulary matrices (token embedding and LM head), as `model.flops.count_params`."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits [B, T, vocab] for token ids idx [B, T], and the SUM of the cross-entropy over
        targets != -100 (None without targets): the training loop divides by its own token
        count, so that gradient accumulation and data parallelism weight every token equally.

        With targets the logits are None unless `return_logits`: the loss then comes from
        `linear_cross_entropy`, which never holds more than `loss_chunk` tokens' logits.

        With a `kv_cache`, idx holds the tokens at positions [kv_cache.pos, kv_cache.pos + T),
        earlier ones are read from the cache, and the cache advances by T.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time], got shape {tuple(idx.shape)}")
        T = idx.size(1)
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens (cache {start} + input {T}) exceeds "
                f"model.seq_len={self.cfg.seq_len}"
            )
        x = self.tok_emb(idx)
        dtype = compute_dtype(x)  # RoPE tables cast once, for every layer
        cos = self.rope_cos[start : start + T].to(dtype)
        sin = self.rope_sin[start : start + T].to(dtype)
        if kv_cache is None:
            for block in self.blocks:
                x = block(x, cos, sin)
        else:
            for block, layer_kv in zip(self.blocks, kv_cache.layers, strict=True):
                x = block(x, cos, sin, layer_kv, start)
            kv_cache.pos += T
        x = self.norm(x)

        if targets is not None and not return_logits:
            loss_sum = linear_cross_entropy(
                x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), dtype, self.loss_chunk
            )
            return None, loss_sum
        logits = self.lm_head(x)
        loss_sum = None
        if targets is not None:  # in float32 even under bf16 autocast
            loss_sum = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        return logits, loss_sum

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue the prompts idx [B, T] by up to max_new_tokens tokens; return [B, T + new].

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature), keeping
        only the top_k most likely tokens and/or the smallest set whose probability reaches
        top_p. Once a sequence has produced eos_id it is padded with eos_id, and generation
        stops when every sequence has.

        The model sees at most the last seq_len tokens. With the cache, each step feeds only
        the newest token; once the cache is full, the window of the last seq_len tokens is
        re-encoded from scratch at every step (RoPE positions restart at the window, and the
        hidden states of kept tokens depended on dropped ones), exactly what use_cache=False
        does, so both give the same tokens.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        seq_len = self.cfg.seq_len
        cache = KVCache(self.cfg.n_layer, seq_len) if use_cache else None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and 0 < cache.pos < seq_len:
                logits, _ = self(idx[:, -1:], kv_cache=cache)  # only the newest token
            else:
                if cache is not None:
                    cache.pos = 0  # (re)fill the cache from the cropped window
                logits, _ = self(idx[:, -seq_len:], kv_cache=cache)
            next_id = sample(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_id = torch.where(done, eos_id, next_id)
                done |= next_id == eos_id
            idx = torch.cat((idx, next_id[:, None]), dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return idx


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits [B, V]: argmax at temperature 0, else a draw from the
    temperature-scaled distribution restricted to top_k tokens and/or the top_p nucleus
    (Holtzman et al. 2019)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
