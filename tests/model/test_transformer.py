"""Shapes, causality, attention/embedding variants, MoE, KV cache, init, and a tiny overfit."""

import math

import pytest
import torch

from model.config import ModelConfig
from model.flops import count_params
from model.transformer import KVCache, MoE, Transformer


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=97, seq_len=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    return ModelConfig(**{**base, **changes})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


VARIANTS = {
    "mha-tied": tiny(n_kv_head=4),
    "gqa-untied": tiny(n_kv_head=2, tie_embeddings=False),
    "mqa": tiny(n_kv_head=1),
    "moe": tiny(
        n_experts=4, n_experts_active=2, n_shared_experts=1, moe_ffn_hidden=16, n_dense_layers=1
    ),
    # multi-head latent attention: low-rank query, 8 + 4 rope channels per q/k head, v of 6
    "mla": tiny(n_kv_head=None, kv_lora_rank=12, q_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_loss_sum(name):
    cfg = VARIANTS[name]
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, cfg.vocab_size) and logits.dtype == torch.float32
    assert loss is None

    targets = torch.randint(0, cfg.vocab_size, (3, 20))
    targets[0, :5] = -100  # ignored positions contribute nothing
    _, loss_sum = model(idx, targets)
    per_token = torch.nn.functional.cross_entropy(
        logits.view(-1, cfg.vocab_size), targets.view(-1), reduction="none"
    )
    assert torch.allclose(loss_sum, per_token[targets.view(-1) != -100].sum(), rtol=1e-5)
    assert per_token[targets.view(-1) == -100].eq(0).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    """Changing token t changes no logits before t."""
    cfg = VARIANTS[name]
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (idx[:, 15] + 1) % cfg.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-4)


def test_tied_and_untied_embeddings():
    tied, untied = build(tiny(tie_embeddings=True)), build(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    extra = 97 * 32
    assert untied.num_params() - tied.num_params() == extra
    assert tied.num_params(embeddings=False) == untied.num_params(embeddings=False)


def test_gqa_shapes():
    model = build(tiny(n_head=4, n_kv_head=2))
    attn = model.blocks[0].attn
    assert attn.wqkv.weight.shape == (32 + 16 + 16, 32)  # q heads, then k heads, then v heads
    assert attn.wo.weight.shape == (32, 32)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA is MHA whose K/V heads are copies: query head h reads K/V head h // n_rep."""
    gqa = build(tiny(n_kv_head=2))
    mha = Transformer(tiny(n_kv_head=4))
    state = gqa.state_dict()
    for i in range(2):
        key = f"blocks.{i}.attn.wqkv.weight"
        q, k, v = state[key].split([32, 16, 16])
        repeat = [kv.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for kv in (k, v)]
        state[key] = torch.cat([q, *repeat])  # [kv_head, head_dim, d] heads copied
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 16))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


def test_moe_layers_forward_backward():
    cfg = VARIANTS["moe"]
    model = build(cfg)
    assert not isinstance(model.blocks[0].mlp, MoE)  # n_dense_layers=1
    assert isinstance(model.blocks[1].mlp, MoE)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # every expert runs, even on zero tokens
        assert torch.isfinite(p.grad).all(), name
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0


def test_moe_matches_explicit_routing():
    """The expert loop equals routing each token by hand: sum of top-k prob * expert + shared."""
    torch.manual_seed(0)
    cfg = tiny(n_experts=4, n_experts_active=2, n_shared_experts=1, moe_ffn_hidden=16)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 32)
    out = moe(x)
    for b in range(2):
        for t in range(5):
            probs = torch.softmax(moe.router(x[b, t]), -1)
            w, e = probs.topk(2)
            want = sum(w[j] * moe.experts[int(e[j])](x[b, t]) for j in range(2))
            want = want + moe.shared(x[b, t])
            assert torch.allclose(out[b, t], want, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny(vocab_size=0))
    model = build(tiny())
    with pytest.raises(ValueError, match="seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache(2, 32)
    model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("name", ["gqa-untied", "moe", "mla"])
def test_kv_cache_matches_full_forward(name):
    """Prefill, a chunk at an offset (masked path), then single tokens == one full forward."""
    cfg = VARIANTS[name]
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    full, _ = model(idx)
    cache = KVCache(cfg.n_layer, cfg.seq_len)
    parts = [model(idx[:, :8], kv_cache=cache)[0], model(idx[:, 8:14], kv_cache=cache)[0]]
    parts += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(14, 20)]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_init_stats():
    cfg = tiny(vocab_size=1000, d_model=128, n_head=4, n_kv_head=4, n_layer=4, seq_len=16)
    model = build(cfg)
    resid = 0.02 / math.sqrt(2 * 4)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.tok_emb.weight.mean().abs().item() < 1e-3
    for block in model.blocks:
        assert block.attn.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.w_gate_up.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.wo.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert block.mlp.w_down.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert torch.equal(block.attn_norm.weight, torch.ones(128))
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_meta_device_then_init():
    """Build without memory on `meta`, materialise, init: same shapes, sane values."""
    cfg = tiny()
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == count_params(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    logits, _ = model(torch.randint(0, 97, (1, 8)))
    assert torch.isfinite(logits).all()
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("name", ["gqa-untied", "moe", "mla"])
def test_overfits_fixed_batch(name):
    cfg = VARIANTS[name]
    model = build(cfg)
    torch.manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (4, 25))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        _, loss_sum = model(x, y)
        loss = loss_sum / y.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), rel=0.1)  # near uniform at init
    assert losses[-1] < 0.1 * losses[0], losses[::10]
