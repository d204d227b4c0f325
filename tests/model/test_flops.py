"""Parameter counts against the real modules, FLOPs against torch's FlopCounterMode, and the
published sizes of the large presets (by arithmetic: nothing large is allocated)."""

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from model.config import PRESETS, ModelConfig, get_preset
from model.flops import (
    _attention_core_flops_forward,
    _attention_params,
    count_params,
    hardware_flops_per_token,
    model_flops_per_token,
)
from model.transformer import Transformer

CONFIGS = {
    "tied-mha": ModelConfig(vocab_size=101, seq_len=16, n_layer=2, d_model=32, n_head=4),
    "untied-gqa": ModelConfig(
        vocab_size=101,
        seq_len=16,
        n_layer=3,
        d_model=48,
        n_head=6,
        n_kv_head=2,
        ffn_hidden=100,
        tie_embeddings=False,
    ),
    "moe": ModelConfig(
        vocab_size=101,
        seq_len=16,
        n_layer=3,
        d_model=32,
        n_head=4,
        n_kv_head=2,
        n_experts=6,
        n_experts_active=2,
        n_shared_experts=2,
        moe_ffn_hidden=24,
        n_dense_layers=1,
    ),
    "moe-no-shared": ModelConfig(
        vocab_size=101,
        seq_len=16,
        n_layer=2,
        d_model=32,
        n_head=4,
        n_experts=4,
        n_experts_active=1,
        tie_embeddings=False,
    ),
    # multi-head latent attention, with a low-rank query and at full query rank
    "mla": ModelConfig(vocab_size=101, seq_len=16, n_layer=2, d_model=32, n_head=4,
                       kv_lora_rank=12, q_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=6),
    "mla-full-q": ModelConfig(vocab_size=101, seq_len=16, n_layer=2, d_model=32, n_head=4,
                              kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                              v_head_dim=6, tie_embeddings=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_count_params_matches_modules(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):  # shapes only
        model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert count_params(cfg) == model.num_params()
    assert count_params(cfg, embeddings=False) == model.num_params(embeddings=False)


def test_active_params_moe_by_hand():
    cfg = CONFIGS["moe"]  # d=32, 3 layers (1 dense), 6 experts, 2 active, 2 shared of width 24
    d, V = 32, 101
    attn = 2 * d * d + 2 * d * (2 * 8)  # wq, wo: d x d; wk, wv: d x (2 kv heads * 8)
    dense_mlp = 3 * d * cfg.ffn_hidden
    expert = 3 * d * 24
    router = d * 6
    norms = (2 * 3 + 1) * d
    emb = V * d  # tied
    total = 3 * attn + dense_mlp + 2 * (router + (6 + 2) * expert) + norms + emb
    active = 3 * attn + dense_mlp + 2 * (router + (2 + 2) * expert) + norms + emb
    assert count_params(cfg) == total
    assert count_params(cfg, active=True) == active
    # a dense model's active count is its total
    assert count_params(CONFIGS["untied-gqa"], active=True) == count_params(CONFIGS["untied-gqa"])


def test_vocab_zero_is_an_error_not_a_silent_undercount():
    cfg = get_preset("small")  # vocab_size 0 = from data
    with pytest.raises(ValueError, match="vocab_size"):
        count_params(cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        model_flops_per_token(cfg)
    assert count_params(cfg, embeddings=False) > 0


# FlopCounterMode counts matmuls and the attention kernels, not norms or elementwise ops. On CPU
# it has no formula for the fused SDPA kernel, so we run the math backend, whose QK^T and AV are
# bmm's it counts (in full, ignoring the causal mask: the same convention as our 12LdT term).
# Norms, RoPE, softmax and the loss are not counted; our formula leaves them out as well, and
# d_model is large enough relative to these shapes that they would be small anyway.
FLOP_CONFIGS = {
    "dense": ModelConfig(
        vocab_size=512,
        seq_len=64,
        n_layer=2,
        d_model=128,
        n_head=4,
        n_kv_head=2,
        tie_embeddings=False,
    ),
    "tied": ModelConfig(vocab_size=512, seq_len=64, n_layer=2, d_model=128, n_head=4),
    # top-k routing sends every token to exactly n_experts_active experts however unbalanced
    # the router is, so the expert matmuls sum to tokens * k * expert size: well defined.
    "moe": ModelConfig(
        vocab_size=512,
        seq_len=64,
        n_layer=2,
        d_model=128,
        n_head=4,
        n_kv_head=2,
        n_experts=4,
        n_experts_active=2,
        n_shared_experts=1,
        moe_ffn_hidden=128,
        n_dense_layers=1,
    ),
    # DeepSeek-V3's attention in small: q/k heads of 32 + 16 rope channels, v heads of 32
    "mla": ModelConfig(vocab_size=512, seq_len=64, n_layer=2, d_model=128, n_head=4,
                       kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, tie_embeddings=False),
    "mla-moe": ModelConfig(vocab_size=512, seq_len=64, n_layer=2, d_model=128, n_head=4,
                           kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                           v_head_dim=32, n_experts=4, n_experts_active=2, n_shared_experts=1,
                           moe_ffn_hidden=64, n_dense_layers=1),
}


class Checkpointed(nn.Module):
    """What train/ does from the outside: re-run the block's forward in the backward pass."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, *args, use_reentrant=False)


def counted_flops_per_token(model: Transformer, batch: int, seq_len: int) -> float:
    idx = torch.randint(0, model.cfg.vocab_size, (batch, seq_len))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss_sum = model(idx, idx)
        loss_sum.backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize("name", FLOP_CONFIGS)
def test_model_flops_match_flop_counter(name):
    cfg = FLOP_CONFIGS[name]
    torch.manual_seed(0)
    counted = counted_flops_per_token(Transformer(cfg), batch=2, seq_len=cfg.seq_len)
    assert model_flops_per_token(cfg) == pytest.approx(counted, rel=0.02)
    # a shorter sequence: the attention term scales with T, the rest does not
    counted_short = counted_flops_per_token(Transformer(cfg), batch=2, seq_len=16)
    assert model_flops_per_token(cfg, seq_len=16) == pytest.approx(counted_short, rel=0.02)


@pytest.mark.parametrize("name", ["dense", "moe", "mla"])
def test_full_recompute_flops_match_flop_counter(name):
    cfg = FLOP_CONFIGS[name]
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.blocks = nn.ModuleList(Checkpointed(b) for b in model.blocks)
    counted = counted_flops_per_token(model, batch=2, seq_len=cfg.seq_len)
    assert hardware_flops_per_token(cfg, recompute="full") == pytest.approx(counted, rel=0.02)
    assert counted > 1.15 * model_flops_per_token(cfg)  # the recomputation was really counted

    # Without early stop the whole block forward runs again: the textbook + 2 N_blocks + 4LdT.
    with set_checkpoint_early_stop(False):
        counted_all = counted_flops_per_token(model, batch=2, seq_len=cfg.seq_len)
    L, d, T = cfg.n_layer, cfg.d_model, cfg.seq_len
    norms = (2 * L + 1) * d + L * (cfg.q_lora_rank + cfg.kv_lora_rank)
    n_blocks = count_params(cfg, active=True, embeddings=False) - norms
    core = _attention_core_flops_forward(cfg, T)  # 4LdT for multi-head attention
    assert cfg.is_mla or core == 4 * L * d * T
    textbook = model_flops_per_token(cfg) + 2 * n_blocks + core
    assert textbook == pytest.approx(counted_all, rel=0.02)
    assert counted_all > counted


def test_recompute_arithmetic():
    cfg = get_preset("llama2-70b")
    L, d, T = cfg.n_layer, cfg.d_model, cfg.seq_len
    none = hardware_flops_per_token(cfg)
    assert none == model_flops_per_token(cfg)
    assert hardware_flops_per_token(cfg, recompute="selective") - none == 4 * L * d * T
    blocks = count_params(cfg, embeddings=False) - (2 * L + 1) * d  # minus norm weights
    down = L * d * cfg.ffn_hidden  # not re-run: see model.flops._final_matmul_params
    full = hardware_flops_per_token(cfg, recompute="full")
    assert full - none == 2 * (blocks - down) + 4 * L * d * T
    assert 1.2 < full / none < 1.3
    # every 2nd block: half the layers (0 and 2 of 4) pay the full extra
    assert hardware_flops_per_token(cfg, recompute="every_k", every_k=2) - none == pytest.approx(
        (full - none) * len(range(0, L, 2)) / L)
    with pytest.raises(ValueError, match="none, full, every_k, attention, selective"):
        hardware_flops_per_token(cfg, recompute="some")


def test_flops_formula_pieces():
    """6N + 12LdT with N = active block matmul weights + LM head, no embedding lookup."""
    cfg = get_preset("gpt3-175b")
    N = count_params(cfg, embeddings=False) - (2 * cfg.n_layer + 1) * cfg.d_model
    N += cfg.vocab_size * cfg.d_model
    want = 6 * N + 12 * cfg.n_layer * cfg.d_model * 2048
    assert model_flops_per_token(cfg, 2048) == want
    # GPT-3 175B: ~1.09e12 FLOPs/token at 2048 (Narayanan et al. 2021 give 6N(1 + T/6d + ...))
    assert model_flops_per_token(cfg) == pytest.approx(1.08e12, rel=0.02)


# Published totals. Our presets use SwiGLU/RMSNorm/RoPE with no biases, so they land close to,
# not exactly on, the papers' numbers.
@pytest.mark.parametrize(
    "name, low, high",
    [
        ("gpt3-175b", 173e9, 176e9),  # 174.6B: no learned positions or biases (~0.4B in GPT-3)
        ("llama2-70b", 68.5e9, 70e9),  # 68.98B, the HF checkpoint's count
        ("llama3-405b", 404e9, 407e9),  # 405.85B
        # 671.03B: DeepSeek's 671B, the multi-token-prediction module excluded as there
        ("deepseek-v3", 670.5e9, 671.5e9),
    ],
)
def test_large_preset_totals(name, low, high):
    assert low <= count_params(PRESETS[name]) <= high


def test_deepseek_v3_active():
    # 37.55B: the paper's 37B activated parameters, plus the 0.93B input embedding it does
    # not count among them
    active = count_params(PRESETS["deepseek-v3"], active=True)
    assert 37.4e9 <= active <= 37.7e9
    assert count_params(PRESETS["deepseek-v3"]) / active > 15


def test_mla_attention_by_hand():
    """DeepSeek-V3's attention per layer (DeepSeek-V3 report sec. 4.2; V2 sec. 2.1)."""
    cfg = PRESETS["deepseek-v3"]
    d, H = 7168, 128
    q = d * 1536 + 1536 * H * (128 + 64)  # W_DQ, then W_UQ and W_QR
    kv = d * (512 + 64) + 512 * H * (128 + 128)  # W_DKV and W_KR, then W_UK and W_UV
    o = H * 128 * d
    assert _attention_params(cfg) == q + kv + o
    # scores over 192 channels and values over 128, per head: 2.86x MHA of head dim 56
    T = 4096
    assert _attention_core_flops_forward(cfg, T, layers=1) == 2 * H * (192 + 128) * T


def test_mtp_module_flops_by_hand():
    """One multi-token-prediction module: projection 2d -> d, one block like the last, the
    output head again; counted in FLOPs, not in the parameters of the main model."""
    cfg = CONFIGS["moe"]
    with_mtp = cfg.replace(mtp_depth=1)
    d, T = cfg.d_model, cfg.seq_len
    block = count_params(cfg, active=True, embeddings=False) - count_params(
        cfg.replace(n_layer=cfg.n_layer - 1), active=True, embeddings=False) - 2 * d
    extra = 6 * (2 * d * d + block + cfg.vocab_size * d) + 3 * 4 * d * T
    assert count_params(with_mtp) == count_params(cfg)
    assert model_flops_per_token(with_mtp) - model_flops_per_token(cfg) == extra


def test_llama_1b_and_gpt2_sizes():
    assert count_params(PRESETS["gpt2-124m"]) == pytest.approx(124e6, rel=0.01)
    assert count_params(PRESETS["llama-1b"]) == pytest.approx(1.1e9, rel=0.01)
