"""The performance model's terms by hand, and its behaviour where the physics is clear."""

import pytest

from estimate.assumptions import load_defaults
from estimate.hardware import get_accelerator
from estimate.perf import (
    Factor,
    Layout,
    balanced_stage_layers,
    bubble_fraction,
    goodput,
    load_factors,
    rank_costs,
    remote_copies,
    step_time,
)
from model.config import ModelConfig, get_preset
from model.flops import count_params

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
    # four stages of 20 blocks: the first adds the embedding, the last the LM head and loss,
    # and the steady state runs at the last one's pace
    first, mid, _, last = st.stage_s
    assert st.stage_s[1] == st.stage_s[2] == mid < first < last
    adam = 32 * count_params(cfg) / 128 / (2039e9 * f["memory_efficiency"].central)
    assert sum(st.stage_s) == pytest.approx((compute - adam) * 4 / 32)  # every stage's compute
    assert st.bubble == pytest.approx(compute * bubble_fraction("1f1b", 4, 32, 1, st.stage_s))
    assert st.bubble > compute * 3 / 32  # (pp - 1) / (m v) with equal stages
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
    # 16 chunks, rank r holding r, r+4, ...: the fill and drain shrink by v, the imbalance not
    assert len(interleaved.stage_s) == 16
    ranks = rank_costs(interleaved.stage_s, 4)
    assert interleaved.bubble == pytest.approx(compute * bubble_fraction("1f1b", 4, 32, 4, ranks))
    assert st.bubble / 4 < interleaved.bubble < st.bubble


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


def test_bubble_with_equal_stages_is_the_schedules_formula():
    """Equal ranks give exactly today's closed forms, for every schedule, pp, m and v."""
    for pp in (2, 3, 4, 8):
        for m in (1, 4, 8, 32):
            for v in (1, 2, 4):
                for cost in (0.1, 1 / 3, 7.0):
                    equal = [cost] * pp
                    assert bubble_fraction("1f1b", pp, m, v, equal) == (pp - 1) / (m * v)
                    assert bubble_fraction("zero-bubble", pp, m, v, equal) == (pp - 1) / (3 * m)
                    assert bubble_fraction("dualpipe", pp, m, v, equal) == \
                        bubble_fraction("dualpipe", pp, m, v)
    assert bubble_fraction("1f1b", 1, 4, 1, [5.0]) == 0.0


def test_bubble_with_a_slower_last_stage_by_hand():
    """pp=2, 1F1B, ranks of 2 and 3 (seconds per micro-batch), m=4: the last rank works
    4 x 3 s back to back, the first rank's forward and backward of one micro-batch frame it:
    the step is 14 s for 4 x 2.5 s of mean compute."""
    b = bubble_fraction("1f1b", 2, 4, 1, [2.0, 3.0])
    assert b == pytest.approx(14 / 10 - 1)
    # interleaved (v=2): the fill and drain halve, the slowest rank's pace stays
    assert bubble_fraction("1f1b", 2, 4, 2, [2.0, 3.0]) == pytest.approx((12 + 2 / 2) / 10 - 1)
    # DualPipe at pp=2 has no fill term: what is left is the imbalance
    assert bubble_fraction("dualpipe", 2, 4, 1, [2.0, 3.0]) == pytest.approx(3 / 2.5 - 1)
    with pytest.raises(ValueError, match="one per pipeline rank"):
        bubble_fraction("1f1b", 2, 4, 1, [1.0, 2.0, 3.0])


def test_stage_placement_and_layers():
    assert rank_costs([1.0, 2.0, 3.0, 4.0], 2) == [4.0, 6.0]  # loop: 0, 2 | 1, 3
    assert rank_costs([1.0, 2.0, 3.0, 4.0], 2, "v") == [5.0, 5.0]  # V: 0, 3 | 1, 2
    # DualPipe: two mirrored copies, each stage on two ranks for half the micro-batches
    assert rank_costs([1.0, 2.0, 3.0, 4.0], 4, "dual") == [2.5, 2.5, 2.5, 2.5]
    # whole blocks: the LM head's stage (2.5 blocks of extra work) holds fewer
    assert balanced_stage_layers(8, 2, 1.0, 0.0, 2.5) == [5, 3]
    # V: rank 0 holds the first and the last stage; 10.5 blocks' work over 2 ranks
    v = balanced_stage_layers(8, 4, 1.0, 0.0, 2.5, pp=2, placement="v")
    assert sum(v) == 8 and v[3] == 1
    assert rank_costs([v[0], v[1], v[2], v[3] + 2.5], 2, "v") == [5.5, 5.0]
    cfg = ModelConfig(vocab_size=32000, seq_len=1024, n_layer=8, d_model=1024, n_head=8,
                      ffn_hidden=2816)
    f = factors()
    lay = dict(pp=2, global_batch_tokens=8 * 1024)
    planned = step_time(cfg, 1024, H100, 2, Layout(**lay), "bf16", "none", f)
    given = step_time(cfg, 1024, H100, 2, Layout(**lay, stage_layers=(5, 3)), "bf16", "none", f)
    assert given.stage_s == pytest.approx(planned.stage_s)  # the split a run would choose
    # the even split leaves the head's stage slowest: a larger bubble, the same GEMMs
    even = step_time(cfg, 1024, H100, 2, Layout(**lay, stage_layers=(4, 4)), "bf16", "none", f)
    assert even.bubble > planned.bubble and even.gemm == pytest.approx(planned.gemm)
    assert even.stage_s[1] > even.stage_s[0]
    for bad in ((4, 3), (4, 2, 2)):
        with pytest.raises(ValueError, match="stage_layers"):
            step_time(cfg, 1024, H100, 2, Layout(**lay, stage_layers=bad), "bf16", "none", f)


def test_context_parallel_all_gather_against_the_ring():
    """The trainer's CP (all-gather of K and V, reduce-scatter of their gradients; 2 (cp-1)
    chunks per layer, not hidden) beside ring attention's (3 (cp-1) chunks, behind attention)."""
    cfg = get_preset("llama-1b")
    f = factors()
    lay = dict(cp=4, global_batch_tokens=32768)  # one micro-batch of one sequence
    ring = step_time(cfg, 32768, H100, 4, Layout(**lay), "bf16", "none", f)
    gather = step_time(cfg, 32768, H100, 4, Layout(**lay, cp_exchange="all-gather"), "bf16",
                       "none", f)
    link = 900 / 2 * 1e9 * f["comm_efficiency"].central
    chunk = 32768 / 4 * 2 * cfg.n_kv_head * cfg.head_dim * 2  # this rank's K and V, bf16
    assert gather.cp_comm == pytest.approx(cfg.n_layer * 2 * 3 * chunk / link)
    assert ring.cp_comm == 0.0  # 3 x 3 chunks per layer hide behind 32k-token attention
    assert gather.total > ring.total
    with pytest.raises(ValueError, match="cp_exchange"):
        step_time(cfg, 32768, H100, 4, Layout(**lay, cp_exchange="ulysses"), "bf16", "none", f)
