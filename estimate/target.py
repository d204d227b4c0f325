"""The model a projection is about, and its training FLOPs per token.

A target is a preset from `model.config.PRESETS`, a YAML file of `ModelConfig` fields (a run's
resolved `config.yaml` works: its `model:` section is used), or just a parameter count, which
`estimate.shapes` turns into a shape by a stated rule (the report prints it). FLOPs
come from `model.flops`, the same code that counts the small models we train:

    model FLOPs/token = 6 * N + 12 * L * d * T     (PaLM, Chowdhery et al. 2022, app. B)

N is the matmul weights one token meets: for a mixture of experts only the active experts,
which is why DeepSeek-V3 (671B total, 37B active) costs about as much per token as a 40B dense
model. With a shape, `--params` / `--active-params` replace N (keeping the attention term of
the shape); without one, N and the attention term are those of the assumed shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from estimate.shapes import shape_from_size
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
    experts: int | None = None,
) -> Target:
    """Build a Target from a preset name, a YAML path or a ModelConfig, with optional overrides;
    from a size alone (`params`, `active_params`, `experts`) through estimate.shapes' rule."""
    if model is None:
        return _params_only_target(params, active_params, seq_len, experts)
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


def _params_only_target(params: float | None, active_params: float | None,
                        seq_len: int | None, experts: int | None) -> Target:
    """A target given by size: the shape of `estimate.shapes`' stated rule, then as any shape."""
    if params is None and active_params is None:
        raise ValueError("give a model (preset name or YAML config) or --params/--active-params")
    total = float(params if params is not None else active_params)
    cfg = shape_from_size(total, active_params, seq_len=seq_len, experts=experts)
    t = resolve_target(cfg, seq_len=seq_len, name="model given by size")
    t.params = total
    t.notes[0] = (f"{cfg.notes}: {count_params(cfg) / 1e9:.4g}B parameters"
                  + (f", {count_params(cfg, active=True) / 1e9:.4g}B active" if cfg.is_moe else "")
                  + f", context {cfg.seq_len}" + ("" if seq_len else
                                                  " (default, estimate.shapes.DEFAULT_SEQ_LEN)"))
    return t
