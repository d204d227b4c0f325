"""`mixed_precision=fp8`: the block matmuls in float8 through torchao, the rest in bf16 autocast.

torchao's `convert_to_float8_training` swaps chosen `nn.Linear` modules for its `Float8Linear`,
whose three matmuls (forward, and the two of the backward) cast their operands to float8 with
one scale per tensor computed from its current absolute maximum (torchao's default
"tensorwise" recipe: e4m3 for inputs and weights, e5m2 for output gradients) and run on the
float8 tensor cores (`torch._scaled_mm`). Those exist from compute capability 8.9 on (Ada,
Hopper, Blackwell): elsewhere, or without torchao (`pip install -e '.[fp8]'`), the switch is
refused with one line (`refusal`). Weights, gradients and optimizer state stay fp32, and
`Float8Linear` keeps the `weight` name, so checkpoints and exports are those of a bf16 run.

Which linears are converted (`kept_in_bf16` says why one is not):
- not the output head, the MoE router, the embedding: DeepSeek-V3 (DeepSeek-AI 2024, sec.
  3.3.1) keeps the embedding, output head and gating in their original precision; the loss here
  also reads the head's weight directly (`model.loss.linear_cross_entropy`);
- not the routed MoE experts: each gets a data-dependent number of tokens, possibly none, and
  the scale of an empty tensor is undefined (torchao raises on it);
- not where a dimension is not a multiple of 16 (the float8 matmul's requirement);
- not the small ones, in_features <= 4096 and out_features <= 1024, where the casts cost more
  than the float8 matmul saves: the threshold torchao's own automatic filter uses for the
  tensorwise recipe, from its benchmarks on H100 (torchao.float8, `_auto_filter_for_tensorwise`
  and the README's performance table).
Nothing of this has been measured by tokenclock yet: `launch/gpu_check.sh`'s loop-fp8 stage is
the measurement to make (issue 13).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

log = logging.getLogger("train")

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x)
SMALL_IN, SMALL_OUT = 4096, 1024  # in <= SMALL_IN and out <= SMALL_OUT: left in bf16


def refusal() -> str | None:
    """Why mixed_precision=fp8 cannot run in this process, in one line; None when it can."""
    if not torch.cuda.is_available():
        return ("mixed_precision=fp8 needs a CUDA GPU of compute capability 8.9 or newer "
                "(Ada, Hopper, Blackwell) and none is available; use mixed_precision=bf16")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        return (f"mixed_precision=fp8 needs compute capability 8.9 or newer (float8 tensor cores); "
                f"{torch.cuda.get_device_name()} has {major}.{minor}: use mixed_precision=bf16")
    if importlib.util.find_spec("torchao") is None:
        return ("mixed_precision=fp8 needs torchao, which is not installed: "
                "pip install -e '.[fp8]' (or pip install torchao)")
    return None


def check_available() -> None:
    """Raise ValueError (one line) where mixed_precision=fp8 cannot run."""
    reason = refusal()
    if reason:
        raise ValueError(reason)


def kept_in_bf16(module: nn.Module, fqn: str) -> str | None:
    """Why the linear `module` (named `fqn` in the model) is left out of float8; None if it is
    converted."""
    name = fqn.rsplit(".", 1)[-1]
    if name == "lm_head":
        return "output head (kept 16-bit, DeepSeek-V3 sec. 3.3.1; the loss reads its weight)"
    if name == "router":
        return "MoE router (gating kept in high precision, DeepSeek-V3 sec. 3.3.1)"
    if ".experts." in f".{fqn}.":
        return "routed expert (a data-dependent token count, possibly zero)"
    out_features, in_features = module.weight.shape
    if in_features % 16 or out_features % 16:
        return f"{in_features} -> {out_features}: float8 matmuls need multiples of 16"
    if in_features <= SMALL_IN and out_features <= SMALL_OUT:
        return (f"{in_features} -> {out_features}: too small to gain (torchao's tensorwise "
                f"threshold: in <= {SMALL_IN} and out <= {SMALL_OUT})")
    return None


def plan(model: nn.Module) -> dict[str, str | None]:
    """Every linear of `model` by name: None where it would be converted, else why not."""
    return {fqn: kept_in_bf16(m, fqn) for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def convert(model: nn.Module) -> list[str]:
    """Swap the eligible linears of `model` (in place) for torchao's Float8Linear; log which
    were converted and why the others were not; return the converted names."""
    from torchao.float8 import convert_to_float8_training

    choice = plan(model)
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: choice.get(fqn) is None)
    converted = [fqn for fqn, why in choice.items() if why is None]
    if not converted:
        raise ValueError("mixed_precision=fp8 converts no layer of this model (every linear is "
                         "too small or not a multiple of 16; see train/fp8.py): use "
                         "mixed_precision=bf16")
    log.info(f"fp8: {len(converted)} of {len(choice)} linears in float8: {summarize(converted)}")
    kept: dict[str, list[str]] = {}
    for fqn, why in choice.items():
        if why is not None:
            kept.setdefault(why, []).append(fqn)
    for why, names in kept.items():
        log.info(f"fp8: kept in bf16: {summarize(names)} ({why})")
    return converted


def summarize(names: list[str]) -> str:
    """`blocks.0.mlp.w_down, blocks.1.mlp.w_down, ...` as `blocks.{0..11}.mlp.w_down`: one
    entry per distinct name once the block index is taken out."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            groups.setdefault(".".join(["blocks", "{}", *parts[2:]]), []).append(parts[1])
        else:
            groups.setdefault(name, [])
    out = []
    for pattern, layers in groups.items():
        numbers = [int(i) for i in layers]
        if not numbers:
            span = ""
        elif len(numbers) == 1:
            span = layers[0]
        elif numbers == list(range(numbers[0], numbers[-1] + 1)):
            span = f"{{{numbers[0]}..{numbers[-1]}}}"
        else:
            span = "{" + ",".join(layers) + "}"
        out.append(pattern.replace("{}", span))
    return ", ".join(out)
