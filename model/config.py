"""Model configuration and named presets.

A `ModelConfig` fully describes the decoder-only transformer in `model/transformer.py`: its
shape, its attention layout (multi-head or grouped-query) and, optionally, a mixture-of-experts
MLP. The same dataclass describes the large published models the estimator projects to
(`gpt3-175b`, `llama3-405b`, `deepseek-v3`, ...), so that their parameter and FLOP counts come
from the same code that counts the small models we actually train.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from contracts.config import Flag, Range, Text, check_ranges

_POSITIVE, _COUNT = Range(0, open_lo=True), Range(0)
# The valid range of every field (checked first by `validate`; the checks after it relate fields)
RANGES = {
    "vocab_size": Range(0, note="0 = from the data"), "seq_len": _POSITIVE, "n_layer": _POSITIVE,
    "d_model": _POSITIVE, "n_head": _POSITIVE, "n_kv_head": _POSITIVE,
    "multiple_of": _POSITIVE, "ffn_hidden": _POSITIVE, "tie_embeddings": Flag(), "rope_theta": _POSITIVE,
    "norm_eps": _POSITIVE, "init_std": _POSITIVE, "n_experts": _COUNT, "n_experts_active": _COUNT,
    "n_shared_experts": _COUNT, "moe_ffn_hidden": Range(0, open_lo=True, optional=True),
    "n_dense_layers": _COUNT, "kv_lora_rank": _COUNT, "q_lora_rank": _COUNT,
    "qk_nope_head_dim": _COUNT, "qk_rope_head_dim": _COUNT, "v_head_dim": _COUNT,
    "mtp_depth": _COUNT, "notes": Text(),
}


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer (RMSNorm, RoPE, SwiGLU, causal attention)."""

    vocab_size: int = 0  # 0 = take it from the prepared dataset at training time
    seq_len: int = 256  # maximum context length (RoPE tables are built for this)
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 8
    n_kv_head: int | None = None  # grouped-query attention when < n_head; None = n_head
    ffn_hidden: int | None = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up
    multiple_of: int = 64  # rounding for the default ffn_hidden
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Mixture of experts (0 routed experts = dense model). Layers [0, n_dense_layers) stay dense.
    n_experts: int = 0
    n_experts_active: int = 0  # routed experts per token (top-k)
    n_shared_experts: int = 0  # always-on experts per token
    moe_ffn_hidden: int | None = None  # hidden width of one expert; None = ffn_hidden
    n_dense_layers: int = 0
    # Multi-head latent attention (DeepSeek-V2, sec. 2.1): kv_lora_rank > 0 switches it on.
    # Keys and values come from a compressed latent of kv_lora_rank channels; queries from one
    # of q_lora_rank (0 = a full-rank query projection). Each head's query/key has
    # qk_nope_head_dim channels without position and qk_rope_head_dim with RoPE (the rope key
    # is shared by all heads); values have v_head_dim channels.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Multi-token prediction modules (DeepSeek-V3, sec. 2.2): depth D predicts D extra tokens,
    # each module one more block. Counted in FLOPs; the trainer does not build them.
    mtp_depth: int = 0
    notes: str = field(default="", compare=False)  # where the shape comes from

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None and self.multiple_of > 0:  # else validate names multiple_of
            hidden = int(8 * self.d_model / 3)
            self.ffn_hidden = self.multiple_of * -(-hidden // self.multiple_of)
        if self.n_experts and self.moe_ffn_hidden is None:
            self.moe_ffn_hidden = self.ffn_hidden
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field out of its range (RANGES) or inconsistent
        with the others."""
        check_ranges(self, RANGES, "model.")
        if self.is_mla:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"model.{name} must be > 0 with kv_lora_rank > 0 (MLA), "
                                     f"got {getattr(self, name)}")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
            if self.n_kv_head != self.n_head:
                raise ValueError("multi-head latent attention (kv_lora_rank > 0) has one key/value "
                                 f"head per query head: set n_kv_head={self.n_head} or leave it unset")
            return self._validate_moe()
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}"
            )
        if (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"head dim d_model/n_head={self.d_model // self.n_head} must be even for RoPE"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}"
            )
        self._validate_moe()

    def _validate_moe(self) -> None:
        if self.n_experts:
            if not 0 < self.n_experts_active <= self.n_experts:
                raise ValueError(
                    f"model.n_experts_active={self.n_experts_active} must be in "
                    f"[1, n_experts={self.n_experts}]"
                )
            if not 0 <= self.n_dense_layers <= self.n_layer:
                raise ValueError(
                    f"model.n_dense_layers={self.n_dense_layers} must be in [0, {self.n_layer}]"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        """Channels per head in the attention scores (QK^T)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Channels per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.n_dense_layers

    @classmethod
    def from_dict(cls, section: dict) -> ModelConfig:
        """A config from a dict such as the `model:` section of a resolved training config;
        unknown keys are errors (a model with fields this code does not know cannot be rebuilt
        faithfully)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown model field(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(known))}")
        return cls(**section)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Shapes of published models are taken from their papers; where our architecture (SwiGLU,
# RMSNorm, RoPE, no biases) differs, the note says how the shape was matched.
# Each preset is the fields it sets explicitly; the derived ones it leaves out (DERIVED) are
# computed from the final shape, so overriding `d_model` of `small` re-derives its SwiGLU width.
PRESET_FIELDS: dict[str, dict] = {
    "tiny": dict(
        seq_len=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2, notes="unit tests"
    ),
    "small": dict(
        seq_len=256, n_layer=4, d_model=256, n_head=8, n_kv_head=4, notes="CPU demo"
    ),
    "gpt2-124m": dict(
        vocab_size=50304, seq_len=1024, n_layer=12, d_model=768, n_head=12, ffn_hidden=2048,
        notes="GPT-2 small shape (Radford et al. 2019); SwiGLU width 8d/3 keeps its 4d MLP's "
        "parameter count; vocab 50257 padded to 50304",
    ),
    "llama-1b": dict(
        vocab_size=32000, seq_len=2048, n_layer=22, d_model=2048, n_head=32, n_kv_head=4,
        ffn_hidden=5632, tie_embeddings=False,
        notes="Llama-2-style ~1.1B (the TinyLlama shape, Zhang et al. 2024)",
    ),
    "gpt3-175b": dict(
        vocab_size=50257, seq_len=2048, n_layer=96, d_model=12288, n_head=96, ffn_hidden=32768,
        notes="GPT-3 175B (Brown et al. 2020, table 2.1); SwiGLU width 8d/3 matches its 4d MLP's "
        "parameters",
    ),
    "llama2-70b": dict(
        vocab_size=32000, seq_len=4096, n_layer=80, d_model=8192, n_head=64, n_kv_head=8,
        ffn_hidden=28672, tie_embeddings=False, notes="Llama 2 70B (Touvron et al. 2023)",
    ),
    "llama3-405b": dict(
        vocab_size=128256, seq_len=8192, n_layer=126, d_model=16384, n_head=128, n_kv_head=8,
        ffn_hidden=53248, tie_embeddings=False, rope_theta=500000.0,
        notes="Llama 3.1 405B (Llama Team 2024, table 3)",
    ),
    "deepseek-v3": dict(
        vocab_size=129280, seq_len=4096, n_layer=61, d_model=7168, n_head=128, ffn_hidden=18432,
        tie_embeddings=False, n_experts=256, n_experts_active=8, n_shared_experts=1,
        moe_ffn_hidden=2048, n_dense_layers=3, kv_lora_rank=512, q_lora_rank=1536,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mtp_depth=1,
        notes="DeepSeek-V3 (DeepSeek-AI 2024, sec. 4.2): 671B total, 37B active; multi-head "
        "latent attention with its real dimensions; one multi-token-prediction module",
    ),
}
PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**f) for name, f in PRESET_FIELDS.items()}
# Fields computed from others when left unset (None): n_kv_head from n_head, ffn_hidden from
# d_model and multiple_of, moe_ffn_hidden from ffn_hidden.
DERIVED = ("n_kv_head", "ffn_hidden", "moe_ffn_hidden")


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset `name` with `overrides` applied, its derived fields (DERIVED) computed from
    the result unless the preset or `overrides` set them; unknown names list the valid ones."""
    return ModelConfig(**{**preset_fields(name), **overrides})


def preset_fields(name: str) -> dict:
    """The fields the preset `name` sets explicitly (a copy)."""
    if name not in PRESET_FIELDS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(PRESET_FIELDS)}")
    return dict(PRESET_FIELDS[name])
