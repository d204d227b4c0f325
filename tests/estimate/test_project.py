import pytest

from estimate.assumptions import Assumption, AssumptionSet
from estimate.hardware import get_accelerator
from estimate.project import CASES, project, training_seconds
from estimate.target import resolve_target


def test_hand_computed_case():
    # 1e24 FLOPs on 1000 accelerators at 1e15 FLOP/s and MFU 0.5: 1e24 / 5e17 = 2e6 s.
    assert training_seconds(1e24, 1000, 1e15, 0.5) == pytest.approx(2e6)
    # Scaling and goodput divide the same way: 2e6 / (0.8 * 0.5) = 5e6 s.
    assert training_seconds(1e24, 1000, 1e15, 0.5, scaling=0.8, goodput=0.5) == pytest.approx(5e6)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_training_seconds_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="mfu"):
        training_seconds(1e24, 1000, 1e15, bad)


def point(key, value, better="high", unit=""):
    return Assumption(key, key, value, value, value, unit, better, "test")


def ranged(key, central, low, high, better="high", unit=""):
    return Assumption(key, key, central, low, high, unit, better, "test")


def test_project_exact_numbers():
    # given an MFU, time = FLOPs / (n x peak x MFU): the FLOPs of the assumed shape of 1e12
    # parameters (6N + attention) on 1e11 tokens
    target = resolve_target(params=1e12)
    acc = get_accelerator("H100-SXM5-80GB")  # 989 TFLOP/s bf16 dense
    a = AssumptionSet(point("mfu", 0.5), point("scaling", 1.0), point("goodput", 1.0),
                      point("pue", 1.5, "low"), point("power_w", 700, "low", "W"),
                      point("price", 2.0, "low", "USD"), settings=[])
    p = project(target, 1e11, acc, 1000, a)
    flops = target.model_flops_per_token * 1e11
    seconds = flops / (1000 * 989e12 * 0.5)
    c = p.central
    assert p.total_model_flops == pytest.approx(flops)
    assert c.seconds == pytest.approx(seconds)
    assert c.days == pytest.approx(seconds / 86400)
    assert c.accelerator_hours == pytest.approx(1000 * seconds / 3600)
    assert c.energy_mwh == pytest.approx(1000 * seconds / 3600 * 700 * 1.5 / 1e6)
    assert c.cost_usd == pytest.approx(1000 * seconds / 3600 * 2.0)
    # all point assumptions: the three cases coincide
    assert p.outcomes["best"].seconds == pytest.approx(p.outcomes["worst"].seconds)


def test_range_ordering_best_central_worst():
    target = resolve_target("llama2-70b")
    acc = get_accelerator("a100-sxm4-80gb")
    a = AssumptionSet(ranged("mfu", 0.4, 0.3, 0.5), ranged("scaling", 0.9, 0.8, 1.0),
                      ranged("goodput", 0.9, 0.7, 0.95), ranged("pue", 1.2, 1.1, 1.5, "low"),
                      ranged("power_w", 400, 320, 600, "low", "W"),
                      ranged("price", 2.0, 1.5, 3.0, "low", "USD"), settings=[])
    p = project(target, 2e12, acc, 2048, a)
    o = p.outcomes
    for field in ("seconds", "accelerator_hours", "energy_mwh", "cost_usd"):
        assert getattr(o["best"], field) < getattr(o["central"], field) < getattr(o["worst"], field)
    assert o["best"].mfu == 0.5 and o["worst"].mfu == 0.3
    assert o["best"].goodput == 0.95 and o["worst"].goodput == 0.7
    # worst/best time ratio is the product of the favourable/unfavourable ratios
    assert o["worst"].seconds / o["best"].seconds == pytest.approx((0.5 * 1.0 * 0.95) / (0.3 * 0.8 * 0.7))


def test_assumption_at_and_validation():
    a = ranged("pue", 1.2, 1.1, 1.5, "low")
    assert (a.at("best"), a.at("central"), a.at("worst")) == (1.1, 1.2, 1.5)
    with pytest.raises(ValueError, match="low <= central <= high"):
        ranged("mfu", 0.6, 0.3, 0.5)
    with pytest.raises(ValueError, match="case"):
        a.at("typical")


def test_count_must_be_positive_integer():
    target = resolve_target(params=1e9)
    a = AssumptionSet(point("mfu", 0.5), point("scaling", 1.0), point("goodput", 1.0),
                      point("pue", 1.1, "low"), None, None, settings=[])
    with pytest.raises(ValueError, match="positive integer"):
        project(target, 1e9, get_accelerator("h100-sxm5-80gb"), 0, a)


def test_memory_check_flags_model_that_cannot_fit():
    target = resolve_target("llama3-405b")
    a = AssumptionSet(point("mfu", 0.4), point("scaling", 1.0), point("goodput", 0.9),
                      point("pue", 1.1, "low"), None, None, settings=[])
    small = project(target, 1e12, get_accelerator("H100-SXM5-80GB"), 8, a)
    mem = next(c for c in small.checks if c.name == "memory")
    assert mem.status == "warn" and "does not fit" in mem.message
    big = project(target, 1e12, get_accelerator("H100-SXM5-80GB"), 16384, a)
    assert next(c for c in big.checks if c.name == "memory").status == "ok"
    assert set(big.outcomes) == set(CASES)
