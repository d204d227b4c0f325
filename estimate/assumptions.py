"""The assumptions a projection rests on, each with a central value, a low/high range and a source.

Defaults live in `defaults.yaml` (numbers and citations); this module picks the right variant
(precision, dense or MoE, where the MFU was measured) and applies command-line overrides.

MFU and recomputation: MFU divides *model* FLOPs (6N + 12LdT, no recomputation) by time x peak,
so recomputing activations lowers MFU at an unchanged hardware utilisation (HFU). When the MFU
comes from a run whose recomputation we know (a summary.json records hardware and model FLOPs
per token) and the target recomputes differently, we carry the *HFU* over:

    MFU_target = MFU_source x (hw/model FLOPs of the source) / (hw/model FLOPs of the target)

Published MFUs (the defaults) already absorb whatever recomputation those runs used (PaLM:
46.2% MFU with rematerialisation, 57.8% HFU), so the default range is not adjusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contracts.run import RunSummary
from estimate.hardware import Accelerator, match_device_name, read_yaml
from estimate.target import Target
from model.config import ModelConfig
from model.precision import precision as precision_named

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")
CLI_SOURCE = "given on the command line"

Range = tuple[float, float | None, float | None]  # central, low, high (None, None: a point)


@dataclass
class Assumption:
    """A number the projection depends on; `better` says which end shortens/cheapens the run."""

    key: str
    label: str
    central: float
    low: float
    high: float
    unit: str
    better: str  # "high" or "low"
    source: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.low <= self.central <= self.high:
            raise ValueError(
                f"{self.key}: need low <= central <= high, got {self.low} / {self.central} / {self.high}"
            )
        if self.better not in ("high", "low"):
            raise ValueError(f"{self.key}: better must be 'high' or 'low', got {self.better!r}")

    def at(self, case: str) -> float:
        """The value in the 'central', 'best' (all favourable) or 'worst' case."""
        if case == "central":
            return self.central
        favourable = self.high if self.better == "high" else self.low
        unfavourable = self.low if self.better == "high" else self.high
        if case == "best":
            return favourable
        if case == "worst":
            return unfavourable
        raise ValueError(f"case must be central, best or worst, got {case!r}")

    def scaled(self, factor: float, note: str) -> Assumption:
        return Assumption(self.key, self.label, self.central * factor, self.low * factor,
                          self.high * factor, self.unit, self.better, self.source,
                          [*self.notes, note])


@dataclass
class Setting:
    """A categorical choice (precision, recomputation) shown in the assumption table."""

    key: str
    label: str
    value: str
    source: str


@dataclass
class Performance:
    """What the performance model (estimate/perf.py) said about the target: its layout, the
    step time by part in each case, its factors and the fit on published runs."""

    layout: object  # perf.Layout
    steps: dict  # case -> perf.StepTime
    factors: dict  # key -> perf.Factor
    fitted_runs: int
    wallclock_goodput: float
    plan: object = None  # planner.Plan: the chosen layout, the runner-up, what was searched
    recompute: str = "none"  # the recomputation the plan chose (or was given)


@dataclass
class AssumptionSet:
    mfu: Assumption
    scaling: Assumption
    goodput: Assumption
    pue: Assumption
    power_w: Assumption | None  # None: no TDP in the catalog and none given
    price: Assumption | None  # None: no price given
    settings: list[Setting]
    warnings: list[str] = field(default_factory=list)
    performance: Performance | None = None  # set when the MFU comes from the performance model
    calibration_prior: object | None = None  # calibrate.prior.SizePrior (--from-calibration)

    def numeric(self) -> list[Assumption]:
        return [a for a in (self.mfu, self.scaling, self.goodput, self.power_w, self.pue,
                            self.price) if a is not None]


def load_defaults(path: Path = DEFAULTS_PATH) -> dict:
    return read_yaml(path)


def _from_yaml(entry: dict, key: str, label: str, unit: str, better: str) -> Assumption:
    return Assumption(key, label, float(entry["central"]), float(entry["low"]),
                      float(entry["high"]), unit, better, " ".join(str(entry["source"]).split()))


def _from_cli(value: Range, key: str, label: str, unit: str, better: str,
              source: str = CLI_SOURCE) -> Assumption:
    central, low, high = value
    low = central if low is None else low
    high = central if high is None else high
    note = [] if low != high else ["a single value: no range given, so it does not widen the bounds"]
    return Assumption(key, label, central, low, high, unit, better, source, note)


def _check_bounds(a: Assumption, lo: float, hi: float) -> None:
    for v in (a.low, a.central, a.high):
        if not lo < v <= hi:
            raise ValueError(f"{a.key}={v} is outside ({lo}, {hi}]")


MFU_LABEL = "MFU (model FLOPs / (time x peak))"


def build_assumptions(
    target: Target,
    acc: Accelerator,
    n_acc: int,
    precision: str = "bf16",
    recompute: str | None = None,
    *,
    mfu: Range | None = None,
    mfu_recompute: str | None = None,
    mfu_run: RunSummary | None = None,
    scaling: Range | None = None,
    goodput: Range | None = None,
    power_w: Range | None = None,
    pue: Range | None = None,
    price: Range | None = None,
    defaults: dict | None = None,
    layout: dict | None = None,
    peak_flops: float | None = None,
    calibration: object | None = None,
    tokens: float | None = None,
    layout_published: bool = False,
    hours_basis: str | None = None,
) -> AssumptionSet:
    """Every assumption of a projection, from defaults.yaml and the command-line overrides.

    Without --mfu / --mfu-from, the target (given by preset, shape or size: a size becomes a
    shape, estimate.shapes) gets its MFU and goodput from the performance model through
    `estimate.engine.estimate_run`, as `validate` does (`layout` gives parts of the parallel
    layout, the planner the rest; `recompute` None lets the planner choose; `tokens` bound
    the planner's batch) and no separate scaling factor: the model counts communication and
    the pipeline bubble at the target scale. The settings then show the recomputation the
    plan used. `layout_published`: `layout` is a published run's (it ran), kept even where the
    memory model finds it too large; a layout given otherwise that fits nowhere is refused.

    `calibration` (a calibrate.prior.CalibrationRecord, --from-calibration) scales the
    performance model's stack efficiency by calibrate's fitted efficiency at the target's size
    over that at its reference size; it needs the performance model, so it is refused with
    --mfu or --mfu-from.

    `hours_basis` (compute | wallclock | unknown; None: wallclock) says what the accelerator-hours
    count, as published runs' `hours_basis` does: the modelled training time divided by the
    factor of that basis fitted on the published runs (`published.fit`; compute: 1), the
    division `validate` makes for a run of that basis. It needs the performance model and no
    --goodput."""
    d = defaults if defaults is not None else load_defaults()
    if recompute is not None and recompute not in target.recompute_ratio:
        raise ValueError(f"recompute={recompute!r}; valid: {', '.join(target.recompute_ratio)}")
    peak = peak_flops or acc.peak_flops(precision)  # fails naming the precisions there are
    warnings: list[str] = []
    performance = None
    peak_source = ("given on the command line (--peak-tflops)" if peak_flops
                   else f"{acc.name}: dense {precision} ({acc.source})")
    if mfu_run is not None and mfu is not None:
        raise ValueError("give --mfu or --mfu-from, not both")
    if calibration is not None:
        refuse_calibration(mfu is not None, mfu_run is not None)
    if hours_basis is not None:
        from estimate.published import BASES

        if hours_basis not in BASES:
            raise ValueError(f"hours basis {hours_basis!r}; valid: {', '.join(BASES)}")
        if mfu is not None or mfu_run is not None or goodput is not None:
            raise ValueError("--hours-basis divides the performance model's hours by a factor "
                             "fitted on published runs; it cannot be given with --mfu, "
                             "--mfu-from or --goodput")
    prior = None
    if mfu_run is not None or mfu is not None:
        recompute = recompute or "none"
    if mfu_run is not None:
        mfu_a, scale_key = _mfu_from_run(mfu_run, target, acc, n_acc, precision, recompute, warnings)
    elif mfu is not None:
        mfu_a = _from_cli(mfu, "mfu", MFU_LABEL, "", "high")
        if mfu_recompute and mfu_recompute != recompute:
            factor = target.recompute_ratio[mfu_recompute] / target.recompute_ratio[recompute]
            mfu_a = mfu_a.scaled(factor, f"given for recompute={mfu_recompute}; x{factor:.3f} "
                                         f"for recompute={recompute} at the same HFU")
        scale_key = "published"
        mfu_a.notes.append("taken to be the MFU at the target scale (pass --scaling otherwise)")
    else:
        mfu_a, modelled_goodput, performance, prior = _modelled(
            target, acc, n_acc, precision, recompute, layout or {}, peak_flops, d, calibration,
            tokens, layout_published, hours_basis or "wallclock")
        recompute = performance.recompute
        if prior is not None and prior.outside:
            warnings.append(f"--from-calibration {prior.outside}")
        scale_key = None
    settings = [
        Setting("precision", "precision (selects the peak)", precision,
                f"{peak / 1e12:.4g} TFLOP/s, {peak_source}"),
        Setting("recompute", "activation recomputation", recompute,
                f"hardware FLOPs = {target.recompute_ratio[recompute]:.3f} x model FLOPs "
                "(model.flops.hardware_flops_per_token); MFU counts model FLOPs only"
                + ("; chosen by the layout planner" if performance is not None else "")),
    ]
    _check_bounds(mfu_a, 0.0, 1.0)
    if mfu_a.central > 0.6:
        warnings.append(f"MFU {mfu_a.central:.2f} is above any large-run MFU we know of "
                        "(MegaScale 55.2%): check it")

    if scaling is not None:
        scaling_a = _from_cli(scaling, "scaling", "scaling efficiency", "", "high")
    elif scale_key is None:
        scaling_a = Assumption("scaling", "scaling efficiency", 1.0, 1.0, 1.0, "", "high",
                               "included in the performance model: communication and the "
                               "pipeline bubble are modelled at the target's layout and count")
    else:
        scaling_a = _from_yaml(d["scaling_efficiency"][scale_key], "scaling",
                               "scaling efficiency", "", "high")
    _check_bounds(scaling_a, 0.0, 1.0)

    if goodput is not None:
        goodput_a = _from_cli(goodput, "goodput", "goodput (useful / elapsed time)", "", "high")
    elif scale_key is None:
        goodput_a = modelled_goodput
    else:
        goodput_a = _from_yaml(d["goodput"], "goodput", "goodput (useful / elapsed time)", "", "high")
    _check_bounds(goodput_a, 0.0, 1.0)
    if goodput is not None and goodput_a.central > 0.97:
        warnings.append(f"goodput {goodput_a.central:.2f}: no large run we know of reports more than ~0.9-0.95")

    power_a = _power(d["power_fraction_of_tdp"], acc, power_w, warnings)
    pue_a = (_from_cli(pue, "pue", "PUE (facility / IT energy)", "", "low") if pue is not None
             else _from_yaml(d["pue"], "pue", "PUE (facility / IT energy)", "", "low"))
    _check_bounds(pue_a, 0.99, 5.0)
    price_a = None
    if price is not None:
        price_a = _from_cli(price, "price", "price per accelerator-hour", "USD", "low")
        _check_bounds(price_a, -1e-12, 1e6)
    return AssumptionSet(mfu_a, scaling_a, goodput_a, pue_a, power_a, price_a, settings, warnings,
                         performance, prior)


def refuse_calibration(mfu: bool, mfu_run: bool) -> None:
    """--from-calibration acts on the performance model's stack efficiency: one line saying
    why when there is none to act on."""
    if mfu_run:
        raise ValueError("--from-calibration and --mfu-from both correct the efficiency for size: "
                         "--mfu-from's MFU is already size-corrected by the performance model, "
                         "in which the stack efficiency the calibration scales cancels; give one")
    if mfu:
        raise ValueError("--from-calibration scales the performance model's stack efficiency, "
                         "which --mfu replaces; give one")


def _modelled(target: Target, acc: Accelerator, n_acc: int, precision: str,
              recompute: str | None, given: dict, peak_flops: float | None, d: dict,
              calibration: object | None = None, tokens: float | None = None,
              published: bool = False, hours_basis: str = "wallclock",
              ) -> tuple[Assumption, Assumption, Performance, object]:
    """MFU and goodput from the performance model, in the three cases, its record, and the
    calibration prior applied to its stack efficiency (None without `calibration`). The model
    runs through `estimate.engine.estimate_run`, the function `validate` calls; the goodput is
    the factor fitted for `hours_basis` (what the hours count: `published.fit`)."""
    from estimate.engine import estimate_run
    from estimate.perf import load_factors
    from estimate.perf import mfu as perf_mfu
    from estimate.published import fit, is_fast

    fitted = fit()
    planned = not any(given.get(k) is not None for k in ("tp", "pp", "dp", "ep"))
    stack, prior = fitted.stack_for(planned, acc), None
    if calibration is not None:
        from estimate.calibrate.prior import size_prior
        from estimate.published import fitted_flops_per_token

        prior = size_prior(calibration, target.model_flops_per_token
                           * target.recompute_ratio[recompute or "none"], acc.name,
                           fitted_at=fitted_flops_per_token())
        stack = prior.apply(stack)
    factors = load_factors(d, stack)
    cfg, T = target.cfg, target.seq_len
    e = estimate_run(cfg, T, tokens or 0.0, acc, n_acc, precision, factors, d, given=given,
                     recompute=recompute, peak_flops=peak_flops, published=published)
    lay, steps = e.layout, e.steps
    peak = peak_flops or acc.peak_flops(precision)
    mfu = {case: perf_mfu(st, n_acc, peak) for case, st in steps.items()}
    a = Assumption(
        "mfu", MFU_LABEL, mfu["central"], mfu["worst"], mfu["best"], "", "high",
        f"performance model (estimate/perf.py): layout tp {lay.tp} x pp {lay.pp} x cp {lay.cp} "
        f"x dp {lay.dp}{f' (ep {lay.ep})' if lay.ep > 1 else ''}, {lay.source}; "
        f"{lay.global_batch_tokens:.4g} tokens per step; recompute {e.recompute}; "
        f"stack efficiency {stack.central:.2f} fitted on {fitted.runs} published runs"
        + (f" (x{fitted.planned.central:.2f}: the layout is planned, not published)"
           if planned else "")
        + (f" (x{fitted.fast.central:.2f}: a fast accelerator, >= 500 bf16 TFLOP/s)"
           if is_fast(acc) else "")
        + (f" x{prior.factor:.3f} calibration prior (--from-calibration)" if prior else "")
        + "; range: every factor at its favourable / unfavourable end")
    a.notes += steps["central"].notes
    if prior is not None:
        a.notes += ["calibration prior: " + line for line in prior.lines()]
    w = fitted.basis[hours_basis]
    what = {"compute": "hours count training time only (the basis of hours derived from "
                       "throughput): no failures, goodput 1",
            "wallclock": "the wall-clock factor fitted on published runs whose hours are "
                         "count x elapsed days",
            "unknown": "the factor fitted on published runs whose hours basis is unknown "
                       "(model cards' 'total GPU time')"}[hours_basis]
    gp = Assumption("goodput", "goodput (useful / elapsed time)", w.central, w.low, w.high, "",
                    "high", f"hours basis {hours_basis}: {what} (estimate.crossval; modelled / "
                    f"reported hours): {w.source}")
    return a, gp, Performance(lay, steps, factors, fitted.runs, fitted.wallclock_goodput,
                              e.plan, e.recompute), prior


def _mfu_from_run(run: RunSummary, target: Target, acc: Accelerator, n_acc: int,
                  precision: str, recompute: str, warnings: list[str]) -> tuple[Assumption, str]:
    a = Assumption(
        "mfu", MFU_LABEL, run.mfu_median, min(run.mfu_p10, run.mfu_median),
        max(run.mfu_p90, run.mfu_median), "", "high",
        f"measured: {run.path} (median, p10-p90 of steady steps; {run.world_size} process(es) on "
        f"{run.device}, peak {run.peak_flops_median / 1e12:.3g} TFLOP/s: {run.peak_source})",
    )
    a.notes.append("the p10-p90 range covers step-to-step noise only, not the transfer to another setup")
    if run.on_cpu:
        msg = (f"MFU measured on {run.device} against a CPU peak ({run.peak_source}): a CPU MFU does not "
               f"transfer to a GPU/TPU ({acc.name}); kernels, memory bandwidth and communication "
               "differ. Read this projection as the arithmetic applied to that number, not a forecast")
        a.notes.append(msg)
        warnings.append(msg)
    elif not run.peak_from_catalog:
        msg = (f"MFU measured on {run.device} against a peak that is no datasheet figure "
               f"({run.peak_source}): not comparable with an MFU against {acc.name}'s datasheet peak")
        a.notes.append(msg)
        warnings.append(msg)
    else:
        measured_on = match_device_name(run.device)
        corrected = _size_correction(run, measured_on, target, acc, n_acc, precision, recompute)
        if corrected is not None:
            factor, why = corrected
            a = a.scaled(factor, why)
        elif measured_on is not None and measured_on.name != acc.name:
            msg = (f"MFU measured on {measured_on.name}, projected onto {acc.name}: assumes the same "
                   "fraction of peak is reached on both")
            a.notes.append(msg)
            warnings.append(msg)
    run_prec = precision_named(run.mixed_precision).catalog
    if run_prec != precision:
        msg = (f"run trained in {run_prec}, projection uses the {precision} peak: MFU is assumed to "
               "carry over between precisions")
        a.notes.append(msg)
        warnings.append(msg)
    src_ratio = run.recompute_ratio
    if src_ratio is None:
        src_ratio = 1.0
        a.notes.append("summary.json has no hardware_flops_per_token: the run is taken to have "
                       "used no recomputation")
    tgt_ratio = target.recompute_ratio[recompute]
    if abs(src_ratio - tgt_ratio) > 1e-9:
        factor = src_ratio / tgt_ratio
        a = a.scaled(factor, f"run recomputed {src_ratio:.3f}x model FLOPs, target {tgt_ratio:.3f}x: "
                             f"MFU x{factor:.3f} at the same HFU")
    scale_key = "measured_smaller" if run.world_size < n_acc else "measured_same"
    return a, scale_key


def _size_correction(run: RunSummary, measured_on: Accelerator | None, target: Target,
                     acc: Accelerator, n_acc: int, precision: str,
                     recompute: str) -> tuple[float, str] | None:
    """How the MFU of a GPU run changes on the way to the target, by the performance model:
    the model's MFU for the target over its MFU for the run as it ran (its model, sequence
    length, batch and processes, data parallel). The unmodelled stack efficiency cancels in
    the ratio. None when the run's summary has no model shape or its GPU no catalog entry."""
    from estimate.perf import Layout, load_factors, mfu, step_time
    from estimate.published import UNIT, complete_layout

    section = {k: v for k, v in run.raw.get("model", {}).items() if k != "params"}
    if measured_on is None or target.cfg is None or "d_model" not in section:
        return None
    src = ModelConfig.from_dict(section)
    T = int(run.raw.get("seq_len") or src.seq_len)
    n = run.world_size
    d = load_defaults()
    factors = load_factors(d, UNIT)
    lay = Layout(dp=n, global_batch_tokens=float(run.raw.get("batch_size", n)) * T)
    run_prec = precision_named(run.mixed_precision).catalog
    src_mfu = mfu(step_time(src, T, measured_on, n, lay, run_prec if run_prec != "fp32" else "bf16",
                            "none", factors), n, measured_on.peak_flops(precision))
    batch = float(d["performance"]["default_global_batch_tokens"]["value"])
    tlay = complete_layout(target.cfg, n_acc, acc, target.seq_len, batch, {})
    tgt_mfu = mfu(step_time(target.cfg, target.seq_len, acc, n_acc, tlay, precision, recompute,
                            factors), n_acc, acc.peak_flops(precision))
    factor = tgt_mfu / src_mfu
    return factor, (f"size correction x{factor:.3f}: the performance model gives MFU "
                    f"{src_mfu:.3f} for the run as it ran ({n} x {measured_on.name}, "
                    f"{src.n_layer} layers of {src.d_model}) and {tgt_mfu:.3f} for the target "
                    f"({n_acc} x {acc.name}, layout by rule)")


def _power(d: dict, acc: Accelerator, power_w: Range | None,
           warnings: list[str]) -> Assumption | None:
    label = "power per accelerator"
    if power_w is not None:
        a = _from_cli(power_w, "power_w", label, "W", "low")
        _check_bounds(a, 0.0, 1e5)
        return a
    tdp = acc.get("tdp_w")
    if tdp is None:
        why = (acc.get("missing") or {}).get("tdp_w", "no TDP in the catalog")
        warnings.append(f"energy not computed: {why}")
        return None
    frac = _from_yaml(d, "power_w", label, "W", "low")
    return Assumption("power_w", label, tdp * frac.central, tdp * frac.low, tdp * frac.high,
                      "W", "low",
                      f"{acc.name} TDP {tdp:g} W ({acc.source}) x {frac.low:g}/{frac.central:g}/"
                      f"{frac.high:g}: {frac.source}")
