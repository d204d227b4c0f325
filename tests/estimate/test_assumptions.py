import json

import pytest

from contracts.run import read_summary
from estimate.assumptions import build_assumptions, load_defaults
from estimate.hardware import get_accelerator
from estimate.published import fit
from estimate.target import resolve_target


def write_summary(path, **over):
    data = {
        "format": 1,
        "mfu": {"median": 0.30, "p10": 0.27, "p90": 0.32},
        "tokens_per_s": {"median": 5000.0, "p10": 4500.0, "p90": 5200.0},
        "step_s": {"median": 0.8, "p10": 0.75, "p90": 0.9},
        "model": {"params": 70_000_000},
        "model_flops_per_token": 1.0e9,
        "hardware_flops_per_token": 1.0e9,
        "world_size": 2,
        "mixed_precision": "bf16",
        "device": "NVIDIA H100 80GB HBM3",
        "peak_flops_per_process": {"median": 989e12, "min": 989e12, "max": 989e12,
                                   "source": "catalog:H100-SXM5-80GB (datasheet)"},
    } | over
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(data))
    return path


def test_defaults_have_sources_and_ordered_ranges():
    d = load_defaults()
    entries = [d["mfu"]["bf16"], d["mfu"]["fp8"], d["goodput"], d["pue"],
               d["power_fraction_of_tdp"], *d["scaling_efficiency"].values()]
    for e in entries:
        assert e["low"] <= e["central"] <= e["high"]
        assert len(e["source"]) > 40
    # the published anchors the MFU default cites
    src = d["mfu"]["bf16"]["source"]
    for anchor in ("46.2%", "38-43%", "55.2%"):
        assert anchor in src


@pytest.mark.slow  # every published run by size and by shape: 9 s: the default tier stays under 3 minutes
def test_a_size_goes_through_the_performance_model():
    """Issue 19: --params was a flat 0.36-0.40 MFU whatever the count; now a size becomes a
    shape (estimate.shapes) and the performance model times it like any other."""
    t = resolve_target(params=405e9)
    acc = get_accelerator("H100-SXM5-80GB")
    a = build_assumptions(t, acc, 16384, tokens=15e12)
    assert a.performance is not None and "performance model" in a.mfu.source
    assert 0.15 < a.mfu.low < a.mfu.central < a.mfu.high < 0.6
    assert a.goodput.central < 0.95 and a.power_w.central == 700  # TDP x 1.0
    for x in a.numeric():
        assert x.low <= x.central <= x.high and x.source


@pytest.mark.slow  # 10 s of planning: the default tier stays under 3 min
def test_moe_and_fp8_by_size_are_modelled():
    acc = get_accelerator("H800-SXM5-80GB")
    moe = build_assumptions(resolve_target(params=671e9, active_params=37e9), acc, 2048,
                            tokens=14.8e12)
    assert moe.performance.layout.ep > 1  # experts spread over ranks
    bf16 = build_assumptions(resolve_target(params=70e9), acc, 2048, tokens=2e12)
    fp8 = build_assumptions(resolve_target(params=70e9), acc, 2048, precision="fp8", tokens=2e12)
    # fp8 speeds up the block GEMMs only: faster per step, lower MFU against its doubled peak
    assert fp8.performance.steps["central"].total < bf16.performance.steps["central"].total
    assert fp8.mfu.central < bf16.mfu.central


def test_default_with_a_shape_comes_from_the_performance_model():
    t = resolve_target("llama3-405b")
    acc = get_accelerator("H100-SXM5-80GB")
    a = build_assumptions(t, acc, 16384, layout={"tp": 8, "pp": 16, "global_batch_tokens": 16e6})
    assert a.performance is not None and "performance model" in a.mfu.source
    assert a.performance.layout.dp == 128
    # low end: the fitted stack efficiency's 25th percentile over the published runs
    assert 0.15 < a.mfu.low < a.mfu.central < a.mfu.high < 0.6
    assert a.scaling.low == a.scaling.high == 1.0  # communication is in the model
    # goodput: the wall-clock factor fitted on the published wall-clock runs, with its range
    w = fit().basis["wallclock"]
    assert (a.goodput.central, a.goodput.low, a.goodput.high) == (w.central, w.low, w.high)
    assert 0.6 < a.goodput.low < a.goodput.central < a.goodput.high <= 1.0
    # the peak can be given by hand; MFU is then against it
    given = build_assumptions(t, acc, 16384, layout={"tp": 8, "pp": 16, "global_batch_tokens": 16e6},
                              peak_flops=500e12)
    assert given.mfu.central > a.mfu.central
    assert "--peak-tflops" in given.settings[0].source


def test_cli_overrides_point_and_range():
    t = resolve_target("llama2-70b")
    a = build_assumptions(t, get_accelerator("A100-SXM4-80GB"), 2048, mfu=(0.5, None, None),
                          goodput=(0.85, 0.8, 0.9), price=(2.0, None, None))
    assert a.mfu.low == a.mfu.central == a.mfu.high == 0.5
    assert (a.goodput.low, a.goodput.high) == (0.8, 0.9)
    assert a.price.central == 2.0
    with pytest.raises(ValueError, match="outside"):
        build_assumptions(t, get_accelerator("A100-SXM4-80GB"), 8, mfu=(1.5, None, None))


def test_mfu_recompute_conversion_keeps_hfu():
    t = resolve_target("llama2-70b")
    acc = get_accelerator("A100-SXM4-80GB")
    a = build_assumptions(t, acc, 8, recompute="full", mfu=(0.45, None, None), mfu_recompute="none")
    assert a.mfu.central == pytest.approx(0.45 / t.recompute_ratio["full"])


def test_mfu_from_run_dir(tmp_path):
    run = read_summary(write_summary(tmp_path / "run"))
    t = resolve_target("llama2-70b")
    acc = get_accelerator("H100-SXM5-80GB")
    a = build_assumptions(t, acc, 1024, mfu_run=run)
    assert (a.mfu.low, a.mfu.central, a.mfu.high) == (0.27, 0.30, 0.32)
    assert str(run.path) in a.mfu.source
    # measured on 2 GPUs, projected to 1024: the extrapolation default applies
    assert a.scaling.central == 0.9 and a.scaling.low == 0.7
    same = build_assumptions(t, acc, 2, mfu_run=run)
    assert same.scaling.central == 1.0


def test_cpu_mfu_is_flagged(tmp_path):
    run = read_summary(write_summary(
        tmp_path / "cpu", device="cpu", mixed_precision="no",
        peak_flops_per_process={"median": 1e11, "min": 9e10, "max": 1.1e11,
                                "source": "measured: fp32 matmul on cpu"}))
    a = build_assumptions(resolve_target("llama2-70b"), get_accelerator("H100-SXM5-80GB"), 64,
                          mfu_run=run)
    assert any("does not transfer" in w for w in a.warnings)
    assert any("does not transfer" in n for n in a.mfu.notes)
    assert any("fp32" in w for w in a.warnings)  # trained in fp32, projected with the bf16 peak


def test_run_recompute_is_carried_as_hfu(tmp_path):
    # the run recomputed everything (hardware FLOPs 4/3 of model FLOPs); the target does not
    run = read_summary(write_summary(tmp_path / "r", hardware_flops_per_token=4.0e9 / 3))
    t = resolve_target("llama2-70b")
    a = build_assumptions(t, get_accelerator("H100-SXM5-80GB"), 2, mfu_run=run)
    assert a.mfu.central == pytest.approx(0.30 * (4 / 3) / t.recompute_ratio["none"])


def test_read_summary_errors(tmp_path):
    with pytest.raises(ValueError, match="no summary.json"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match="missing key"):
        read_summary(tmp_path)
    write_summary(tmp_path / "v2", format=2)
    with pytest.raises(ValueError, match="format"):
        read_summary(tmp_path / "v2")


def test_no_tdp_means_no_energy_unless_given():
    t = resolve_target("llama2-70b")
    acc = get_accelerator("TPU-v5p")
    a = build_assumptions(t, acc, 1024)
    assert a.power_w is None and any("TDP" in w for w in a.warnings)
    given = build_assumptions(t, acc, 1024, power_w=(400.0, None, None))
    assert given.power_w.central == 400.0


def test_precision_missing_on_accelerator():
    with pytest.raises(ValueError, match="available"):
        build_assumptions(resolve_target("gpt3-175b"), get_accelerator("V100-SXM2-32GB"), 8)


def test_unknown_gpu_with_measured_peak_is_flagged(tmp_path):
    run = read_summary(write_summary(
        tmp_path / "g", device="NVIDIA GeForce RTX 4090",
        peak_flops_per_process={"median": 1.5e14, "min": 1.4e14, "max": 1.6e14,
                                "source": "measured: bf16 matmul on cuda"}))
    a = build_assumptions(resolve_target("gpt2-124m"), get_accelerator("H100-SXM5-80GB"), 8,
                          mfu_run=run)
    assert any("not comparable" in w for w in a.warnings)
    assert not any("does not transfer" in w for w in a.warnings)


def test_gpu_run_on_other_accelerator_is_flagged(tmp_path):
    run = read_summary(write_summary(tmp_path / "h"))  # measured on an H100
    a = build_assumptions(resolve_target("gpt2-124m"), get_accelerator("MI300X"), 8, mfu_run=run)
    assert any("projected onto MI300X" in w for w in a.warnings)
    same = build_assumptions(resolve_target("gpt2-124m"), get_accelerator("H100-SXM5-80GB"), 8,
                             mfu_run=run)
    assert same.warnings == []


def test_gpu_run_mfu_gets_a_size_correction(tmp_path):
    """A GPU run of a small model projected to a large one: the performance model's ratio of
    MFUs (target over the run as it ran) scales the measured MFU; without a shape, no change."""
    small = {"vocab_size": 50304, "seq_len": 1024, "n_layer": 12, "d_model": 768, "n_head": 12,
             "ffn_hidden": 2048, "params": 124_000_000}
    run = read_summary(write_summary(tmp_path / "gpu", model=small, seq_len=1024, batch_size=16,
                                     world_size=1))
    t = resolve_target("llama2-70b")
    acc = get_accelerator("H100-SXM5-80GB")
    a = build_assumptions(t, acc, 2048, mfu_run=run)
    note = next(n for n in a.mfu.notes if n.startswith("size correction"))
    factor = float(note.split("x", 1)[1].split(":")[0])
    assert a.mfu.central == pytest.approx(0.30 * factor, rel=2e-3)  # the note rounds
    assert factor != 1.0
    bare = read_summary(write_summary(tmp_path / "bare"))  # no model shape in the summary
    b = build_assumptions(t, acc, 2048, mfu_run=bare)
    assert b.mfu.central == 0.30 and not any(n.startswith("size correction") for n in b.mfu.notes)


def test_hours_basis_divides_by_the_fitted_basis_factor():
    """--hours-basis: the goodput is the fit's factor of that basis (compute: 1); it needs the
    performance model, and a bad basis is a one-line error."""
    t, acc = resolve_target(params=7e9), get_accelerator("H100-SXM5-80GB")
    f = fit()
    for basis, want in (("compute", 1.0), ("wallclock", f.basis["wallclock"].central),
                        ("unknown", f.basis["unknown"].central)):
        a = build_assumptions(t, acc, 512, tokens=2e12, hours_basis=basis)
        assert a.goodput.central == pytest.approx(want)
    assert build_assumptions(t, acc, 512, tokens=2e12).goodput.central == pytest.approx(
        f.basis["wallclock"].central)
    with pytest.raises(ValueError, match="hours basis 'elapsed'"):
        build_assumptions(t, acc, 512, tokens=2e12, hours_basis="elapsed")
    with pytest.raises(ValueError, match="--hours-basis"):
        build_assumptions(t, acc, 512, mfu=(0.4, None, None), hours_basis="compute")
