"""The LM head and cross-entropy in chunks of tokens, never the whole [N, V] logits at once.

`Transformer.forward` calls `linear_cross_entropy` for the training loss; `train/memory.py`
models its peak memory (`loss_bytes`).
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy(h @ weight^T, targets) over chunks of `chunk` rows of h, with the
    gradients computed chunk by chunk in the forward pass (as Liger-Kernel's fused linear
    cross-entropy does): never the [N, V] float32 copy the plain loss makes (and keeps for the
    backward). Each chunk's logits live in one float32 buffer [chunk, V], worked in place
    (max, shift, exp, sum: the log-sum-exp by hand, then the softmax gradient), and freed
    before the next chunk's matmul; under 16-bit compute the buffer's 16-bit copy (the
    matmul's output, then the gradient fed to the backward matmuls) exists beside it. The
    matmuls run in `dtype`; softmax, loss and the weight gradient accumulate in float32. No
    extra FLOPs: the backward only scales the stored gradients by grad_output.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk, need_grad):
        w, V = weight.to(dtype), weight.size(0)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
                  if need_grad else None)
        for i in range(0, h.size(0), chunk):
            hc, tc = h[i : i + chunk].to(dtype), targets[i : i + chunk]
            buf = (hc @ w.t()).float()  # [n, V] logits, this chunk only; ours to overwrite
            valid = (tc != -100).float()
            picked = tc.clamp(min=0)[:, None]
            buf.sub_(buf.amax(dim=1, keepdim=True))  # x - max: every exponent <= 0
            target_logit = buf.gather(1, picked).squeeze(1)
            total = buf.exp_().sum(dim=1)  # exp(x - max), summed: log-sum-exp = log + max
            loss = loss + ((total.log() - target_logit) * valid).sum()
            if not need_grad:
                del buf  # before the next chunk's matmul
                continue
            # d loss / d logits = softmax - onehot(target), 0 on ignored rows, in place
            buf.mul_((valid / total)[:, None])
            buf.scatter_add_(1, picked, -valid[:, None])
            g = buf.to(dtype)  # the same tensor when dtype is float32
            del buf  # under 16-bit only the copy g lives through the matmuls
            if g.dtype == grad_w.dtype:
                torch.addmm(grad_w, g.t(), hc, out=grad_w)  # in place (out=, not addmm_,
                # which FlopCounterMode does not count), no [V, d] temporary
            elif h.size(0) <= chunk:  # one chunk: its 16-bit product is the whole gradient
                grad_w.copy_(g.t() @ hc)
            else:  # in blocks of about n*V/(2d) rows (all V while d <= n/2): their 16-bit
                # product, and on CPU its float32 cast for the +=, stay below the chunk's buffer
                blocks = -(-2 * hc.size(1) // hc.size(0))  # ceil(2d / n)
                rows = -(-V // blocks)
                for j in range(0, V, rows):
                    grad_w[j : j + rows] += g[:, j : j + rows].t() @ hc
            grad_h[i : i + chunk] = g @ w
            del g  # nothing [n, V] of this chunk outlives it
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place, not copied: a second backward through the same graph
        # (retain_graph=True) fails autograd's saved-tensor version check instead of
        # scaling twice
        grad_h, grad_w = ctx.saved_tensors
        grad_h.mul_(grad_loss.to(grad_h.dtype))
        return grad_h, grad_w.mul_(grad_loss).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, chunk: int
) -> torch.Tensor:
    """sum over targets != -100 of cross-entropy(h @ weight^T, targets) for h [N, d], weight
    [V, d], targets [N]: what `F.cross_entropy(F.linear(h, weight).float(), targets,
    reduction="sum")` gives, without materialising the [N, V] logits (see _LinearCrossEntropy)."""
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, dtype, chunk, need_grad)
