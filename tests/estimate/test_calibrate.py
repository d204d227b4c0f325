import datetime
import json
import sys

import numpy as np
import pytest

from contracts.run import RunSummary
from estimate.calibrate.checks import assumption_checks
from estimate.calibrate.report import Calibration, publish
from estimate.calibrate.sweep import (
    DEFAULT_SWEEP,
    QUICK_SWEEP,
    Measured,
    RunSpec,
    Shape,
    load_sweep,
    plan,
)
from estimate.throughput_fit import (
    attention_share_from_times,
    fit_step_time,
    loglog_slope,
    within,
)
from model.flops import model_flops_per_token
from tests.utils import run_cmd


def test_fit_recovers_exact_line():
    a, b = 0.012, 1 / 80e9  # 12 ms per step, 80 GFLOP/s
    flops = [1e9, 3e9, 7e9, 2e10, 5e10]
    fit = fit_step_time(flops, [a + b * f for f in flops])
    assert fit.a_s == pytest.approx(a, rel=1e-9)
    assert fit.b_s_per_flop == pytest.approx(b, rel=1e-9)
    assert fit.asymptotic_flops_per_s == pytest.approx(80e9, rel=1e-9)
    assert max(abs(r) for r in fit.residuals) < 1e-9
    assert fit.predict(1e11) == pytest.approx(a + b * 1e11, rel=1e-9)


def test_fit_residuals_are_relative_throughput_errors():
    fit = fit_step_time([1e9, 2e9, 4e9], [0.02, 0.05, 0.06])  # not on a line
    for f, t, r in zip(fit.flops, fit.step_s, fit.residuals, strict=True):
        assert r == pytest.approx(t / fit.predict(f) - 1)  # (pred - meas) / meas tokens/s
    assert fit.rms_residual == pytest.approx(np.sqrt(np.mean(np.square(fit.residuals))))
    assert fit.to_dict()["points"][0]["residual"] == fit.residuals[0]


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="two different FLOP counts"):
        fit_step_time([1e9, 1e9], [0.1, 0.2])
    with pytest.raises(ValueError, match="does not grow with FLOPs"):
        fit_step_time([1e9, 2e9, 3e9], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="positive"):
        fit_step_time([1e9, 2e9], [0.1, 0.0])


def test_loglog_slope_and_attention_share():
    x = np.array([1.0, 2.0, 5.0, 10.0])
    assert loglog_slope(x, 3 * x) == pytest.approx(1.0)
    assert loglog_slope(x, x**0.7) == pytest.approx(0.7)
    # t(T) = t0 + c T at fixed tokens: the share at T1 is c T1 / t(T1)
    t0, c = 0.1, 1e-4
    share = attention_share_from_times(t0 + c * 128, t0 + c * 1024, 128, 1024)
    assert share == pytest.approx(c * 1024 / (t0 + c * 1024))
    assert within(1.09, 1.0, 0.1) and not within(1.11, 1.0, 0.1)


def test_sweeps_load_and_plan():
    for path in (DEFAULT_SWEEP, QUICK_SWEEP):
        sweep = load_sweep(path)
        runs, held = plan(sweep)
        roles = [r.role for r in runs]
        assert roles.count("fit") == len(sweep.fit)
        assert {"long_seq", "recompute", "bf16", "dp"} <= set(roles)
        # the held-out shape is larger than every fit shape
        vocab = 4096
        fit_flops = [r.hardware_flops_per_step(sweep, vocab) for r in runs if r.role == "fit"]
        assert held.hardware_flops_per_step(sweep, vocab) > max(fit_flops)
        # the long-sequence check keeps the tokens per step
        long = next(r for r in runs if r.role == "long_seq")
        assert long.tokens_per_step() == sweep.seq_len * sweep.micro_batch_size
        assert "model.preset=" + sweep.model["preset"] in long.overrides(sweep, "d")
    assert load_sweep(DEFAULT_SWEEP, steps=30, nproc=3).nproc == 3


def test_sweep_refusals(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit: [{n_layer: 2, d_model: 64}]\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_sweep(bad)
    bad.write_text("fit: [{n_layer: 2, d_model: 64}, {n_layer: 4, d_model: 64}]\n"
                   "reference: {n_layer: 3, d_model: 64}\n")
    with pytest.raises(ValueError, match="reference"):
        load_sweep(bad)
    with pytest.raises(ValueError, match="steps"):
        load_sweep(QUICK_SWEEP, steps=3)


def _measured(spec: RunSpec, step_s: float, model_flops: float, hw_flops: float,
              peak: float = 1e11) -> Measured:
    m = Measured(spec, 1_000_000, model_flops, hw_flops, [], 0.0, 0.0, [], [], [], [], 0.0)
    m.add(RunSummary("run", {"step_s": {"median": step_s, "p10": step_s, "p90": step_s},
                             "tokens_per_s": {"median": spec.tokens_per_step() / step_s},
                             "mfu": {"median": 0.3}, "peak_flops_per_process": {"median": peak}}),
          "run", 1.0)
    return m


def test_assumption_checks_on_synthetic_runs():
    """Numbers built so that every published expectation holds exactly (bf16 2x, +33%
    recomputation, DP 95%, time proportional to FLOPs): every verdict must say so."""
    sweep = load_sweep(DEFAULT_SWEEP)
    runs, _ = plan(sweep)
    vocab, rate = 4096, 1e11
    m = {}
    for spec in runs:
        cfg = spec.model_config(sweep, vocab)
        mf = model_flops_per_token(cfg, spec.seq_len)
        hw = mf * (4 / 3 if spec.recompute == "full" else 1.0)
        step = hw * spec.micro_batch_size * spec.seq_len / rate
        if spec.role == "bf16":
            step /= 2
        if spec.role == "dp":
            step /= 0.95
        m[spec.name] = _measured(spec, step, mf, hw)
    checks = assumption_checks(m, sweep, {"bf16_units": ["amx_bf16"], "logical_cores": 8})
    assert len(checks) == 6
    by = {c.assumption.split(" ")[0]: c for c in checks}
    assert all(c.holds for c in checks if not c.assumption.startswith("time per token")), \
        [(c.assumption, c.measured) for c in checks if not c.holds]
    # time proportional to FLOPs, not N: the slope is near 1 (attention adds a little, the
    # SwiGLU width rounding of each size can take a little), within the check's 0.15
    assert by["time"].holds and 0.95 <= by["time"].values["slope"] < 1.15
    assert checks[3].values["share"] == pytest.approx(checks[3].values["expected_share"])
    assert by["data-parallel"].values["efficiency"] == pytest.approx(0.95)
    assert "holds (" in by["bf16"].verdict


@pytest.fixture(scope="module")
def quick_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate")
    result = run_cmd([sys.executable, "-m", "estimate", "calibrate", "--quick",
                      "--data", str(tiny_data), "--out", str(out)], timeout=300)
    return out, result.stdout


@pytest.mark.slow
def test_quick_calibrate_end_to_end(quick_run):
    """A real sweep of tiny runs: tables printed, files written, the held-out run predicted."""
    out, stdout = quick_run
    for text in ("| assumption | published expectation | measured | verdict (tolerance) |",
                 "fit: step_s =", "held out", "bf16 units"):
        assert text in stdout
    record = json.loads((out / "calibration.json").read_text())
    assert record["kind"] == "calibration" and record["format"] == 2
    assert len(record["checks"]) == 6
    assert all(c["tolerance"] and isinstance(c["holds"], bool) for c in record["checks"])
    held = record["held_out"]
    assert held["predicted_tokens_per_s"] > 0 and held["measured_tokens_per_s"] > 0
    assert held["error"] == pytest.approx(
        held["predicted_tokens_per_s"] / held["measured_tokens_per_s"] - 1)
    assert len(record["fit"]["points"]) == 3 and record["fit"]["b_s_per_flop"] > 0
    roles = {r["role"] for r in record["runs"]}
    assert roles == {"fit", "long_seq", "recompute", "bf16", "dp", "held_out"}
    dp = next(r for r in record["runs"] if r["role"] == "dp")
    assert json.loads((out / "runs" / f"dp_{dp['name']}_r0" / "summary.json")
                      .read_text())["world_size"] == 2
    report = (out / "report.md").read_text()
    assert "![throughput vs size](throughput_vs_size.png)" in report
    for png in ("throughput_vs_size.png", "measured_vs_predicted.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_project_from_quick_calibration(quick_run, capsys):
    """The real sweep's calibration.json feeds `project --from-calibration`: the target, like
    the published runs the stack efficiency is fitted on, is far larger than any calibrated
    size, so the factor is 1 (the projection is unchanged), and the output says so: the
    factor, its source, the extrapolation and what transfers from this CPU; a target inside
    the calibrated sizes gets a factor below 1 (more hours)."""
    from estimate.__main__ import main

    out, _ = quick_run
    base = ["project", "--model", "llama2-70b", "--tokens", "2T", "-a", "A100-SXM4-80GB",
            "-n", "2048"]
    assert main([*base, "--out", str(out / "plain")]) == 0
    assert main([*base, "--from-calibration", str(out), "--out", str(out / "prior")]) == 0
    text = capsys.readouterr().out
    plain, prior = (json.loads((out / d / "projection.json").read_text()) for d in ("plain", "prior"))
    factor = prior["calibration_prior"]["factor"]
    assert prior["calibration_prior"]["device"] == "cpu" and factor == 1.0
    assert (prior["outcomes"]["central"]["accelerator_hours"]
            == plain["outcomes"]["central"]["accelerator_hours"])
    assert f"stack efficiency x{factor:.3f}" in text and f"source: {out}" in text
    assert "extrapolation:" in text and "Does not transfer: kernels" in text
    shape = out / "small.yaml"  # the sweep's smallest shape: inside the calibrated sizes
    shape.write_text("n_layer: 1\nd_model: 64\nn_head: 2\nseq_len: 64\nvocab_size: 512\n")
    small = ["project", "--model", str(shape), "--tokens", "1B", "-a", "A100-SXM4-80GB", "-n", "1"]
    assert main([*small, "--from-calibration", str(out), "--out", str(out / "small")]) == 0
    inside = json.loads((out / "small" / "projection.json").read_text())["calibration_prior"]
    assert inside["factor"] < 1


def test_calibrate_without_data_names_the_prep_command(tmp_path):
    result = run_cmd([sys.executable, "-m", "estimate", "calibrate", "--quick",
                      "--data", str(tmp_path / "missing")], check=False)
    assert result.returncode == 2
    assert "python -m data_prep configs/prep/demo.yaml" in result.stderr.replace(sys.executable, "python")


def test_shape_label():
    assert Shape(4, 256).label == "L4 d256"


def _fake_calibration() -> Calibration:
    """A Calibration of synthetic runs (time proportional to FLOPs plus 10 ms): no training."""
    sweep = load_sweep(QUICK_SWEEP)
    runs, held_spec = plan(sweep)
    m = {}
    for spec in [*runs, held_spec]:
        mf = model_flops_per_token(spec.model_config(sweep, 512), spec.seq_len)
        hw = mf * (4 / 3 if spec.recompute == "full" else 1.0)
        m[spec.name] = _measured(spec, 0.01 + hw * spec.micro_batch_size * spec.seq_len / 1e10,
                                 mf, hw)
    fit_runs = [x for x in m.values() if x.spec.role == "fit"]
    fit = fit_step_time([x.hardware_flops_per_step for x in fit_runs], [x.step_s for x in fit_runs])
    machine = {"cpu": "a test CPU", "logical_cores": 2, "torch": "0", "bf16_units": []}
    held = m[held_spec.name]
    return Calibration(sweep, machine, list(m.values()), fit,
                       assumption_checks(m, sweep, machine), held,
                       fit.predict(held.hardware_flops_per_step), 60.0, ([0.5] * 3, [0.5] * 3))


def test_report_is_headed_and_published(tmp_path):
    cal = _fake_calibration()
    command = "python -m estimate calibrate --quick --publish"
    md = cal.markdown({}, command)
    assert md.startswith("# Throughput calibration\n\n- date: ")
    assert f"- command: `{command}`" in md and "- torch " in md
    assert "| assumption | published expectation |" in md and "![" not in md
    path = publish(cal, command, tmp_path)
    assert path == tmp_path / f"calibration-{datetime.date.today().isoformat()}.md"
    assert path.read_text() == md
    assert abs(cal.held_out_error) < 1e-9  # the fake runs lie exactly on the fitted line
    assert "held out" in cal.text() and json.loads(json.dumps(cal.record()))["format"] == 2
