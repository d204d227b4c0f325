"""Cross-validation of the performance model on published runs (estimate/crossval.py) and the
run set it needs (estimate/published_runs.yaml, format 3)."""

import math
import statistics
from pathlib import Path

import pytest

from estimate import crossval
from estimate.published import RUNS_PATH, load_runs, run_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results():
    return crossval.all_splits()


def test_run_set_meets_the_category_minimums():
    """Issue 19 point 6: at least 40 sourced runs, 10 of at most 4B (active) parameters, 4 MoE,
    2 FP8, runs from 2023, 2024 and 2025, on A100, H100, H800 and TPU; 10 of at most 4B on 256
    or more accelerators."""
    runs = load_runs()
    assert len(runs) >= 40
    assert len({r["name"] for r in runs}) == len(runs)
    for r in runs:
        assert r["family"] and isinstance(r["year"], int), r["name"]
        assert r["citations"] and all(len(c["source"]) > 15 for c in r["citations"]), r["name"]
    assert sum(r["active_params"] <= 4e9 for r in runs) >= 10
    assert sum(run_config(r).is_moe for r in runs) >= 4
    assert sum(r["precision"] == "fp8" for r in runs) >= 2
    assert {2023, 2024, 2025} <= {r["year"] for r in runs}
    assert {"A100", "H100", "H800", "TPU"} <= {r["accelerator"].split("-")[0] for r in runs}
    # hundreds of accelerators for small models (issue 19: at least 10): published counts of
    # 256 or more
    assert sum(r["active_params"] <= 4e9 and (r["count"] or 0) >= 256 for r in runs) >= 10


def test_lofo_folds_never_hold_the_held_out_family():
    pts = crossval.points()
    folds = crossval.folds("lofo", pts)
    assert {f for f, _, _ in folds} == {p.family for p in pts}
    for family, train, test in folds:
        assert test and all(p.family == family for p in test)
        assert all(p.family != family for p in train)
        assert len(train) + len(test) == len(pts)


def test_time_split_trains_only_on_runs_before_2024():
    pts = crossval.points()
    ((_, train, test),) = crossval.folds("time", pts)
    assert train and test
    assert all(p.year < 2024 for p in train)
    assert all(p.year >= 2024 for p in test)
    assert len(train) + len(test) == len(pts)


def test_loo_folds_leave_out_exactly_the_run():
    pts = crossval.points()
    for name, train, test in crossval.folds("loo", pts):
        assert [p.name for p in test] == [name]
        assert name not in {p.name for p in train}


def test_nested_range_errors_hold_out_whole_families(monkeypatch):
    """The range of a leave-one-family-out fold is learnt from nested fits that also hold out
    whole families: no nested fit sees a sibling of the run it predicts."""
    pts = list(crossval.points())
    seen = []
    real = crossval._central_fit

    def spy(rest):
        seen.append({p.family for p in rest})
        return real(rest)

    monkeypatch.setattr(crossval, "_central_fit", spy)
    errors = crossval.nested_errors(pts, by_family=True)
    assert len(errors) == len(pts)
    families = {p.family for p in pts}
    assert len(seen) == len(families)
    for fams in seen:
        assert len(families - fams) == 1


def test_held_out_family_figures_do_not_move_its_predictions(tmp_path):
    """Changing every reported figure of one family leaves that family's leave-one-family-out
    predictions, ranges and best-constant predictions unchanged, and moves some other family's."""
    text = RUNS_PATH.read_text()
    changed = tmp_path / "runs.yaml"
    changed.write_text(text.replace("accelerator_hours: 370e3", "accelerator_hours: 10")
                       .replace("accelerator_hours: 460e3", "accelerator_hours: 10"))
    base = {p.point.name: p for p in crossval.cross_validate("lofo")}
    after = {p.point.name: p for p in crossval.cross_validate("lofo", changed)}
    assert after["Llama 3.2 1B"].point.reported == 10
    for name in ("Llama 3.2 1B", "Llama 3.2 3B", "Llama 3 8B", "Llama 3.1 405B"):
        assert after[name].predicted == pytest.approx(base[name].predicted)
        assert (after[name].best, after[name].worst) == pytest.approx((base[name].best, base[name].worst))
        assert after[name].constant_predicted == pytest.approx(base[name].constant_predicted)
    assert any(after[n].predicted != pytest.approx(base[n].predicted)
               or after[n].worst != pytest.approx(base[n].worst) for n in base if n not in
               {"Llama 3.2 1B", "Llama 3.2 3B"} and base[n].point.family != "llama3")


def test_summary_matches_its_rows(results):
    for preds, s in results.values():
        assert s["n"] == len(preds) > 0
        assert s["median_abs_log_error"] == pytest.approx(statistics.median(abs(p.log_error) for p in preds))
        assert s["in_range"] == sum(p.best <= p.point.reported <= p.worst for p in preds)
        assert s["median_range_width"] == pytest.approx(statistics.median(p.worst / p.best for p in preds))
        for p in preds:
            assert p.best <= p.predicted <= p.worst
            assert p.log_error == pytest.approx(math.log(p.predicted / p.point.reported))
    assert results["loo"][1]["n"] == results["lofo"][1]["n"] == len(crossval.points())


def test_basis_factor_is_fitted_per_fold():
    """Wall-clock hours get their own fitted factor (training time / elapsed time), from the
    fold's wall-clock runs only; compute hours get none."""
    pts = list(crossval.points())
    f = crossval.fit_fold(pts)
    assert f.basis_factor["compute"] == 1.0
    wall = [p for p in pts if p.basis == "wallclock"]
    planned = {True: f.planned_factor, False: 1.0}
    fast = {True: f.fast_factor, False: 1.0}
    # median polish: each factor is (to its settling tolerance) the median of what the others leave
    assert f.basis_factor["wallclock"] == pytest.approx(
        statistics.median(p.unit_hours / f.stack / planned[p.planned] / fast[p.fast] / p.reported
                          for p in wall), rel=1e-3)
    without = crossval.fit_fold([p for p in pts if p.basis != "wallclock"])
    assert without.basis_factor["wallclock"] == 1.0


def test_planned_layout_factor_is_fitted_per_fold():
    """Runs whose layout the planner chose (none published) get their own factor, fitted on
    the fold's planned runs only; a fold without planned runs has none; it moves predictions
    of planned runs only."""
    pts = list(crossval.points())
    assert any(p.planned for p in pts) and not all(p.planned for p in pts)
    f = crossval.fit_fold(pts)
    fast = {True: f.fast_factor, False: 1.0}
    assert f.planned_factor == pytest.approx(statistics.median(
        p.unit_hours / f.stack / f.basis_factor[p.basis] / fast[p.fast] / p.reported
        for p in pts if p.planned), rel=1e-3)
    assert f.planned_factor != pytest.approx(1.0, abs=0.02)
    published = [p for p in pts if not p.planned]
    g = crossval.fit_fold(published)
    assert g.planned_factor == 1.0
    p = next(q for q in pts if q.planned and not q.fast)
    assert f.predict(p) == pytest.approx(
        p.unit_hours / (f.stack * f.basis_factor[p.basis] * f.planned_factor))
    q = next(q for q in pts if not q.planned and not q.fast)
    assert f.predict(q) == pytest.approx(q.unit_hours / (f.stack * f.basis_factor[q.basis]))


def test_fast_accelerator_factor_is_fitted_per_fold():
    """Runs on accelerators of >= 500 bf16 TFLOP/s (H100, H800) get their own factor, fitted on
    the fold's fast runs only: a fold without two of them (the time split's, before 2024) has
    none; it moves the predictions of fast runs only."""
    pts = list(crossval.points())
    fast = [p for p in pts if p.fast]
    assert fast and {p.name for p in fast} >= {"DeepSeek-V3", "Llama 3.1 405B"}
    assert not any(p.fast for p in pts if p.name in {"OPT-175B", "PaLM 540B", "GPT-3 175B"})
    f = crossval.fit_fold(pts)
    planned = {True: f.planned_factor, False: 1.0}
    assert f.fast_factor == pytest.approx(statistics.median(
        p.unit_hours / f.stack / f.basis_factor[p.basis] / planned[p.planned] / p.reported
        for p in fast), rel=1e-3)
    assert f.fast_factor != pytest.approx(1.0, abs=0.02)
    before = crossval.fit_fold([p for p in pts if p.year < crossval.TIME_SPLIT_YEAR])
    assert before.fast_factor == 1.0
    p = next(q for q in fast if not q.planned)
    assert f.predict(p) == pytest.approx(
        p.unit_hours / (f.stack * f.basis_factor[p.basis] * f.fast_factor))


@pytest.mark.slow  # the whole validate command: 10 s: the default tier stays under 3 minutes
def test_validate_command_prints_the_three_cross_validations(tmp_path, capsys):
    from estimate.__main__ import main

    assert main(["validate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for title in crossval.SPLIT_TITLES.values():
        assert title in out
    assert "goals:" in out
    md = (tmp_path / "report.md").read_text()
    assert "leave-one-family-out" in md
    import json

    record = json.loads((tmp_path / "validation.json").read_text())
    assert set(record["cross_validation"]) == set(crossval.SPLITS)


def test_loader_rejects_a_run_without_family_or_year(tmp_path):
    text = RUNS_PATH.read_text()
    bad = tmp_path / "runs.yaml"
    bad.write_text(text.replace("    family: gpt3\n", "", 1))
    with pytest.raises(ValueError, match="lacks family"):
        load_runs(bad)
    bad.write_text(text.replace("    year: 2020\n", "    year: recent\n", 1))
    with pytest.raises(ValueError, match="year"):
        load_runs(bad)
    bad.write_text(text.replace("format: 3", "format: 2", 1))
    with pytest.raises(ValueError, match="format"):
        load_runs(bad)


def test_range_is_the_split_conformal_interval_of_the_held_out_errors():
    """n = 19 errors, 80%: the 2nd smallest and the 18th (k = floor(20 x 0.1) = 2 from each
    end), by hand; the interval always holds the central prediction (0)."""
    errors = [float(e) for e in range(-9, 10)]
    assert crossval._quantiles(errors) == (-8.0, 8.0)
    assert crossval._quantiles([1.0, 2.0, 3.0]) == (0.0, 3.0)


def test_fitted_factors_and_their_ranges():
    """The all-runs fit holds its factors inside their own 25th-75th percentile ranges, and
    wall-clock hours cost more than compute hours (factor below 1)."""
    f = crossval.fitted()
    r = crossval.factor_ranges(list(crossval.points()))
    lo, hi = r["stack_efficiency"]
    assert lo <= f.stack <= hi
    for basis in ("wallclock", "unknown"):
        lo, hi = r[basis]
        assert lo <= f.basis_factor[basis] <= hi
    assert f.basis_factor["wallclock"] < 1
    assert f.range_log[0] <= 0 <= f.range_log[1]
