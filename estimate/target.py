"""The model a projection is about, and its training FLOPs per token.

A target is a preset from `model.config.PRESETS`, a YAML file of `ModelConfig` fields (a run's
resolved `config.yaml` works: its `model:` section is used), or just a parameter count. FLOPs
come from `model.flops`, the same code that counts the small models we train:

    model FLOPs/token = 6 * N + 12 * L * d * T     (PaLM, Chowdhery et al. 2022, app. B)

N is the matmul weights one token meets: for a mixture of experts only the active experts,
which is why DeepSeek-V3 (671B total, 37B active) costs about as much per token as a 40B dense
model. `--params` / `--active-params` replace N (keeping the attention term of the shape);
without a shape the attention term is left out and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import PRESETS, ModelConfig, get_preset
from model.flops import (
    RECOMPUTE_MODES,
    count_params,
    hardware_flops_per_token,
    model_flops_per_token,
)


@dataclass
class Target:
    """What to train: its size, FLOPs per token and how recomputation inflates them."""

    name: str
    model_flops_per_token: float
    params: float  # total parameters (all experts)
    active_params: float  # N of 6N: matmul weights per token
    attention_flops_per_token: float  # the 12*L*d*T part (0 without a shape)
    seq_len: int | None
    is_moe: bool
    cfg: ModelConfig | None = None
    recompute_ratio: dict[str, float] = field(default_factory=dict)  # hardware / model FLOPs
    notes: list[str] = field(default_factory=list)

    def hardware_flops_per_token(self, recompute: str) -> float:
        return self.model_flops_per_token * self.recompute_ratio[recompute]


def load_model_yaml(path: str | Path) -> ModelConfig:
    """A ModelConfig from YAML: either bare fields or a run config with a `model:` section."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if isinstance(data.get("model"), dict):
        data = data["model"]
    try:
        return ModelConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _recompute_ratios(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    base = model_flops_per_token(cfg, seq_len)
    return {m: hardware_flops_per_token(cfg, seq_len, m) / base for m in RECOMPUTE_MODES}


def resolve_target(
    model: str | ModelConfig | None = None,
    *,
    params: float | None = None,
    active_params: float | None = None,
    seq_len: int | None = None,
    name: str | None = None,
) -> Target:
    """Build a Target from a preset name, a YAML path or a ModelConfig, with optional overrides."""
    if model is None:
        return _params_only_target(params, active_params)
    if isinstance(model, ModelConfig):
        cfg, where = model, "the given config"
        name = name or "model"
    else:
        cfg = _load_cfg(model)
        where = f"preset {model}" if model in PRESETS else model
        name = name or (model if model in PRESETS else Path(model).stem)
    T = cfg.seq_len if seq_len is None else int(seq_len)
    # model_flops_per_token at T=0 leaves only the 6N part: N without reaching into model.flops.
    n_matmul = model_flops_per_token(cfg, 0) / 6.0
    attention = model_flops_per_token(cfg, T) - 6.0 * n_matmul
    total = float(count_params(cfg))
    active = n_matmul
    notes = [
        f"shape from {where}" + (f" ({cfg.notes})" if cfg.notes else ""),
        f"model FLOPs/token = 6 x {active:.4g} (matmul weights per token) + {attention:.4g} "
        f"(attention, 12 x L x d x T at T = {T})",
    ]
    if cfg.is_moe and params is not None and active_params is None:
        total = float(params)
        notes.append(f"--params {params:.4g} sets the total only; FLOPs keep the active "
                     f"parameters of the shape (give --active-params to change them)")
    elif params is not None or active_params is not None:
        if params is not None:
            total = float(params)
        active = float(active_params if active_params is not None else params)
        notes.append(f"N set to the given {active:.4g} (the shape alone gives {n_matmul:.4g}); "
                     "the attention term stays that of the shape")
    return Target(
        name=name,
        model_flops_per_token=6.0 * active + attention,
        params=total,
        active_params=active,
        attention_flops_per_token=attention,
        seq_len=T,
        is_moe=cfg.is_moe,
        cfg=cfg,
        recompute_ratio=_recompute_ratios(cfg, T),
        notes=notes,
    )


def _load_cfg(model: str) -> ModelConfig:
    if model in PRESETS:
        return get_preset(model)
    path = Path(model)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"model config file {model!r} not found")
        return load_model_yaml(path)
    raise ValueError(
        f"unknown model {model!r}: give a preset ({', '.join(PRESETS)}) or a YAML model config path"
    )


def _params_only_target(params: float | None, active_params: float | None) -> Target:
    if params is None and active_params is None:
        raise ValueError("give a model (preset name or YAML config) or --params/--active-params")
    active = float(active_params if active_params is not None else params)
    total = float(params if params is not None else active)
    # Full recomputation repeats the forward of (almost) every matmul: 2N on top of 6N.
    ratios = {"none": 1.0, "selective": 1.0, "full": 8.0 / 6.0}
    return Target(
        name="model given by size",
        model_flops_per_token=6.0 * active,
        params=total,
        active_params=active,
        attention_flops_per_token=0.0,
        seq_len=None,
        is_moe=active != total,
        recompute_ratio=ratios,
        notes=[
            "no model shape: FLOPs/token = 6N only; the attention term (12 x L x d x T, about "
            "1-10% of the total for large models at 2K-8K context) is left out",
            "without a shape, selective recomputation is counted as free (ratio 1.0)",
        ],
    )
