"""The layout planner, the memory model and the one code path of issue 19."""

import pytest

from estimate import crossval
from estimate.__main__ import main
from estimate.assumptions import build_assumptions, load_defaults
from estimate.engine import estimate_run
from estimate.hardware import get_accelerator
from estimate.memory import memory_per_device, usable_bytes
from estimate.perf import Layout, load_factors
from estimate.planner import DoesNotFit, plan
from estimate.probe import context_probe, count_probe
from estimate.project import project
from estimate.published import UNIT, fit, is_planned, load_runs, model_run, published_setup
from estimate.shapes import shape_from_size
from estimate.target import resolve_target
from model.config import get_preset
from model.flops import count_params

H100 = get_accelerator("H100-SXM5-80GB")
A100_40 = get_accelerator("A100-SXM4-40GB")


def factors():
    return load_factors(load_defaults(), UNIT)


def test_days_never_rise_with_the_count():
    """Issue 19: a 7B shape on 32,768 H100 took longer than on 8,192 under the fixed rule."""
    rows = count_probe(counts=(64, 512, 8192, 32768))
    days = [r["days"] for r in rows]
    assert all(b <= a for a, b in zip(days, days[1:], strict=False)), days
    assert days[-1] < days[0] / 50  # and the larger counts do help


def test_long_context_costs_no_more_than_its_flops_allow():
    """Issue 19: 4K -> 128K cost 38x the hours for 5.3x the FLOPs (pipeline bubble)."""
    c = context_probe()
    assert c["hours_ratio"] <= 1.5 * c["flops_ratio"]
    assert c[131072]["estimate"].layout.cp > 1  # context parallelism, not more stages


@pytest.mark.parametrize("argv, params", [
    (["--params", "405B", "-a", "A100-SXM4-40GB", "-n", "1"], "40"),
    (["--params", "7B", "-a", "A100-SXM4-40GB", "-n", "1"], "40"),
    (["--params", "405B", "-a", "H100-SXM5-80GB", "-n", "8", "--tp", "8"], "80"),  # given layout
])
def test_what_fits_nowhere_is_refused_in_one_line(argv, params, capsys):
    assert main(["project", *argv, "-t", "1T"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: does not fit") and err.count("\n") == 1
    assert "GB per device" in err and f"of {params} GB" in err


def test_project_equals_validate_on_llama31_405b():
    """Issue 19: project said 40.0M hours, validate 35.8M, for the same run. Both now call
    engine.estimate_run with the same fit (published.fit: crossval's stack efficiency and
    per-basis factors on all runs): project's training-time hours x the fitted unknown-basis
    factor equal validate's all-runs-fit prediction of the run (its model-card hours are of
    basis unknown), and project's wall-clock figure is its training time / the wall-clock
    factor."""
    run = next(r for r in load_runs() if r["name"] == "Llama 3.1 405B")
    assert run["hours_basis"] == "unknown" and not is_planned(run)
    d = load_defaults()
    f = fit()
    validated = model_run(run, load_factors(d, f.stack), fit=f)
    setup = published_setup("llama3-405b")
    target = resolve_target("llama3-405b")
    a = build_assumptions(target, H100, setup["count"], "bf16", None, layout=setup["layout"],
                          tokens=run["tokens"])
    p = project(target, run["tokens"], H100, setup["count"], a, "bf16",
                a.performance.recompute)
    training = p.central.accelerator_hours * p.central.goodput
    assert training / f.basis["unknown"].central == pytest.approx(validated.hours, rel=1e-9)
    assert p.central.goodput == f.basis["wallclock"].central
    assert p.central.accelerator_hours == pytest.approx(training / f.basis["wallclock"].central)
    # and crossval's all-runs fit predicts the same hours from its once-computed point
    point = next(q for q in crossval.points() if q.name == run["name"])
    assert crossval.fitted().predict(point) == pytest.approx(validated.hours, rel=1e-9)
    assert a.performance.layout.tp == 8 and a.performance.layout.pp == 16  # as published


def test_size_goes_through_the_performance_model():
    """Issue 19: --params was a constant 0.36 MFU, blind to count and sequence length."""
    t = resolve_target(params=7e9)
    mfu = {n: build_assumptions(t, H100, n, tokens=2e12).mfu.central for n in (8, 8192)}
    assert mfu[8] != pytest.approx(mfu[8192], rel=0.02)
    long = resolve_target(params=7e9, seq_len=32768)
    a = build_assumptions(t, H100, 512, tokens=2e12)
    b = build_assumptions(long, H100, 512, tokens=2e12)
    assert a.performance.steps["central"].total != pytest.approx(
        b.performance.steps["central"].total, rel=0.02)


CASES = [
    (shape_from_size(7e9), 8, A100_40),
    (shape_from_size(70e9), 64, H100),
    (shape_from_size(7e9, seq_len=131072), 256, H100),
    (get_preset("llama3-405b"), 2048, H100),
    (get_preset("deepseek-v3"), 2048, get_accelerator("H800-SXM5-80GB")),
]


@pytest.mark.parametrize("cfg, n, acc", CASES)
def test_planner_never_returns_a_layout_exceeding_memory(cfg, n, acc):
    p = plan(cfg, cfg.seq_len, acc, n, "bf16", factors(), tokens=1e12)
    cap = usable_bytes(acc.get("memory_gb"))
    for c in (p.best, p.runner_up):
        if c is None:
            continue
        assert c.layout.devices <= n
        again = memory_per_device(cfg, cfg.seq_len, c.layout, c.recompute)
        assert again.total == pytest.approx(c.memory.total) and again.total <= cap
    assert p.best.step.total <= p.runner_up.step.total * (1 + 0.02) or \
        p.best.layout.global_batch_tokens != p.runner_up.layout.global_batch_tokens
    assert p.best.seconds_per_token <= p.runner_up.seconds_per_token * 1.02
    assert any(line.startswith("chosen:") for line in p.lines())


def test_memory_of_model_states_by_hand():
    """ZeRO (Rajbhandari et al. 2020): 2 + 2 + 12 bytes per parameter, sharded by stage."""
    cfg = shape_from_size(7e9)
    P = count_params(cfg)
    for zero, expect in ((0, 16 * P), (1, 4 * P + 12 * P / 8), (2, 2 * P + 14 * P / 8),
                         (3, 16 * P / 8)):
        m = memory_per_device(cfg, 4096, Layout(dp=8, zero=zero, global_batch_tokens=8 * 4096),
                              "none")
        assert m.weights + m.grads + m.optimizer == pytest.approx(expect)
    lean = memory_per_device(cfg, 4096, Layout(global_batch_tokens=4096), "full")
    fat = memory_per_device(cfg, 4096, Layout(global_batch_tokens=4096), "none")
    assert lean.activations < fat.activations / 5


def test_a_published_layout_holds_at_its_published_count_only(capsys):
    """Issue 19: -n 8192 was an error and -n 24576 left 8,192 GPUs idle."""
    base = ["project", "--model", "llama3-405b", "-t", "15.6T", "-a", "H100-SXM5-80GB"]
    assert main([*base, "-n", "8192"]) == 0
    assert "published layout not used" in capsys.readouterr().out
    d, f = load_defaults(), factors()
    cfg = get_preset("llama3-405b")
    at = {n: estimate_run(cfg, cfg.seq_len, 15.6e12, H100, n, "bf16", f, d,
                          given={"global_batch_tokens": 16e6}) for n in (16384, 24576)}
    assert at[24576].compute_seconds() <= at[16384].compute_seconds()
    assert at[24576].layout.devices > 16384


def test_refusal_names_the_leanest_layout():
    with pytest.raises(DoesNotFit, match=r"need at least [\d.]+ GB per device .* against 36 GB"):
        plan(shape_from_size(405e9), 4096, A100_40, 1, "bf16", factors())


def test_choose_count_is_the_fewest_that_trains_in_time():
    """The bisection of engine.choose_count finds what a scan of every power of two finds."""
    from estimate.engine import choose_count

    d, f = load_defaults(), factors()
    cfg = shape_from_size(7e9)
    days = d["performance"]["default_run_days"]["value"]
    chosen = choose_count(cfg, cfg.seq_len, 2e12, H100, "bf16", f, d)
    scan = []
    for i in range(17):
        try:
            e = estimate_run(cfg, cfg.seq_len, 2e12, H100, 2 ** i, "bf16", f, d)
        except DoesNotFit:
            continue
        scan.append((2 ** i, e.wallclock_hours() / 2 ** i / 24))
    assert chosen.count == min(n for n, t in scan if t <= days)


def test_a_published_layout_is_kept_with_a_note_where_the_memory_model_disagrees():
    """DeepSeek-V3's published layout ran; the memory model (no FP8 activation caching, no
    recomputation of norms and up-projections) finds it too large: kept, and said so."""
    run = next(r for r in load_runs() if r["name"] == "DeepSeek-V3")
    m = model_run(run, factors())
    assert (m.layout.tp, m.layout.pp, m.layout.ep) == (1, 16, 64)
    cfg = get_preset("deepseek-v3")
    p = plan(cfg, cfg.seq_len, get_accelerator("H800-SXM5-80GB"), 2048, "fp8", factors(),
             given={"tp": 1, "pp": 16, "ep": 64, "schedule": "dualpipe"}, recompute="selective",
             batch=62.9e6, trust_given=True)
    assert any("taken as given" in line for line in p.lines())
