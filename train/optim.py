"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    compiled: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on >= 2-D parameters (matmul weights, embeddings), none on norms.

    The fused kernel is used when asked for and torch has one for `device`; otherwise the
    multi-tensor ("foreach") implementation. `compiled` (compile_optimizer=true) builds the
    foreach one and compiles its step (`compile_step`).
    """
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if compiled:
        optimizer = torch.optim.AdamW(groups, foreach=True, **kwargs)
        compile_step(optimizer)
        return optimizer
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass  # no fused kernel for this device/dtype in this torch build
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: >= 2-D parameters with weight decay, the rest without (the order
    of an optimizer state dict's indices: group by group, the model's order within each)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def compile_step(optimizer: torch.optim.Optimizer) -> None:
    """Replace `optimizer.step` by its torch.compile'd self, as PyTorch's "compiled optimizer"
    recipes do (Lazos, pytorch.org/tutorials/recipes/compiling_optimizer.html and
    compiling_optimizer_lr_scheduler.html): inductor turns AdamW's foreach loop into a few
    generated kernels. Torch does not trace into the fused AdamW kernel (it is marked
    `torch.compiler.disable`), hence foreach. The learning rate becomes a tensor, so that the
    schedule's new value every step does not recompile (`set_lr` fills it in place), and
    `capturable` keeps the step counts on the device (what a tensor lr with foreach requires).
    Call again after `load_state_dict`, which brings back the saved groups' settings."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    for group in optimizer.param_groups:
        group.update(foreach=True, fused=None, capturable=True)
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(p.device, torch.float32)
    if not hasattr(optimizer, "eager_step"):
        optimizer.eager_step = optimizer.step
        optimizer.step = torch.compile(optimizer.eager_step)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: in place where it is a tensor (compile_optimizer)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def skip_update(optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step(), left out where `found_inf` is true, without reading it: the fused
    AdamW kernel takes the flag as the grad scaler passes it (`found_inf` attribute, read when
    `_step_supports_amp_scaling`) and leaves weights, moments and step count untouched. Other
    optimizers (the foreach AdamW of optim.fused=false) read the flag: one wait per step."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    if getattr(inner, "_step_supports_amp_scaling", False) and inner.defaults.get("fused"):
        inner.found_inf = found_inf.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(found_inf):
        optimizer.step()
