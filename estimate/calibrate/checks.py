"""The five assumptions of a projection, each measured by the sweep: compute proportional to N,
the cost of full recomputation, the attention share, the bf16 speed-up and data-parallel
efficiency. Ratios are taken round by round (the runs of a round ran next to each other), then
their median; `estimate.throughput_fit` holds the arithmetic."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from estimate.calibrate.sweep import Measured, RunSpec, Sweep
from estimate.throughput_fit import attention_share_from_times, loglog_slope, within

REL_TOL = 0.25  # relative tolerance of the checks that compare a ratio or share


@dataclass
class Check:
    """One assumption as measured: the verdict is 'holds' within the stated tolerance."""

    assumption: str
    expectation: str
    measured: str
    holds: bool
    tolerance: str
    note: str = ""
    values: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return ("holds" if self.holds else "does not hold here") + f" ({self.tolerance})"


def per_round(f: Callable[..., float], *runs: Measured) -> list[float]:
    """f of the runs' step times, round by round: the runs of a round ran next to each other,
    so a ratio within a round sees one state of a shared machine."""
    return [f(*(x.step_s_rounds[r] for x in runs)) for r in range(len(runs[0].step_s_rounds))]


def _spread(values: list[float], fmt: str) -> str:
    """' (rounds LOW..HIGH)' when there is more than one round."""
    if len(values) < 2:
        return ""
    return f" (rounds {format(min(values), fmt)}..{format(max(values), fmt)})"


def assumption_checks(m: dict[str, Measured], sweep: Sweep, machine: dict) -> list[Check]:
    """The five assumptions of a projection, each measured from a series or from pairs of runs
    (ratios round by round, then their median)."""
    med = statistics.median
    fit_runs = sorted((x for x in m.values() if x.spec.role == "fit"), key=lambda x: x.n_6n)
    ref_key = RunSpec("fit", sweep.reference, sweep.seq_len, sweep.micro_batch_size,
                      threads=sweep.threads).name
    ref = m[ref_key]
    by_role = {x.spec.role: x for x in m.values() if x.spec.role not in ("fit", "held_out")}
    checks = []

    # 1. compute (and so time, at fixed tokens) proportional to N
    slope = loglog_slope([x.n_6n for x in fit_runs], [x.step_s for x in fit_runs])
    small, big = fit_runs[0], fit_runs[-1]
    checks.append(Check(
        "time per token proportional to N (compute = 6N per token)",
        "C ~ 6N per token (Kaplan et al. 2020): at fixed tokens, step time grows like N, "
        "log-log slope 1",
        f"slope {slope:.2f} over {len(fit_runs)} sizes; N x{big.n_6n / small.n_6n:.1f} "
        f"({small.spec.shape.label} to {big.spec.shape.label}) gave step time "
        f"x{big.step_s / small.step_s:.2f} (model FLOPs x"
        f"{big.model_flops_per_token / small.model_flops_per_token:.2f})",
        abs(slope - 1) <= 0.15, "slope 1 +- 0.15",
        "slope below 1: small models reach a lower FLOP/s (small matmuls, per-op overhead), so "
        "time grows more slowly than N; the fit's a + b F describes exactly that"
        if slope < 0.85 else "",
        {"slope": slope, "n_ratio": big.n_6n / small.n_6n, "time_ratio": big.step_s / small.step_s}))

    # 2. full recomputation: against the textbook +33% and against our own FLOP count
    rc = by_role["recompute"]
    overheads = per_round(lambda t_rc, t_ref: t_rc / t_ref - 1, rc, ref)
    over = med(overheads)
    flops_over = rc.hardware_flops_per_token / rc.model_flops_per_token - 1
    measured = f"step time +{over:.0%}{_spread(overheads, '+.0%')} at {ref.spec.shape.label}"
    checks.append(Check(
        "full recomputation costs one more forward pass",
        "+33% compute (Chen et al. 2016; Korthikanti et al. 2022 sec. 4)",
        measured, within(over, 1 / 3, REL_TOL), f"+33% +- {REL_TOL:.0%} of it", "",
        {"time_overhead": over, "time_overhead_rounds": overheads, "expected_overhead": 1 / 3}))
    checks.append(Check(
        "recomputation time = recomputed FLOPs",
        f"+{flops_over:.0%} executed FLOPs (model/flops.py: non-reentrant checkpoint skips "
        "each block's last matmul)",
        measured, within(over, flops_over, REL_TOL), f"+{flops_over:.0%} +- {REL_TOL:.0%} of it",
        "time above the FLOP count: the recomputed forward also re-runs the memory-bound "
        "elementwise work (RMSNorm, RoPE, SiLU, softmax, residual adds) that FLOPs do not count, "
        "a larger share of a step on a CPU than on a GPU" if over > flops_over * (1 + REL_TOL)
        else "",
        {"time_overhead": over, "hardware_flops_overhead": flops_over}))

    # 3. attention share, from the time a longer sequence adds at fixed tokens per step (the
    # linear layers then multiply matrices of the same shape: micro-batch x T is unchanged)
    ls = by_role["long_seq"]
    T0, T1 = ref.spec.seq_len, ls.spec.seq_len
    d = sweep.reference.d_model
    attention = ls.model_flops_per_token - 6 * ls.n_6n
    expected = attention / ls.model_flops_per_token
    causal = (attention / 2) / (6 * ls.n_6n + attention / 2)
    shares = per_round(lambda t0, t1: attention_share_from_times(t0, t1, T0, T1), ref, ls)
    share = med(shares)
    checks.append(Check(
        f"attention share of compute at T={T1}",
        f"12LdT/(6N+12LdT); about T/(T+6d) = {T1 / (T1 + 6 * d):.0%} for a large model "
        f"(N ~ 12Ld^2), {expected:.0%} for this one (its embedding and LM head are a large "
        "part of N)",
        f"{share:.0%}{_spread(shares, '.0%')} of step time (T {T0} -> {T1} at fixed tokens: "
        f"step time x{ls.step_s / ref.step_s:.2f}, model FLOPs "
        f"x{ls.model_flops_per_token / ref.model_flops_per_token:.2f})",
        within(share, expected, REL_TOL), f"{expected:.0%} +- {REL_TOL:.0%} of it",
        "12LdT counts the full score matrix (PaLM's convention); PyTorch's causal flash "
        "attention kernel skips the key blocks above the diagonal, up to about half of it, "
        f"which would give a share of {causal:.0%}",
        {"share": share, "share_rounds": shares, "expected_share": expected,
         "causal_half_share": causal, "large_model_share": T1 / (T1 + 6 * d)}))

    # 4. bf16 speed-up
    bf = by_role["bf16"]
    speedups = per_round(lambda t_ref, t_bf: t_ref / t_bf, ref, bf)
    speedup = med(speedups)
    peak_ratio = med(bf.peak_flops_rounds) / med(ref.peak_flops_rounds)
    units = ", ".join(machine["bf16_units"]) or "none"
    checks.append(Check(
        "bf16 mixed precision speeds training up",
        "~2x matmul throughput where bf16 units exist (tensor cores, AMX; Kalamkar et al. 2019)",
        f"x{speedup:.2f}{_spread(speedups, '.2f')} throughput vs fp32 (1024^3 matmul peak "
        f"x{peak_ratio:.2f})",
        speedup >= 2 * (1 - REL_TOL), f">= {2 * (1 - REL_TOL):.1f}x",
        f"this CPU's bf16 units: {units}" + (
            "; without AMX or avx512_bf16, bf16 matmuls are emulated (converted to fp32 and "
            "back), so bf16 is slower here; on an A100/H100 or a CPU with AMX the published "
            "speed-up applies" if not machine["bf16_units"] else ""),
        {"speedup": speedup, "speedup_rounds": speedups, "peak_ratio": peak_ratio,
         "bf16_units": machine["bf16_units"]}))

    # 5. data-parallel efficiency: N processes of one micro-batch each vs one process
    dp = by_role["dp"]
    n = dp.spec.nproc
    effs = per_round(lambda t_ref, t_dp: t_ref / t_dp, ref, dp)  # N x the tokens in t_dp
    eff = med(effs)
    note = (f"{n} processes x {dp.spec.threads} thread, each with the reference's micro-batch, "
            f"vs 1 process x {ref.spec.threads} thread")
    values = {"efficiency": eff, "efficiency_rounds": effs}
    if "threads" in by_role:
        th = by_role["threads"]
        thread_eff = med(per_round(lambda t_ref, t_th: t_ref / (n * t_th), ref, th))
        dp_vs = med(per_round(lambda t_dp, t_th: n * t_th / t_dp, dp, th))
        note += (f"; the same {n} cores as 1 process x {th.spec.threads} threads (intra-op "
                 f"parallelism) give {thread_eff:.0%}, so data parallelism runs at x{dp_vs:.2f} "
                 "the tokens/s of threading here")
        values |= {"thread_efficiency": thread_eff, "dp_over_threads": dp_vs}
    cores = machine["logical_cores"] or 0
    if n * dp.spec.threads > cores:
        note += f"; WARNING: {n * dp.spec.threads} threads on {cores} cores"
    checks.append(Check(
        f"data-parallel efficiency, 1 -> {n} processes",
        "near-linear, >= 90%: DDP overlaps the gradient all-reduce with backward (Li et al. "
        "2020); Llama 3 lost 7% per GPU from 8K to 16K GPUs (Llama Team 2024, table 4)",
        f"{eff:.0%}{_spread(effs, '.0%')} (tokens/s x{n * eff:.2f} with {n} processes)",
        eff >= 0.80, ">= 80%", note, values))
    return checks
