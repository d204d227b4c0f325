"""`project --from-calibration DIR`: a calibration.json written by calibrate's own writer
(Calibration.record + write_outputs) from given step times, read back, turned into the prior on
the stack efficiency, and applied by the command. The real sweep's output is tested the same
way in test_calibrate.py (slow)."""

import json

import pytest
import yaml

from contracts.run import RunSummary
from estimate.__main__ import main
from estimate.assumptions import build_assumptions
from estimate.calibrate.checks import assumption_checks
from estimate.calibrate.prior import read_calibration, size_prior
from estimate.calibrate.report import Calibration
from estimate.calibrate.sweep import QUICK_SWEEP, Measured, load_sweep, plan
from estimate.hardware import get_accelerator
from estimate.perf import Factor
from estimate.report import write_outputs
from estimate.target import resolve_target
from estimate.throughput_fit import fit_step_time
from model.config import ModelConfig
from model.flops import hardware_flops_per_token, model_flops_per_token

A_S, FLOP_S = 0.004, 5e10  # the given machine: 4 ms per step + F / 50 GFLOP/s
VOCAB = 512
PROJECT = ["project", "--model", "llama2-70b", "--tokens", "2T", "-a", "A100-SXM4-80GB",
           "-n", "2048"]


def _measured(spec, sweep, device: str | None) -> Measured:
    cfg = spec.model_config(sweep, VOCAB)
    mf = model_flops_per_token(cfg, spec.seq_len)
    hw = hardware_flops_per_token(cfg, spec.seq_len, spec.recompute)
    step = A_S + hw * spec.micro_batch_size * spec.seq_len / FLOP_S
    m = Measured(spec, 1_000_000, mf, hw, [], 0.0, 0.0, [], [], [], [], 0.0)
    raw = {"step_s": {"median": step, "p10": step, "p90": step},
           "tokens_per_s": {"median": spec.tokens_per_step() / step}, "mfu": {"median": 0.3},
           "peak_flops_per_process": {"median": 1e11}}
    if device:
        raw["device"] = device
    m.add(RunSummary("run", raw), "run", 1.0)
    return m


def write_calibration(out, device: str | None = "cpu", held_out_error: float = 0.0) -> dict:
    """calibration.json as `calibrate --out` writes it, for runs that take A_S + F / FLOP_S;
    the held-out run is made `held_out_error` off the fit (throughput)."""
    sweep = load_sweep(QUICK_SWEEP)
    runs, held_spec = plan(sweep)
    m = {s.name: _measured(s, sweep, device) for s in [*runs, held_spec]}
    fit_runs = [x for x in m.values() if x.spec.role == "fit"]
    fit = fit_step_time([x.hardware_flops_per_step for x in fit_runs], [x.step_s for x in fit_runs])
    held = m[held_spec.name]
    predicted = fit.predict(held.hardware_flops_per_step)
    held.step_s_rounds = [predicted * (1 + held_out_error)]
    machine = {"cpu": "a test CPU", "logical_cores": 2, "torch": "0", "bf16_units": []}
    cal = Calibration(sweep, machine, list(m.values()), fit, assumption_checks(m, sweep, machine),
                      held, predicted, 60.0, ([0.5] * 3, [0.5] * 3))
    record = cal.record()
    write_outputs(out, cal.markdown({}), record)
    return record


@pytest.fixture
def cal_dir(tmp_path):
    write_calibration(tmp_path / "cal")
    return tmp_path / "cal"


def eff(flops_per_token: float, tokens: float) -> float:
    f = flops_per_token * tokens
    return (f / FLOP_S) / (A_S + f / FLOP_S)


def test_reader_recovers_the_given_machine(cal_dir):
    r = read_calibration(cal_dir)
    assert r.format == 2 and r.device == "cpu" and r.on_cpu
    assert r.a_s == pytest.approx(A_S, rel=1e-6) and 1 / r.b_s_per_flop == pytest.approx(FLOP_S, rel=1e-6)
    assert r.tokens_per_step == 4 * 64  # the quick sweep: micro-batch 4 x 64 tokens, 1 process
    assert [s.label for s in r.fit] == ["L1 d64", "L2 d128", "L2 d256"]
    assert r.reference.label == "L2 d128" and r.held_out.label == "L3 d320"
    assert r.held_out_error == pytest.approx(0.0, abs=1e-9)
    assert r.supported()[1].label == "L3 d320"  # predicted within tolerance: supported
    assert read_calibration(cal_dir / "calibration.json") == r  # the file itself also reads
    assert "L1 d64" in r.describe() and str(cal_dir) in r.describe()


def test_factor_is_the_efficiency_ratio_clipped_to_the_supported_sizes(cal_dir, tmp_path):
    r = read_calibration(cal_dir)
    t, ref = r.tokens_per_step, r.reference.flops_per_token
    lo, hi = (s.flops_per_token for s in r.supported())
    inside = size_prior(r, 6e6, "X")  # between the reference and the largest size
    assert inside.factor == pytest.approx(eff(6e6, t) / eff(ref, t), rel=1e-6)
    assert inside.factor > 1 and inside.outside is None
    assert inside.low == pytest.approx(1 - r.rms_residual) and inside.high >= inside.factor
    big = size_prior(r, 1e12, "X")  # far beyond: held at the largest size, and said so
    assert big.factor == pytest.approx(eff(hi, t) / eff(ref, t), rel=1e-6)
    assert big.outside.startswith("extrapolation:") and f"{1e12 / hi:.3g}x" in big.outside
    small = size_prior(r, lo / 10, "X")  # below: held at the smallest
    assert small.factor == pytest.approx(eff(lo, t) / eff(ref, t), rel=1e-6) and small.factor < 1
    assert "below the smallest" in small.outside
    assert size_prior(r, ref, "X").factor == pytest.approx(1.0)
    stack = Factor("stack_efficiency", 0.7, 0.6, 0.8, "high", "fitted")
    scaled = inside.apply(stack)
    assert scaled.central == pytest.approx(0.7 * inside.factor)
    assert scaled.low <= scaled.central <= scaled.high <= 1.0 and "calibration prior" in scaled.source
    assert big.apply(Factor("stack_efficiency", 0.95, 0.9, 0.99, "high", "")).high == 1.0
    # a held-out run the fit missed by more than the tolerance does not widen the support
    write_calibration(tmp_path / "missed", held_out_error=0.5)
    assert read_calibration(tmp_path / "missed").supported()[1].label == "L2 d256"


def test_what_transfers_is_said(cal_dir, tmp_path):
    cpu = size_prior(read_calibration(cal_dir), 1e12, "H100-SXM5-80GB")
    text = " ".join(cpu.lines())
    assert "Transfers to H100-SXM5-80GB: the FLOP model" in text
    assert "Does not transfer: kernels" in text and "absolute rate" in text
    write_calibration(tmp_path / "gpu", device="cuda:0")
    gpu = size_prior(read_calibration(tmp_path / "gpu"), 1e12, "H100-SXM5-80GB")
    assert read_calibration(tmp_path / "gpu").device == "cuda"
    assert "calibrated on cuda" in " ".join(gpu.lines())
    # a format-1 record (no device) whose run directories are gone: said, not guessed
    record = json.loads((cal_dir / "calibration.json").read_text())
    record["format"] = 1
    del record["device"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "calibration.json").write_text(json.dumps(record))
    old = read_calibration(tmp_path / "old")
    assert old.device == "unknown" and "unrecorded device" in " ".join(size_prior(old, 1e9, "X").lines())


def test_project_from_calibration_moves_the_projection_as_stated(cal_dir, tmp_path, capsys):
    """The stack efficiency holds at the published runs' size, far beyond a CPU sweep's: Llama 2
    70B, also far beyond it, gets a factor of 1 (the calibration says nothing there, and says
    so); a target smaller than the calibrated sizes gets a factor < 1, so more hours. The
    factor, its range and its source are printed and recorded."""
    def run(extra, name):
        assert main([*extra, "--out", str(tmp_path / name)]) == 0
        text = capsys.readouterr().out
        return text, json.loads((tmp_path / name / "projection.json").read_text())

    plain, p0 = run(PROJECT, "plain")
    text, p1 = run([*PROJECT, "--from-calibration", str(cal_dir)], "cal")
    prior = p1["calibration_prior"]
    assert prior["factor"] == pytest.approx(1.0) and prior["applies_to"] == "stack_efficiency"
    assert prior["fitted_at"] > prior["supported"][1]  # the published runs' size, beyond the sweep
    assert p1["outcomes"]["central"]["accelerator_hours"] == pytest.approx(
        p0["outcomes"]["central"]["accelerator_hours"])
    assert (f"calibration prior  stack efficiency x{prior['factor']:.3f} "
            f"(range {prior['low']:.3f} - {prior['high']:.3f})") in text
    assert f"source: {cal_dir} (calibrated on cpu" in text and "L2 d128" in text
    assert "WARNING [assumption] --from-calibration extrapolation" in text
    assert "Does not transfer" in text and "calibration prior" not in plain
    report = (tmp_path / "cal" / "report.md").read_text()
    assert "## Calibration prior (--from-calibration)" in report and "x" + f"{prior['factor']:.3f}" in report
    assert "calibration_prior" not in p0

    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"n_layer": 1, "d_model": 64, "n_head": 2, "seq_len": 64,
                                     "vocab_size": VOCAB}))
    args = ["project", "--model", str(small), "--tokens", "1B", "-a", "A100-SXM4-80GB", "-n", "1"]
    _, s0 = run(args, "s0")
    _, s1 = run([*args, "--from-calibration", str(cal_dir)], "s1")
    assert s1["calibration_prior"]["factor"] < 1
    assert s1["outcomes"]["central"]["accelerator_hours"] > s0["outcomes"]["central"]["accelerator_hours"]


@pytest.mark.parametrize("extra, message", [
    (["--from-calibration", "MISSING"], "no such directory"),
    (["--from-calibration", "EMPTY"], "has no calibration.json"),
    (["--from-calibration", "NOFIT"], "has no usable fit"),
    (["--from-calibration", "CAL", "--mfu-from", "runs/x"], "--mfu-from both correct"),
    (["--from-calibration", "CAL", "--mfu", "0.4"], "which --mfu replaces"),
])
def test_refusals_are_one_line(extra, message, cal_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nofit").mkdir()
    record = json.loads((cal_dir / "calibration.json").read_text())
    record["fit"]["b_s_per_flop"] = -1e-11
    (tmp_path / "nofit" / "calibration.json").write_text(json.dumps(record))
    paths = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty",
             "NOFIT": tmp_path / "nofit", "CAL": cal_dir}
    argv = [str(paths.get(x, x)) for x in extra]
    assert main([*PROJECT, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_refused_without_a_performance_model(cal_dir, capsys):
    # a target given by size has a shape now (estimate.shapes): the prior applies to it
    assert main(["project", "--params", "7B", "-t", "1T", "-a", "A100-SXM4-80GB", "-n", "64",
                 "--from-calibration", str(cal_dir)]) == 0
    assert "calibration prior" in capsys.readouterr().out
    assert main(["project", "--model", "deepseek-r1", "--from-calibration", str(cal_dir)]) == 2
    assert "not to a stages file" in capsys.readouterr().err
    target = resolve_target("llama2-70b")
    with pytest.raises(ValueError, match="--mfu-from both"):
        build_assumptions(target, get_accelerator("A100-SXM4-80GB"), 64,
                          mfu_run=RunSummary("r", {}), calibration=read_calibration(cal_dir))


def test_target_size_counts_recomputation(cal_dir):
    """The prior's size axis is hardware FLOPs per token: full recomputation makes the target
    larger on it, as it made the calibration runs."""
    cfg = ModelConfig(n_layer=2, d_model=128, n_head=4, seq_len=64, vocab_size=VOCAB)
    target = resolve_target(cfg)
    acc = get_accelerator("A100-SXM4-80GB")
    r = read_calibration(cal_dir)
    plain = build_assumptions(target, acc, 1, calibration=r).calibration_prior
    full = build_assumptions(target, acc, 1, recompute="full", calibration=r).calibration_prior
    assert full.target_flops_per_token == pytest.approx(
        plain.target_flops_per_token * target.recompute_ratio["full"])
    assert full.factor > plain.factor
