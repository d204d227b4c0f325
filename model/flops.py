"""Parameter and FLOP accounting for `ModelConfig`, by arithmetic (instant even for 405B).

`count_params` mirrors `model/transformer.py` module by module and is tested to equal the
number of elements of `Transformer(cfg).parameters()`. `model_flops_per_token` is the "model
FLOPs" of MFU (PaLM, Chowdhery et al. 2022, appendix B); `hardware_flops_per_token` adds what
activation recomputation executes again.

A matmul of an [m, k] by a [k, n] matrix costs 2mkn FLOPs (a multiply and an add per
term), so per token a weight matrix W costs 2 * numel(W) in the forward pass, and 4 * numel(W)
in the backward pass (one matmul for the gradient of the input, one for the gradient of W).
"""

from __future__ import annotations

from model.config import ModelConfig

# The one table of activation-recomputation modes. `trainable` ones are values of the trainer's
# `activation_checkpointing`; the estimator projects with any of them.
RECOMPUTE_MODES: dict[str, tuple[str, bool]] = {
    "none": ("activations are stored, nothing is recomputed", True),
    "full": ("every block re-runs its forward in the backward pass", True),
    "every_k": ("every k-th block (0, k, 2k, ...) re-runs its forward", True),
    "attention": ("every block re-runs its attention sub-layer: q, k, v projections and core", True),
    "selective": ("only the attention core (QK^T, softmax, AV) is recomputed "
                  "(Korthikanti et al. 2022)", False),
}
TRAINABLE_RECOMPUTE = tuple(m for m, (_, trainable) in RECOMPUTE_MODES.items() if trainable)


def _attention_params(cfg: ModelConfig) -> int:
    """Multi-head / grouped-query: wq and wo are d x (n_head * head_dim) = d x d; wk and wv are
    d x (n_kv_head * head_dim). Multi-head latent attention: the query path (d -> q_lora_rank ->
    n_head * (nope + rope), or d -> n_head * (nope + rope) at full rank), the key/value path
    (d -> kv_lora_rank + rope, then kv_lora_rank -> n_head * (nope + v)) and wo
    (n_head * v -> d)."""
    d, H = cfg.d_model, cfg.n_head
    if not cfg.is_mla:
        kv = cfg.n_kv_head * cfg.head_dim
        return 2 * d * d + 2 * d * kv
    q_out = H * cfg.qk_head_dim
    q = cfg.q_lora_rank * (d + q_out) if cfg.q_lora_rank else d * q_out
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * d


def _output_projection_params(cfg: ModelConfig) -> int:
    return cfg.n_head * cfg.value_head_dim * cfg.d_model


def _swiglu_params(d_model: int, hidden: int) -> int:
    """gate and up (d -> hidden) and down (hidden -> d)."""
    return 3 * d_model * hidden


def _mlp_params(cfg: ModelConfig, layer: int, active: bool) -> int:
    """The dense SwiGLU, or for an MoE layer: router (d -> n_experts), shared experts and the
    routed experts (all of them, or only the n_experts_active a token goes through)."""
    if not cfg.is_moe_layer(layer):
        return _swiglu_params(cfg.d_model, cfg.ffn_hidden)
    routed = cfg.n_experts_active if active else cfg.n_experts
    experts = (routed + cfg.n_shared_experts) * _swiglu_params(cfg.d_model, cfg.moe_ffn_hidden)
    return cfg.d_model * cfg.n_experts + experts


def _require_vocab(cfg: ModelConfig, what: str) -> None:
    """vocab_size=0 means "from the data"; counting without it would silently drop the
    embedding and LM head, a large share of a small model."""
    if cfg.vocab_size <= 0:
        raise ValueError(
            f"{what} needs model.vocab_size > 0, got {cfg.vocab_size} (0 = from the data): "
            "set it, e.g. cfg.replace(vocab_size=...)"
        )


def _block_matmul_params(cfg: ModelConfig, active: bool) -> int:
    """Weights of all blocks that take part in matmuls (everything but the RMSNorm weights)."""
    return sum(_attention_params(cfg) + _mlp_params(cfg, i, active) for i in range(cfg.n_layer))


def count_params(cfg: ModelConfig, *, active: bool = False, embeddings: bool = True) -> int:
    """Exact parameter count of `Transformer(cfg)`, a tied embedding counted once. The
    multi-token-prediction modules (`mtp_depth`), which `Transformer` does not build, are not
    counted, as DeepSeek-V3's "671B" does not count them.

    active=True counts, in MoE layers, only the router, the shared experts and the
    n_experts_active routed experts one token uses. embeddings=False leaves out the vocabulary
    matrices (token embedding and, when untied, the LM head): Kaplan et al.'s (2020)
    "non-embedding" parameters.
    """
    n = _block_matmul_params(cfg, active)
    n += (2 * cfg.n_layer + 1) * cfg.d_model  # RMSNorm weights: two per block, one final
    n += cfg.n_layer * (cfg.q_lora_rank + cfg.kv_lora_rank)  # MLA's latent RMSNorms
    if embeddings:
        _require_vocab(cfg, "count_params(embeddings=True)")
        n += cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return n


def _matmul_params_per_token(cfg: ModelConfig) -> int:
    """N of "6N": the weights one token is multiplied with. The active block weights (router
    included), plus the LM head, which is a matmul whether or not it shares its matrix with the
    embedding. The embedding lookup is indexing, not a matmul, so it does not count; RMSNorm
    weights (elementwise, about 2 * L * d of them) are negligible and left out."""
    _require_vocab(cfg, "FLOP counting")
    return (_block_matmul_params(cfg, active=True) + cfg.vocab_size * cfg.d_model
            + cfg.mtp_depth * _mtp_matmul_params(cfg))


def _mtp_matmul_params(cfg: ModelConfig) -> int:
    """One multi-token-prediction module (DeepSeek-V3 sec. 2.2): a projection of the normed
    hidden state and the next token's embedding (2d -> d), one more block (shaped like the
    last one), and the shared output head, a matmul again for the extra prediction."""
    last = cfg.n_layer - 1
    return (2 * cfg.d_model * cfg.d_model + _attention_params(cfg)
            + _mlp_params(cfg, last, active=True) + cfg.vocab_size * cfg.d_model)


def _attention_core_flops_forward(cfg: ModelConfig, seq_len: int, layers: int | None = None) -> int:
    """Forward FLOPs per token of the attention scores and mixing, summed over `layers` (all
    blocks and multi-token-prediction modules by default): QK^T is 2 * T * qk_head_dim per
    head and (scores)V 2 * T * value_head_dim, over n_head heads (the query heads:
    grouped-query attention shares K and V but every query head still attends). For
    multi-head or grouped-query attention that is 4 * T * d per layer; MLA's heads are wider
    (DeepSeek-V3: 192 + 128 channels per head against d / n_head = 56). Causal kernels can
    skip about half of it (the masked upper triangle); like PaLM and most MFU reporting, we
    count the full term."""
    layers = cfg.n_layer + cfg.mtp_depth if layers is None else layers
    return 2 * layers * cfg.n_head * (cfg.qk_head_dim + cfg.value_head_dim) * seq_len


def model_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward + backward: 6 * N + 12 * L * d * T.

    This is PaLM's "6N + 12LHQT" (Chowdhery et al. 2022, appendix B; H * Q = d): 2N forward
    and 4N backward for the matmul weights N (active weights for MoE, multi-token-prediction
    modules included, see `_matmul_params_per_token`), and the attention core, 4LdT forward
    (wider for MLA), twice that backward.
    Activation recomputation is not included: these are the FLOPs the model needs, which is
    what MFU divides by. T defaults to cfg.seq_len.
    """
    T = cfg.seq_len if seq_len is None else seq_len
    return float(6 * _matmul_params_per_token(cfg) + 3 * _attention_core_flops_forward(cfg, T))


def _final_matmul_params(cfg: ModelConfig, layer: int) -> int:
    """Weights of a block's last matmul when nothing in the backward pass needs its output.

    The MLP's down projection only feeds the residual add, whose backward needs no saved
    tensors; autograd keeps the projection's input and weight, not its output. PyTorch's
    non-reentrant checkpoint stops recomputing as soon as every tensor the backward needs is
    back ("early stop", on by default), so this matmul is not re-run. In an MoE layer the
    routed experts' outputs are saved (they are multiplied by the router weights), so only a
    shared expert's down projection, which comes last, is skipped.
    """
    if not cfg.is_moe_layer(layer):
        return cfg.ffn_hidden * cfg.d_model
    return cfg.n_shared_experts * cfg.moe_ffn_hidden * cfg.d_model


def recomputed_layers(n_layer: int, recompute: str, every_k: int = 1) -> list[int]:
    """Indices of the blocks that recompute something in the backward pass."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(
            f"recompute={recompute!r} is not valid; valid: {', '.join(RECOMPUTE_MODES)}"
        )
    if recompute == "none":
        return []
    k = every_k if recompute == "every_k" else 1
    return [i for i in range(n_layer) if i % k == 0]


def _attention_sublayer_flops_forward(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one block's attention sub-layer without its output
    projection: the q, k, v projections (2 FLOPs per weight) and the attention core. The output
    projection is not re-run when the sub-layer is checkpointed: nothing in the backward pass
    needs its output (non-reentrant checkpoint's early stop, see `_final_matmul_params`)."""
    qkv = _attention_params(cfg) - _output_projection_params(cfg)
    return 2 * qkv + _attention_core_flops_forward(cfg, seq_len, layers=1)


def hardware_flops_per_token(
    cfg: ModelConfig, seq_len: int | None = None, recompute: str = "none", every_k: int = 1
) -> float:
    """FLOPs per token actually executed with activation recomputation (the HFU numerator).

    - "none": the model FLOPs.
    - "full": every block is checkpointed (torch.utils.checkpoint, non-reentrant) and its
      forward runs again in the backward pass, except its final down projection (see
      `_final_matmul_params`): + 2 * (N_blocks - L * d * ffn_hidden) + 4 * L * d * T for a
      dense model, about +24% for Llama-2-70B at 4k tokens. The textbook "+2N_blocks + 4LdT"
      (about +33%) is what reentrant checkpointing, or early stop switched off, executes.
      The embedding and the LM head sit outside the blocks and are never recomputed.
    - "every_k": "full" for the blocks 0, k, 2k, ... only.
    - "attention": every block re-runs its attention sub-layer (q, k, v projections and the
      core; `_attention_sublayer_flops_forward`).
    - "selective" (Korthikanti et al. 2022): only the attention core (QK^T, softmax, AV) is
      recomputed: + 4 * L * d * T.
    """
    layers = recomputed_layers(cfg.n_layer, recompute, every_k)
    T = cfg.seq_len if seq_len is None else seq_len
    flops = model_flops_per_token(cfg, T)
    if recompute == "attention":
        return float(flops + cfg.n_layer * _attention_sublayer_flops_forward(cfg, T))
    if recompute == "selective":
        return float(flops + _attention_core_flops_forward(cfg, T, cfg.n_layer))
    if layers:  # full, every_k: the share of the full-recompute extra of the layers re-run
        skipped = sum(_final_matmul_params(cfg, i) for i in range(cfg.n_layer))
        full_extra = 2 * (_block_matmul_params(cfg, active=True) - skipped)
        full_extra += _attention_core_flops_forward(cfg, T, cfg.n_layer)
        flops += full_extra * len(layers) / cfg.n_layer
    return float(flops)


def piece_flops_per_token(cfg: ModelConfig, seq_len: int | None = None,
                          ) -> tuple[float, list[float], float]:
    """Training FLOPs per token (forward + backward) of the pieces a pipeline cuts the model
    into at block boundaries: (embedding, [each block], head). The embedding is a lookup, no
    matmul: d per token forward (the copy) and d backward (the gradient's scatter-add). A
    block: 6 x its active matmul weights plus 3 x its attention core (as
    `model_flops_per_token` counts them). The head: the final norm and the LM head with its
    softmax cross-entropy, 6 V d for the matmul; the norm's O(d) and the softmax's O(V)
    elementwise work are under 1% of that at d >= 64 and left out."""
    _require_vocab(cfg, "FLOP counting")
    T = cfg.seq_len if seq_len is None else seq_len
    core = 3 * _attention_core_flops_forward(cfg, T, layers=1)
    blocks = [float(6 * (_attention_params(cfg) + _mlp_params(cfg, i, active=True)) + core)
              for i in range(cfg.n_layer)]
    return float(2 * cfg.d_model), blocks, float(6 * cfg.vocab_size * cfg.d_model)
