"""The performance model's terms by hand, and its behaviour where the physics is clear."""

import pytest

from estimate.assumptions import load_defaults
from estimate.hardware import get_accelerator
from estimate.perf import (
    Factor,
    Layout,
    goodput,
    load_factors,
    remote_copies,
    step_time,
)
from model.config import ModelConfig, get_preset

UNIT = Factor("stack_efficiency", 1.0, 1.0, 1.0, "high", "test")
H100 = get_accelerator("H100-SXM5-80GB")


def factors(**changes):
    f = load_factors(load_defaults(), UNIT)
    for k, v in changes.items():
        f[k] = Factor(k, v, v, v, f[k].better if k in f else "high", "test")
    return f


def test_single_device_gemms_by_roofline():
    """One device, one layer: 3 x the forward GEMMs, each max(FLOPs / rate, bytes / bandwidth)."""
    cfg = ModelConfig(vocab_size=1000, seq_len=512, n_layer=1, d_model=1024, n_head=8,
                      ffn_hidden=2048)
    f = factors()
    lay = Layout(global_batch_tokens=512)  # one micro-batch of one sequence
    st = step_time(cfg, 512, H100, 1, lay, "bf16", "none", f)
    rate = 989e12 * 0.803
    bw = 3350e9 * f["memory_efficiency"].central

    def g(m, k, n):
        return max(2 * m * k * n / rate, 2 * (m * k + k * n + m * n) / bw)

    fwd = g(512, 1024, 3 * 1024) + g(512, 1024, 1024) + 2 * g(512, 1024, 2048) + g(512, 2048, 1024)
    fwd += g(512, 1024, 1000)  # LM head
    assert st.gemm == pytest.approx(3 * fwd)
    assert st.tp_comm == st.dp_comm == st.ep_comm == st.bubble == st.stack == 0
    assert st.model_flops == pytest.approx(512 * (6 * (4 * 1024**2 + 3 * 1024 * 2048 + 1000 * 1024)
                                                  + 12 * 1024 * 512))


def test_bubble_and_tensor_parallel_terms():
    cfg = get_preset("llama2-70b")
    f = factors(tp_exposed=1.0)
    lay = Layout(tp=8, pp=4, dp=4, global_batch_tokens=32 * 4096 * 4, virtual_stages=1)
    st = step_time(cfg, 4096, get_accelerator("A100-SXM4-80GB"), 128, lay, "bf16", "none", f)
    m = lay.micro_batches(4096)
    assert m == 32
    compute = st.gemm + st.recompute + st.attention + st.memory + st.tp_comm
    assert st.bubble == pytest.approx(compute * 3 / 32)  # (pp - 1) / (m v)
    link = 600 / 2 * 1e9 * f["comm_efficiency"].central
    msg = 4096 * 8192 * 2
    per_layer = 4 * 2 * 7 / 8 * msg / link  # 4 collectives, ring 2(tp-1)/tp
    norms = 2 * 2 * 7 / 8 * 8192 * 4 / link  # each layer's 2 norm weights' fp32 gradients (sp)
    # the embedding and the LM head's input (f and g: half a layer's bytes), the final norm's
    # gradient, the cross-entropy's 3 fp32 all-reduces per token, spread over the 4 stages
    ends = (per_layer / 2 + norms / 2 + 3 * 2 * 7 / 8 * 4096 * 4 / link) / 4
    grad_norm = 2 * 7 / 8 * 8 / link
    assert st.tp_comm == pytest.approx(m * (80 / 4 * (per_layer + norms) + ends) + grad_norm)
    interleaved = step_time(cfg, 4096, get_accelerator("A100-SXM4-80GB"), 128,
                            Layout(tp=8, pp=4, dp=4, global_batch_tokens=lay.global_batch_tokens,
                                   virtual_stages=4), "bf16", "none", f)
    assert interleaved.bubble == pytest.approx(st.bubble / 4)


def test_fp8_is_faster_but_not_twice():
    cfg = get_preset("llama3-405b")
    lay = Layout(tp=8, pp=16, dp=128, global_batch_tokens=16e6, virtual_stages=4)
    f = factors()
    bf16 = step_time(cfg, 8192, H100, 16384, lay, "bf16", "none", f).total
    fp8 = step_time(cfg, 8192, H100, 16384, lay, "fp8", "none", f).total
    assert 1.1 < bf16 / fp8 < 1.8


def test_node_limited_routing_halves_deepseek_v3_traffic():
    """DeepSeek-V3: 8 of 256 experts over 64 ranks = 8 nodes; at most 4 nodes per token."""
    cfg = get_preset("deepseek-v3")
    free = Layout(tp=1, pp=16, dp=128, ep=64)
    limited = Layout(tp=1, pp=16, dp=128, ep=64, max_nodes_per_token=4)
    assert remote_copies(cfg, free, 8) == pytest.approx(8 * 7 / 8)
    assert remote_copies(cfg, limited, 8) == pytest.approx(4 * 7 / 8)
    assert remote_copies(cfg, Layout(ep=8, dp=8), 8) == 0  # one node: NVLink only


def test_goodput_from_llama3_interruptions():
    f = load_factors(load_defaults(), UNIT)
    g = goodput(16384, f)
    assert g == pytest.approx(1 / (1 + 1.97e-5 * 16384 * (0.25 + 0.5 / 2)))
    assert goodput(8, f) > 0.999
    assert goodput(16384, f, "worst") < g < goodput(16384, f, "best")


def test_layout_refusals():
    """The fixed layout rule (choose_layout) is gone: the planner (test_planner.py) replaces it;
    a layout may leave accelerators idle but never use more than there are."""
    cfg = get_preset("llama2-70b")
    with pytest.raises(ValueError, match="does not fit 64 accelerators"):
        Layout(tp=8, pp=4, dp=4).check(64, cfg)
    Layout(tp=8, pp=4, dp=4).check(1024, cfg)  # idle accelerators are allowed
    with pytest.raises(ValueError, match="no data"):
        Layout(tp=8, pp=1, dp=16, global_batch_tokens=4096).check(128, cfg)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        Layout(ep=8, dp=8).check(8, cfg)


def test_expert_all_to_all_inside_a_node_uses_the_scale_up_links():
    """Experts over the 8 GPUs of one node: no network traffic, but the k routed copies bound
    for the 7 other GPUs cross NVLink (dispatch and combine, forward and backward)."""
    cfg = get_preset("deepseek-v3")
    f = factors(ep_exposed=1.0)
    lay = Layout(tp=1, pp=1, dp=8, ep=8, global_batch_tokens=8 * 4096)
    st = step_time(cfg, 4096, H100, 8, lay, "bf16", "none", f)
    link = 900 / 2 * 1e9 * f["comm_efficiency"].central
    moe_layers = cfg.n_layer - cfg.n_dense_layers
    copies = cfg.n_experts_active * 7 / 8
    assert st.ep_comm == pytest.approx(moe_layers * 4096 * (2 + 2) * 2 * cfg.d_model * copies / link)


def test_attention_efficiency_from_the_catalog_where_an_entry_has_one():
    """H100 carries its own attention efficiency (FlashAttention-2 at 35% of its peak, per the
    FlashAttention-3 paper); A100 takes defaults.yaml's. The attention term scales with it."""
    from estimate.hardware import Accelerator

    cfg = ModelConfig(vocab_size=1000, seq_len=4096, n_layer=2, d_model=1024, n_head=8,
                      ffn_hidden=2048)
    f = factors()
    lay = Layout(global_batch_tokens=4096)
    own = H100.get("attention_efficiency")
    assert own["central"] == pytest.approx(0.35) and own["high"] == pytest.approx(0.75)
    plain = Accelerator(H100.name, {k: v for k, v in H100.entry.items() if k != "attention_efficiency"})
    with_entry = step_time(cfg, 4096, H100, 1, lay, "bf16", "none", f)
    without = step_time(cfg, 4096, plain, 1, lay, "bf16", "none", f)
    assert with_entry.attention == pytest.approx(without.attention * f["attention_efficiency"].central / 0.35)
    assert with_entry.gemm == pytest.approx(without.gemm)
    assert get_accelerator("A100-SXM4-80GB").get("attention_efficiency") is None
