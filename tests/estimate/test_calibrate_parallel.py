import json
import sys

import pytest

from estimate.calibrate.parallel import (
    OPS,
    PARALLEL_QUICK,
    PARALLEL_SWEEP,
    TRAINER_RS,
    LinkFit,
    ParallelCalibration,
    StepCheck,
    TermCheck,
    TrainerRun,
    attention_efficiency,
    bubble_checks,
    elementwise_bytes_per_dim,
    fit_link,
    harness_spec,
    host_ops,
    layout_gemm_rate,
    link_points,
    load_parallel_sweep,
    local_accelerator,
    local_factors,
    machine_share,
    model_config,
    pipeline_config,
    predict_step,
    publish_parallel,
    read_checked_terms,
    relative_check,
    term_checks,
)
from estimate.hardware import load_catalog
from estimate.perf import (
    Layout,
    bubble_fraction,
    forward_gemms,
    sent_bytes,
    step_time,
    tp_collectives,
    tp_comm_seconds,
)
from model.flops import count_params
from tests.utils import run_cmd


def test_fit_link_recovers_latency_and_bandwidth():
    alpha, beta = 2e-4, 1.5e9
    points = [(x, alpha + x / beta) for x in (1e4, 1e5, 1e6, 1e7)]
    fit = fit_link(points, ("all_reduce",))
    assert fit.latency_s == pytest.approx(alpha, rel=1e-9)
    assert fit.bytes_per_s == pytest.approx(beta, rel=1e-9)
    assert max(abs(r) for r in fit.residuals) < 1e-9
    assert fit.seconds(1e6) == pytest.approx(alpha + 1e6 / beta)


def test_fit_link_without_latency_and_bad_input():
    # times that would need a negative latency: the latency is held at 0, not made negative
    fit = fit_link([(1e5, 0.5e-4), (1e6, 1e-3), (1e7, 1e-2)])
    assert fit.latency_s == 0.0 and fit.bytes_per_s > 0
    with pytest.raises(ValueError, match="two different positive sizes"):
        fit_link([(1e6, 1e-3), (1e6, 2e-3)])
    with pytest.raises(ValueError, match="two different positive sizes"):
        fit_link([(1e5, 1e-3), (1e6, 0.0)])


def test_sent_bytes_are_the_ring_shares_perf_counts():
    assert sent_bytes("all_reduce", 1000, 2) == 1000  # 2 (g-1)/g
    assert sent_bytes("all_reduce", 1000, 4) == 1500
    assert sent_bytes("all_gather", 1000, 2) == 500
    assert sent_bytes("reduce_scatter", 1000, 4) == 750
    assert sent_bytes("send_recv", 1000, 2) == 1000
    with pytest.raises(ValueError, match="unknown collective"):
        sent_bytes("all_to_all", 1000, 2)


def test_relative_check_and_bubble_verdicts():
    assert relative_check("x", 1.2, 1.0).holds and not relative_check("x", 1.3, 1.0).holds
    assert relative_check("x", 0.8, 1.0).holds and not relative_check("x", 0.7, 1.0).holds
    one_f = 1 / (4 + 1)  # (p-1)/(m+p-1) at pp=2, M=4
    rows = [{"schedule": "1f1b", "microbatches": 4, "bubble": [one_f, one_f]},
            {"schedule": "interleaved", "microbatches": 4, "bubble": [0.3, 0.3]},
            {"schedule": "dualpipev", "microbatches": 4, "bubble": [0.1, 0.12]},
            {"schedule": "zero_bubble", "microbatches": 4, "bubble": [0.3, 0.3]}]
    checks = {c.term.split(",")[1].strip(): c for c in bubble_checks(rows)}
    assert checks["1f1b"].holds and checks["1f1b"].predicted_s == pytest.approx(one_f)
    inter = 1 / (2 * 4 + 1)  # v = 2
    assert checks["interleaved"].predicted_s == pytest.approx(inter)
    assert not checks["interleaved"].holds
    # DualPipe's formula is 0 at pp=2: the verdict is against 1F1B at the same M
    assert checks["dualpipev"].predicted_s == 0 and checks["dualpipev"].holds
    assert "< 1f1b" in checks["dualpipev"].tolerance
    b = bubble_fraction("zero-bubble", 2, 4)
    assert checks["zero_bubble"].predicted_s == pytest.approx(b / (1 + b))
    assert not checks["zero_bubble"].holds


def test_bubble_checks_charge_the_stages_the_trainer_built():
    """With each stage's predicted cost, the bubble is the schedule's for those stages, summed
    per rank as the trainer placed them: 1F1B with the LM head's stage 1.5x the first (ranks 2
    and 3 s per micro-batch, m=4: a 14 s step for 10 s of mean compute); ZB-V's rank 0 holds
    the first and the last stage."""
    rows = [{"schedule": "1f1b", "microbatches": 4, "bubble": [0.4, 0.17],
             "compute": [0.55, 0.8], "stage_blocks": [[0, 2], [2, 4]], "rank_stages": [[0], [1]]},
            {"schedule": "zero_bubble", "microbatches": 4, "bubble": [0.05, 0.2],
             "stage_blocks": [[0, 1], [1, 2], [2, 3], [3, 4]], "rank_stages": [[0, 3], [1, 2]]},
            {"schedule": "dualpipev", "microbatches": 4, "bubble": [0.05, 0.2],
             "stage_blocks": [[0, 1], [1, 2], [2, 3], [3, 4]], "rank_stages": [[0, 3], [1, 2]]}]
    costs = {"1f1b": [2.0, 3.0], "zero_bubble": [1.0, 1.0, 1.0, 2.0],
             "dualpipev": [1.0, 1.0, 1.0, 2.0]}
    checks = {c.term.split(",")[1].strip(): c
              for c in bubble_checks(rows, stage_costs=lambda r: costs[r["schedule"]])}
    assert checks["1f1b"].predicted_s == pytest.approx(0.4 / 1.4)
    assert "[2, 2]" in checks["1f1b"].note and "slowest / mean 1.20" in checks["1f1b"].note
    b = bubble_fraction("zero-bubble", 2, 4, 1, [3.0, 2.0])
    assert checks["zero_bubble"].predicted_s == pytest.approx(b / (1 + b))
    # DualPipe's formula is 0 at pp=2, the stage imbalance is not: a relative check now
    assert checks["dualpipev"].predicted_s == pytest.approx(0.2 / 1.2)
    assert checks["dualpipev"].tolerance == "+-25%"


def test_tp_collectives_count_and_bytes():
    """perf.tp_collectives: sequence parallelism turns each all-reduce into an all-gather and a
    reduce-scatter (twice the calls, the same bytes sent); the count grows by 8 per layer
    (+2 norm gradients) with it, by 4 per layer without; the ends (embedding, head input,
    cross-entropy) are there only for the device that runs them."""
    def sent(rows, g=2):
        return sum(c * sent_bytes(op, b, g) for op, b, c in rows)

    def calls(rows):
        return sum(c for _, _, c in rows)

    m, d = 1024, 256
    sp, plain = tp_collectives(m, d, 4, 2, 4.0), tp_collectives(m, d, 4, 2, 4.0, False)
    norms = 2 * 4 * 4.0 * d  # all-reduced (sent once at g = 2) fp32 norm gradients under sp
    assert sent(sp) == pytest.approx(sent(plain) + norms)
    assert calls(sp) == 8 * 4 + 2 * 4 and calls(plain) == 4 * 4
    assert calls(tp_collectives(m, d, 5, 2, 4.0)) - calls(sp) == 10
    ends = tp_collectives(m, d, 4, 2, 4.0, ends=1)
    assert calls(ends) - calls(sp) == 2 + 2 + 1 + 3
    assert tp_collectives(m, d, 4, 1, 4.0) == []
    by_group = [sent(tp_collectives(m, d, 4, g, 4.0), g) for g in (2, 4, 8)]
    assert by_group == sorted(by_group)  # more ranks: a larger share of each message sent


def test_perf_terms_are_what_step_time_charges():
    """The functions calibrate checks are the ones the projection sums: step_time's
    tensor-parallel term is tp_comm_seconds per micro-batch, and a measured link latency
    enters it once per collective."""
    cfg = model_config(load_parallel_sweep(PARALLEL_SWEEP), 4096)
    link = LinkFit(("all_reduce",), 0.0, 1e9, ())
    lay = Layout(tp=2, micro_batch=8, global_batch_tokens=2 * 8 * cfg.seq_len)
    acc = local_accelerator(50e9, 20e9, link)
    f = local_factors(0.2)
    st = step_time(cfg, cfg.seq_len, acc, 2, lay, "fp32", "none", f, peak_flops=50e9)
    per_mb = tp_comm_seconds(8 * cfg.seq_len, cfg.d_model, cfg.n_layer, 2, 1e9, 4.0, ends=1)
    norm = 8 / 1e9  # the gradient norm's all-reduce, once per step
    assert st.tp_comm == pytest.approx(2 * per_mb + norm)  # two micro-batches, fully exposed
    slow = local_accelerator(50e9, 20e9, LinkFit(("all_reduce",), 1e-3, 1e9, ()))
    st2 = step_time(cfg, cfg.seq_len, slow, 2, lay, "fp32", "none", f, peak_flops=50e9)
    # under sequence parallelism, per micro-batch: 8 per layer, 4 for the embedding and the
    # LM head's input, a norm gradient per layer norm (2 per layer and the final one), 3 of the
    # cross-entropy; and the gradient norm
    calls = 2 * (8 * cfg.n_layer + 4 + 2 * cfg.n_layer + 1 + 3) + 1
    assert st2.tp_comm - st.tp_comm == pytest.approx(calls * 1e-3)
    # catalog accelerators have no latency: the projection is unchanged by it
    assert not any("link_latency_us" in e for e in load_catalog().values())


def _synthetic_bench(cfg, pp_cfg, sweep, rate=40e9):
    """A harness result in which every matmul runs at exactly `rate`."""
    spec = harness_spec(sweep, cfg, pp_cfg)
    gemms = [{"m": m, "k": k, "n": n, "fwd_s": 2 * m * k * n / rate, "bwd_s": 4 * m * k * n / rate}
             for m, k, n in spec["gemms"]]
    sizes = {str(s): 1e-4 + s / 1e9 for s in sweep.sizes_bytes}
    return {"matmul_peak_flops": rate, "memory_bytes_per_s": 20e9, "gemms": gemms,
            "attention": {"fwd_s": 1e-3, "fwd_bwd_s": 3e-3}, "dispatch_s_per_op": 1e-5,
            "ops_per_step": {"forward": 300, "backward": 500, "optimizer": 10},
            "collectives": {op: sizes for op in OPS}, "dp_allreduce_s": 3e-3,
            "fsdp": {"all_gather_s": 5e-3, "reduce_scatter_s": 3e-3, "all_gathers": 9,
                     "reduce_scatters": 5},
            "cp": {"seconds": 4e-3, "chunk_bytes": 1, "collectives": 12},
            "elementwise": {"s_per_token_layer": 1e-6},
            "pp": {"model": vars(pp_cfg), "rows": [
                {"schedule": "1f1b", "microbatches": 4, "bubble": [0.2, 0.2],
                 "step_s": [0.3, 0.3]}]}}


def test_step_prediction_uses_the_rate_measured_at_the_layout_shapes():
    sweep = load_parallel_sweep(PARALLEL_QUICK)
    cfg, pp_cfg = model_config(sweep, 512), pipeline_config(sweep, 512)
    bench = _synthetic_bench(cfg, pp_cfg, sweep)
    m = sweep.micro_batch_size * sweep.seq_len
    for lay in (Layout(), Layout(tp=2)):
        assert layout_gemm_rate(cfg, m, lay, bench["gemms"]) == pytest.approx(40e9)
    with pytest.raises(ValueError, match="was not measured"):
        layout_gemm_rate(cfg, m + 1, Layout(), bench["gemms"])
    eff = attention_efficiency(cfg, sweep.micro_batch_size, bench["attention"], 40e9)
    assert 0 < eff < 1
    link = fit_link([(x, 1e-4 + x / 1e9) for x in (1e4, 1e6)])
    one = Layout(micro_batch=sweep.micro_batch_size, global_batch_tokens=m)
    total, parts = predict_step(cfg, one, bench, link)
    # memory-bound work at the profiled rate: 1 us per token and layer, plus the loss and Adam
    loss_adam = predict_step(cfg, one, bench, link)[1]["memory"] - m * cfg.n_layer * 1e-6
    assert 0 < loss_adam < parts["memory"]
    assert elementwise_bytes_per_dim(bench, cfg.d_model) == pytest.approx(
        1e-6 * 20e9 / cfg.d_model / 2)
    _, default = predict_step(cfg, one, bench, link, measured_elementwise=False)
    assert default["memory"] != pytest.approx(parts["memory"])
    # the measured attention time, once per layer, forward and backward
    assert parts["attention"] == pytest.approx(cfg.n_layer * 3e-3)
    # GEMMs: the model's matmul FLOPs (x3 for backward) at the rate, nothing else
    flops = sum(c * 6 * mm * k * n for mm, k, n, c in forward_gemms(cfg, m, Layout()))
    assert parts["gemm"] == pytest.approx(flops / 40e9)
    assert parts["host dispatch"] == pytest.approx(810 * 1e-5)
    assert total == pytest.approx(sum(v for k, v in parts.items()
                                      if k not in ("gemm_rate_flops", "attention_efficiency")))
    # a pipeline rank: half the forward and backward ops, once per micro-batch, no optimizer
    pp = Layout(pp=2, micro_batch=2, global_batch_tokens=4 * 2 * sweep.seq_len)
    assert host_ops(bench, pp, sweep.seq_len, optimizer=False) == pytest.approx(800 / 2 * 4)
    _, with_opt = predict_step(pp_cfg, pp, bench, link)
    _, without = predict_step(pp_cfg, pp, bench, link, optimizer=False)
    assert without["memory"] < with_opt["memory"]


def test_parallel_sweeps_load_and_refuse(tmp_path):
    for path in (PARALLEL_SWEEP, PARALLEL_QUICK):
        s = load_parallel_sweep(path)
        assert s.n_layer % 4 == 0 and len(s.sizes_bytes) >= 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(PARALLEL_QUICK.read_text().replace("n_layer: 4", "n_layer: 6"))
    with pytest.raises(ValueError, match="n_layer=6 must be a multiple of 4"):
        load_parallel_sweep(bad)
    bad.write_text(PARALLEL_QUICK.read_text().replace("[1f1b, zero_bubble]", "[1f1b, chimera]"))
    with pytest.raises(ValueError, match="chimera"):
        load_parallel_sweep(bad)
    bad.write_text(PARALLEL_QUICK.read_text() + "bogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_parallel_sweep(bad)


def test_report_record_and_checked_terms(tmp_path):
    sweep = load_parallel_sweep(PARALLEL_QUICK)
    cfg, pp_cfg = model_config(sweep, 512), pipeline_config(sweep, 512)
    bench = _synthetic_bench(cfg, pp_cfg, sweep)
    links = {"all_reduce": fit_link([(1e4, 1e-4), (1e6, 1e-3)], ("all_reduce",))}
    terms = [relative_check("tensor-parallel all-reduces", 1e-2, 1.1e-2),
             TermCheck("pipeline bubble, dualpipev", 0.0, 0.1, "< 1f1b's 0.2", True)]
    steps = [StepCheck("1 process", "python -m train", 0.1, 0.12,
                       {"gemm": 0.08, "gemm_rate_flops": 4e10, "attention_efficiency": 0.2,
                        "host dispatch": 0.0})]
    machine = {"cpu": "test cpu", "logical_cores": 2, "torch": "x"}
    cal = ParallelCalibration(sweep, machine, bench, links, terms, steps, 60.0)
    text = cal.text()
    assert "tensor-parallel all-reduces" in text and "holds (+-25%)" in text
    assert "-17%" in text  # the step's error
    md = cal.markdown("python -m estimate calibrate --parallel")
    assert md.startswith("# Parallel terms") and "| 1 process |" in md
    out = publish_parallel(cal, "cmd", tmp_path)
    assert out.name.startswith("calibration-parallel-") and out.read_text() == cal.markdown("cmd")
    (tmp_path / "parallel_calibration.json").write_text(json.dumps(cal.record(), default=str))
    checked = read_checked_terms(tmp_path)
    assert checked.terms[0] == ("tensor-parallel all-reduces", "holds (+-25%)")
    assert "test cpu" in checked.hardware and "1 of 2 hold" not in checked.lines()[0]
    assert "2 of 2 hold" in checked.lines()[0]
    assert read_checked_terms(tmp_path / "nothing") is None
    (tmp_path / "parallel_calibration.json").write_text('{"kind": "projection"}')
    with pytest.raises(ValueError, match="no parallel calibration record"):
        read_checked_terms(tmp_path)


@pytest.mark.slow
def test_parallel_calibration_end_to_end(tiny_data, tmp_path):
    """calibrate --parallel --quick on the tiny data: every term and layout predicted and
    measured (values positive; verdicts are whatever this machine gives), and project
    --from-calibration names them."""
    out = tmp_path / "cal"
    run_cmd([sys.executable, "-m", "estimate", "calibrate", "--parallel", "--quick",
             "--data", str(tiny_data), "--out", str(out)], timeout=600)
    r = json.loads((out / "parallel_calibration.json").read_text())
    terms = [t["term"] for t in r["terms"]]
    for word in ("data-parallel", "FSDP", "tensor-parallel", "context-parallel",
                 "bubble, 1f1b", "bubble, zero_bubble"):
        assert any(word in t for t in terms), (word, terms)
    assert all(t["predicted_s"] >= 0 and t["measured_s"] > 0 for t in r["terms"])
    # the performance model counts the collectives the trainer's tp=2 step issues
    counts = [t["counts"] for t in r["terms"] if t["term"].startswith("tensor-parallel")][0]
    assert counts["issued"] == counts["charged"] > 0, counts
    layouts = [s["layout"] for s in r["steps"]]
    assert layouts == ["1 process", "DDP, 2 processes", "FSDP, 2 processes", "tp=2",
                       "pp=2 1f1b M=4"]
    assert all(s["predicted_s"] > 0 and s["measured_s"] > 0 for s in r["steps"])
    assert set(r["links"]) >= {*OPS, TRAINER_RS}  # the trainer's reduce-scatter, fitted apart
    for op in (*OPS, TRAINER_RS):  # measured here: a 256x larger message takes longer; the
        # fit has a latency (>= 0) and a bandwidth (> 0), so its time grows with the message
        times = {int(b): t for b, t in r["harness"]["collectives"][op].items()}
        assert times[max(times)] > times[min(times)], (op, times)
        assert r["links"][op]["latency_s"] >= 0 and r["links"][op]["bytes_per_s"] > 0
    assert "## Step time" in (out / "report.md").read_text()
    proj = run_cmd([sys.executable, "-m", "estimate", "project", "--params", "1B", "--tokens",
                    "1B", "--accelerator", "H100-SXM5-80GB", "--count", "8",
                    "--from-calibration", str(out)])
    assert "parallel terms checked on" in proj.stdout and "gloo" in proj.stdout


def test_term_checks_predict_from_each_collectives_own_link():
    """Collectives on exact lines: the DP term is one all-reduce of the gradients over the
    all-reduce's link; FSDP and CP mix the all-gather's link (2/3) and the reduce-scatter's
    (1/3); a measurement 40% off the prediction does not hold."""
    sweep = load_parallel_sweep(PARALLEL_QUICK)
    cfg, pp_cfg = model_config(sweep, 512), pipeline_config(sweep, 512)
    bench = _synthetic_bench(cfg, pp_cfg, sweep)
    lines = {"all_reduce": (1e-4, 2e9), "all_gather": (2e-4, 1e9), "reduce_scatter": (3e-4, 5e8),
             "send_recv": (5e-5, 3e9)}
    bench["collectives"] = {op: {str(b): a + sent_bytes(op, b, 2) / beta for b in sweep.sizes_bytes}
                            for op, (a, beta) in lines.items()}
    links = {op: fit_link(link_points(bench["collectives"], (op,)), (op,)) for op in OPS}
    assert links["reduce_scatter"].bytes_per_s == pytest.approx(5e8)
    params = count_params(cfg)
    grads = params * 4.0
    bench["dp_allreduce_s"] = 1e-4 + grads / 2e9  # one bucket, 2(g-1)/g = 1 of it sent
    units = cfg.n_layer + 1
    fsdp = (2 / 3) * (1.5 * grads / 1e9 + 3 * units * 2e-4) + (1 / 3) * (
        1.5 * grads / 5e8 + 3 * units * 3e-4)
    bench["fsdp"]["all_gather_s"], bench["fsdp"]["reduce_scatter_s"] = fsdp * 1.4, 0.0
    cp_run = TrainerRun(0.1, 0.0, cp_comm_s=0.01)
    checks = {c.term.split(" ")[0]: c for c in term_checks(bench, cfg, sweep.micro_batch_size,
                                                           links, TrainerRun(0.1, 0.0, 0.02, 1),
                                                           cp_run)}
    assert checks["data-parallel"].predicted_s == pytest.approx(bench["dp_allreduce_s"])
    assert checks["data-parallel"].holds
    assert checks["FSDP"].predicted_s == pytest.approx(fsdp)
    assert not checks["FSDP"].holds
    # tensor parallel (sequence parallel), each collective over its own line: per layer 4
    # all-gathers and 4 reduce-scatters of the activations (half of each sent) and 2 norm
    # gradients; the embedding and the head's input 2 more of each, the final norm, 3
    # cross-entropy all-reduces of a value per token, the gradient norm
    L, d, m = cfg.n_layer, cfg.d_model, sweep.micro_batch_size * cfg.seq_len
    msg = m * d * 4.0
    (a_ar, b_ar), (a_ag, b_ag), (a_rs, b_rs) = (lines[k] for k in ("all_reduce", "all_gather",
                                                                   "reduce_scatter"))
    tp = ((4 * L + 2) * (a_ag + msg / 2 / b_ag + a_rs + msg / 2 / b_rs)
          + (2 * L + 1) * (a_ar + 4 * d / b_ar) + 3 * (a_ar + 4 * m / b_ar) + a_ar + 8 / b_ar)
    assert checks["tensor-parallel"].predicted_s == pytest.approx(tp)
    assert f"1 issued per step, {10 * L + 9} charged" in checks["tensor-parallel"].note
    # context parallel as the trainer runs it: per layer an all-gather of the whole
    # sequence's keys and values, a reduce-scatter of their gradients (half of each sent)
    kv = m * 2 * cfg.n_kv_head * cfg.head_dim * 4.0
    cp = L * (a_ag + kv / 2 / b_ag + a_rs + kv / 2 / b_rs)
    assert checks["context-parallel"].predicted_s == pytest.approx(cp)
    assert checks["context-parallel"].measured_s == 0.01


def test_machine_share_stretches_only_runs_that_lacked_cores():
    assert machine_share(2, 2, 0.0) == 1.0
    assert machine_share(1, 2, 0.9) == 1.0  # one process, 1.1 cores left
    assert machine_share(2, 2, 0.73) == pytest.approx(2 / 1.27)
    assert machine_share(2, None, 0.5) == 1.0 and machine_share(2, 2, None) == 1.0
    step = StepCheck("DDP", "x", 0.3, 0.5, {}, share=1.5)
    assert step.error == pytest.approx(-0.4) and step.shared_error == pytest.approx(-0.1)
    assert step.holds
