"""Bytes per accelerator of a training layout: what must fit in its memory.

    memory = model states (weights, gradients, optimizer, sharded by ZeRO stage)
           + activations (micro-batches in flight x the layers of a stage, under the
             recomputation chosen)
           + logits of the last stage

- **Model states** (mixed-precision Adam, Rajbhandari et al. 2020, ZeRO, sec. 3.1): 2 bytes of
  16-bit weights, 2 of gradients and 12 of optimizer state (fp32 master weights, momentum,
  variance) per parameter. ZeRO stage 1 shards the optimizer state over the data-parallel
  ranks, stage 2 the gradients too, stage 3 (FSDP) the weights too (sec. 5.1-5.3). A device
  holds 1 / (tp x pp) of the dense weights and 1 / (ep x pp) of the experts (1 / (tp x pp)
  without expert parallelism). DualPipe keeps two copies of the parameters (DeepSeek-AI 2024,
  table 2).
- **Activations** per token and block, in 16-bit (Korthikanti et al. 2022, sec. 4, table 2,
  with sequence parallelism, so everything is divided by tp; with FlashAttention no T x T
  scores are stored, which is what selective recomputation saves there): the block and
  sub-layer inputs (4d), q, k, v and the attention output, and the MLP's gate, up and product
  (3 x ffn; a mixture of experts stores them for each of the k routed copies and the shared
  experts). Full recomputation keeps only each block's input (2d bytes per token) plus one
  block's activations while it is re-run. Context parallelism divides the tokens by cp.
- **Micro-batches in flight**: 1F1B holds min(pp, m) micro-batches on the first stage
  (Narayanan et al. 2021, sec. 2.2.1), interleaving x (1 + (pp - 1) / (pp v)) (Korthikanti et
  al. 2022, sec. 4.2.3), DualPipe pp + 1 (DeepSeek-AI 2024, table 2); zero bubble ZB-H1 the
  same as 1F1B (Qi et al. 2024, sec. 3).
- **Usable memory**: USABLE_FRACTION of the datasheet capacity (CUDA context, communication
  buffers and allocator fragmentation take the rest; judgement).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from model.flops import count_params

USABLE_FRACTION = 0.9
STATE_BYTES = {"weights": 2.0, "grads": 2.0, "optimizer": 12.0}  # per parameter, ZeRO sec. 3.1
ACT_BYTES = 2.0  # 16-bit activations
LOGIT_BYTES = 8.0  # fp32 logits and their gradient, per vocabulary entry per token


@dataclass
class Memory:
    """Bytes per device by what they hold."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.total / gb:.3g} GB (weights {self.weights / gb:.3g}, gradients "
                f"{self.grads / gb:.3g}, optimizer {self.optimizer / gb:.3g}, activations "
                f"{self.activations / gb:.3g}, logits {self.logits / gb:.3g})")


def usable_bytes(memory_gb: float) -> float:
    return USABLE_FRACTION * memory_gb * 1e9


def expert_params(cfg: ModelConfig) -> float:
    """Parameters of the routed experts (all of them)."""
    if not cfg.is_moe:
        return 0.0
    moe_layers = cfg.n_layer - cfg.n_dense_layers
    return float(moe_layers * cfg.n_experts * 3 * cfg.d_model * cfg.moe_ffn_hidden)


def activation_bytes_per_token(cfg: ModelConfig, layer_moe: bool) -> float:
    """Bytes one block keeps per token for its backward pass, without recomputation and before
    any parallel split (FlashAttention: no scores)."""
    d, H = cfg.d_model, cfg.n_head
    kv = H if cfg.is_mla else cfg.n_kv_head
    attn = 2 * d + H * cfg.qk_head_dim + kv * (cfg.qk_head_dim + cfg.value_head_dim) \
        + H * cfg.value_head_dim
    if layer_moe:
        mlp = 2 * d + cfg.n_experts_active * (d + 3 * cfg.moe_ffn_hidden) \
            + cfg.n_shared_experts * 3 * cfg.moe_ffn_hidden
    else:
        mlp = 2 * d + 3 * cfg.ffn_hidden
    return ACT_BYTES * (attn + mlp)


def in_flight(pp: int, micro_batches: float, virtual_stages: int, schedule: str) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once."""
    if pp == 1:
        return 1.0
    if schedule == "dualpipe":
        return float(pp + 1)
    held = min(float(pp), max(1.0, micro_batches))
    if virtual_stages > 1:
        held *= 1 + (pp - 1) / (pp * virtual_stages)
    return held


_PER_TOKEN: dict[tuple, tuple[float, float]] = {}


def _per_token(cfg: ModelConfig) -> tuple[float, float]:
    """(expert parameters, activation bytes per token and block averaged over the blocks) of
    a shape, remembered by its fields (the planner asks thousands of times)."""
    key = tuple(vars(cfg).values())
    if key not in _PER_TOKEN:
        _PER_TOKEN[key] = _shape_terms(cfg)
    return _PER_TOKEN[key]


def _shape_terms(cfg: ModelConfig) -> tuple[float, float]:
    n_moe = cfg.n_layer - cfg.n_dense_layers if cfg.is_moe else 0
    moe_share = n_moe / cfg.n_layer
    per_token_layer = (1 - moe_share) * activation_bytes_per_token(cfg, False)
    if n_moe:
        per_token_layer += moe_share * activation_bytes_per_token(cfg, True)
    return expert_params(cfg), per_token_layer


def memory_per_device(cfg: ModelConfig, seq_len: int, lay, recompute: str,
                      total_params: float | None = None, zero: int | None = None) -> Memory:
    """Bytes per device of `cfg` trained at `seq_len` under layout `lay` (perf.Layout), with
    ZeRO stage `zero` in place of the layout's when given."""
    tp, pp, cp, ep = lay.tp, lay.pp, lay.cp, lay.ep
    zero = lay.zero if zero is None else zero
    total = float(total_params if total_params is not None else count_params(cfg))
    experts, per_token_layer = _per_token(cfg)
    dense = total - experts
    per_dev = dense / (tp * pp) + experts / ((ep if ep > 1 else tp) * pp)
    # ZeRO shards over the ranks that hold the same slice: data x context parallel for the
    # dense weights; for experts, the ranks left over once ep is carved out.
    group = lay.dp * cp
    expert_group = max(1, lay.dp * cp * tp // ep) if ep > 1 else group
    shard = (dense / (tp * pp) / group + (experts / ((ep if ep > 1 else tp) * pp)) / expert_group)
    copies = 2.0 if lay.schedule == "dualpipe" else 1.0

    def held(key: str, stage: int) -> float:
        return STATE_BYTES[key] * (shard if zero >= stage else per_dev)

    weights = copies * held("weights", 3)
    grads = copies * held("grads", 2)
    optimizer = held("optimizer", 1)

    tokens = lay.micro_batch * seq_len / cp  # one micro-batch on one device
    layers = cfg.n_layer / pp
    per_token_layer /= tp  # sequence parallelism splits every activation
    if recompute == "full":
        stage = tokens * layers * ACT_BYTES * cfg.d_model / tp
        working = tokens * per_token_layer  # one block re-run at a time
    else:
        stage = tokens * layers * per_token_layer
        working = 0.0
    flight = in_flight(pp, lay.micro_batches(seq_len), lay.virtual_stages, lay.schedule)
    activations = stage * flight + working
    logits = tokens * cfg.vocab_size / tp * LOGIT_BYTES
    return Memory(weights, grads, optimizer, activations, logits)
