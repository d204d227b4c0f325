"""Context parallelism: the sequence split across the ranks of a cp group.

Llama 3 (Dubey et al. 2024, sec. 3.3.2) splits each sequence into 2 x cp chunks and gives
rank r chunks r and 2cp-1-r, so that every rank holds as many early (cheap) as late (costly)
queries under the causal mask; each rank all-gathers the keys and values of the whole
sequence before attention and computes its own queries' attention against them. Here too:
one all-gather of K and V per layer (its backward a reduce-scatter of their gradients), and a
boolean mask that lets a query at position p see the gathered keys at positions <= p. The
sequence is split before the embedding, so the MLPs, norms and the loss see only this rank's
tokens; gradients of the (replicated) weights are summed over the cp group like data parallel.

On CPU the attention over the gathered keys runs with an explicit mask (SDPA's math kernel);
a GPU's flash kernel would need the two causal halves handled apart (Llama 3's "all-gather,
then two attention calls"), or ring attention (Liu et al. 2023) to overlap the exchange.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.transformer import apply_rope
from train.parallel.comm import Comm


def chunk_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The token positions rank `rank` of `cp` holds: chunks rank and 2cp-1-rank of 2cp."""
    if seq_len % (2 * cp):
        raise ValueError(f"context parallel cp={cp} splits a sequence into {2 * cp} equal chunks: "
                         f"seq_len={seq_len} must be a multiple of {2 * cp}")
    c = seq_len // (2 * cp)
    return torch.cat((torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)))


class ContextParallel:
    """The sequence split of one cp group and the attention over its gathered keys/values."""

    def __init__(self, comm: Comm):
        self.comm = comm
        self.mask: torch.Tensor | None = None  # [T_local, T]: query i sees gathered key j

    def positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """This rank's positions of a sequence of `seq_len`; sets the attention mask for them."""
        mine = chunk_positions(seq_len, self.comm.size, self.comm.rank).to(device)
        every = torch.cat([chunk_positions(seq_len, self.comm.size, r)
                           for r in range(self.comm.size)]).to(device)  # the gathered keys' order
        self.mask = every[None, :] <= mine[:, None]
        return mine

    def install(self, attn: torch.nn.Module) -> None:
        """Make `attn` (a model.transformer.Attention) attend over the whole sequence's keys."""
        def forward(x, cos, sin, kv_cache=None, start=0, _attn=attn):
            if kv_cache is not None:
                raise ValueError("a context-parallel model trains and evaluates; generate from "
                                 "the full copy")
            return self.attention(_attn, x, cos, sin)

        attn.forward = forward

    def attention(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """model.transformer.Attention.forward with the keys and values of every cp rank."""
        B, T, _ = x.shape
        H, H_kv = attn.n_head, attn.n_kv_head
        qk, v = attn.wqkv(x).view(B, T, H + 2 * H_kv, attn.head_dim).split([H + H_kv, H_kv], 2)
        qk = apply_rope(qk, cos[:, None], sin[:, None])  # this rank's positions' angles
        q, k = qk.transpose(1, 2).split([H, H_kv], dim=1)
        kv = self.comm.gather(torch.cat((k, v.transpose(1, 2)), dim=1), dim=2)  # one all-gather
        k, v = kv.split([H_kv, H_kv], dim=1)
        if H_kv != H:
            k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return attn.wo(out.transpose(1, 2).reshape(B, T, -1))
