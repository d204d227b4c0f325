"""`python -m estimate calibrate --parallel`: the performance model's parallel terms, and its
step time, checked on this machine.

**Measured** (`python -m train.parallel.collectives_bench`, started as a command; the estimator
never imports torch): the matmul rate (train.clock's 1024^3 peak, and every matmul shape the
model runs, forward and backward), the memory bandwidth, causal attention, the host seconds
of one dispatched operation and the operations a step dispatches, and on 2 gloo processes
the collectives at several sizes, then each parallel term as it runs: data-parallel gradient
all-reduce, FSDP all-gathers and reduce-scatters, and the pipeline bubble of each schedule
(train.parallel.bench_pp: the share of a step each rank is blocked; with the blocks of each
stage and the stages of each rank the pipeline was split into). Five training runs of this
project's trainer (1 process; DDP, FSDP, tp=2 and cp=2 on 2) give their step times, the tp=2
run the seconds of its tensor-parallel collectives and how many it issued per step, the cp=2
run the seconds of its context-parallel all-gathers and reduce-scatters (metrics.jsonl).

**Link.** Each collective's time (the median of its repeats) at each message size is fitted
as t = alpha + bytes / beta (Hockney's alpha-beta model), bytes being what one rank sends as
the performance model counts it (`perf.sent_bytes`: a ring sends 2(g-1)/g of an all-reduced
message, (g-1)/g of a gathered or scattered one; a message for send/recv), least squares on
relative error (`fit_link`). The fits are this machine's `collective_links`: perf charges
each collective it counts (`perf.tp_step_collectives`, `dp_comm_seconds`, ...) at its own.

**Predicted**, through the same functions `project` uses (`estimate.perf`): each term from
the fitted link of the collective it runs (its latency included), and the step time of each
layout by `perf.step_time` on a "local accelerator" (`local_accelerator`) whose matmul rate
is the one measured at that layout's own matmul shapes, whose memory bandwidth, attention
efficiency and collective links are the ones measured here, with nothing hidden that the run does not
hide (`local_factors`: tensor-parallel collectives fully exposed, the share of compute a
collective hides behind as measured, the stack efficiency 1). A collective a step enters
straight from compute pays the measured arrival skew beside its isolated latency (`in_step`).
A pipeline's stages cost what perf charges them (`perf.step_time`'s `stage_s`: the blocks
the trainer put on each, the embedding on the first, the LM head and loss on the last), and
the bubble is `perf.bubble_fraction` for the ranks' costs. Nothing is fitted to the step
times being predicted.

Verdicts: a term holds when its prediction is within REL_TOL of the measurement; a pipeline
bubble with a formula > 0 likewise, and a schedule whose formula is 0 at this pp (DualPipe at
pp = 2) when its measured bubble is below 1F1B's at the same M. A step time holds when the
prediction is within REL_TOL once stretched by the share of the machine the run had
(`machine_share`: the CPU time other work took during it, measured as the throughput sweep
measures it, for the trainer runs each, for the harness over its whole run); the table shows
the error before and after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contracts.config import load_structured
from contracts.dataset import META, read_dataset_meta
from contracts.measured import DOCS, header
from contracts.measured import publish as publish_table
from contracts.run import RunDir, read_metrics, read_summary
from estimate.assumptions import load_defaults
from estimate.calibrate.sweep import (
    ROOT,
    Runner,
    RunSpec,
    Shape,
    Sweep,
    cpu_info,
    cpu_seconds,
    others_cores,
    run_calibration,
)
from estimate.hardware import Accelerator
from estimate.perf import (
    ADAM_BYTES_PER_PARAM,
    COLLECTIVES,
    Factor,
    Layout,
    Link,
    StepTime,
    bubble_fraction,
    collectives_seconds,
    cp_allgather_seconds,
    cp_kv_width,
    dp_comm_seconds,
    forward_gemms,
    load_factors,
    sent_bytes,
    step_time,
    tp_step_collectives,
)
from estimate.report import md_table
from model.config import ModelConfig, get_preset
from model.flops import _attention_core_flops_forward, count_params

PARALLEL_SWEEP = ROOT / "configs" / "estimate" / "calibrate_parallel.yaml"
PARALLEL_QUICK = ROOT / "configs" / "estimate" / "calibrate_parallel_quick.yaml"
REL_TOL = 0.25
WORLD = 2
FORMAT = 1
KIND = "parallel_calibration"
TITLE = "Parallel terms and step time, predicted and measured"
OPS = COLLECTIVES
# the harness's reduce-scatter as the trainer's tp and cp issue it (train.parallel.comm's: on
# gloo an all-to-all and a local sum, (g-1)/g of the message sent, where gloo's own
# reduce_scatter_tensor, which FSDP2 issues, moves an all-reduce's bytes)
TRAINER_RS = "trainer_reduce_scatter"
# train.parallel.bench_pp's schedules as the performance model names them: (schedule, v)
# (v: the chunks per rank the formula counts; ZB-V and DualPipeV are charged ZB-H1's and
# DualPipe's formulas, their stages placed as the trainer placed them)
PP_SCHEDULES = {"gpipe": ("1f1b", 1), "1f1b": ("1f1b", 1), "interleaved": ("1f1b", 2),
                "zero_bubble": ("zero-bubble", 1), "dualpipev": ("dualpipe", 1)}


@dataclass
class ParallelSweep:
    """The parallel calibration (configs/estimate/calibrate_parallel.yaml documents each field)."""

    train_config: str = "configs/estimate/calibrate_train.yaml"
    model: dict = field(default_factory=lambda: {"preset": "small"})
    n_layer: int = 4
    d_model: int = 256
    seq_len: int = 128
    micro_batch_size: int = 8
    steps: int = 12
    warmup_steps_excluded: int = 4
    harness_steps: int = 4
    harness_warmup: int = 2
    repeats: int = 7
    sizes_bytes: list[int] = field(default_factory=lambda: [16384, 1048576, 16777216])
    schedules: list[str] = field(default_factory=lambda: list(PP_SCHEDULES))
    microbatches: list[int] = field(default_factory=lambda: [4, 8])
    pp_micro_batch: int = 4


def load_parallel_sweep(path: str | Path, steps: int | None = None,
                        repeats: int | None = None) -> ParallelSweep:
    """Read the YAML (unknown keys are errors), apply overrides, check the shape."""
    overrides = [f"{k}={v}" for k, v in (("steps", steps), ("repeats", repeats)) if v is not None]
    s: ParallelSweep = load_structured(ParallelSweep, path, overrides, example="repeats=5")
    if s.n_layer % (2 * WORLD):
        raise ValueError(f"n_layer={s.n_layer} must be a multiple of {2 * WORLD} (balanced "
                         "pipeline stages under every schedule)")
    if s.steps <= s.warmup_steps_excluded + 2:
        raise ValueError(f"steps={s.steps} leaves too few steps after warmup_steps_excluded="
                         f"{s.warmup_steps_excluded}")
    unknown = [x for x in s.schedules if x not in PP_SCHEDULES]
    if unknown:
        raise ValueError(f"schedules {unknown}: valid are {', '.join(PP_SCHEDULES)}")
    if len(set(s.sizes_bytes)) < 2 or min(s.sizes_bytes) < 64:
        raise ValueError(f"sizes_bytes={s.sizes_bytes}: need two different sizes >= 64 bytes "
                         "to fit a link's latency and bandwidth")
    if s.repeats < 1 or s.harness_steps < 1 or s.pp_micro_batch < 1 or not s.microbatches:
        raise ValueError("repeats, harness_steps, pp_micro_batch must be >= 1 and "
                         "microbatches non-empty")
    return s


# --- the link -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkFit:
    """t = latency_s + bytes / bytes_per_s, fitted to the collectives `ops`."""

    ops: tuple[str, ...]
    latency_s: float
    bytes_per_s: float
    residuals: tuple[float, ...]  # measured / fitted time - 1, per point

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s

    @property
    def link(self) -> Link:
        """As estimate.perf takes a collective's link: (bytes/s sent per rank, latency s)."""
        return self.bytes_per_s, self.latency_s

    def to_dict(self) -> dict:
        return {"ops": list(self.ops), "latency_s": self.latency_s,
                "bytes_per_s": self.bytes_per_s, "residuals": list(self.residuals)}


def fit_link(points: list[tuple[float, float]], ops: tuple[str, ...] = ()) -> LinkFit:
    """Least squares on relative error of t = alpha + x / beta over (bytes sent x, seconds t):
    minimise sum((alpha + x/beta) / t - 1)^2, linear in (alpha, 1/beta); a negative alpha
    (noise on a link without latency) is refitted as 0."""
    if len({x for x, _ in points}) < 2 or any(t <= 0 or x <= 0 for x, t in points):
        raise ValueError(f"a link fit needs two different positive sizes and positive times, "
                         f"got {points}")
    # normal equations of rows [1/t, x/t] -> 1
    a11 = sum(1 / t**2 for _, t in points)
    a12 = sum(x / t**2 for x, t in points)
    a22 = sum(x * x / t**2 for x, t in points)
    b1 = sum(1 / t for _, t in points)
    b2 = sum(x / t for x, t in points)
    det = a11 * a22 - a12 * a12
    alpha, inv_beta = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    if alpha < 0 or inv_beta <= 0:
        alpha, inv_beta = 0.0, b2 / a22
    if inv_beta <= 0:
        raise ValueError(f"collective times {points} do not grow with size: no bandwidth to fit")
    fit = LinkFit(ops, alpha, 1 / inv_beta, ())
    return dataclasses.replace(fit, residuals=tuple(t / fit.seconds(x) - 1 for x, t in points))


def in_step(links: dict[str, LinkFit], skew_s: float) -> dict[str, LinkFit]:
    """The links as a training step meets them: each collective entered straight from compute
    pays the measured arrival skew (the harness's `arrival`: waiting for the later rank,
    waking the transport) on top of its isolated latency."""
    return {k: dataclasses.replace(f, latency_s=f.latency_s + skew_s) for k, f in links.items()}


def link_points(collectives: dict, ops: tuple[str, ...]) -> list[tuple[float, float]]:
    """(bytes sent, median seconds) of the harness's `collectives` for `ops` (the trainer's
    reduce-scatter counted as perf counts a reduce-scatter)."""
    return [(sent_bytes("reduce_scatter" if op == TRAINER_RS else op, float(size), WORLD),
             float(t)) for op in ops for size, t in collectives[op].items()]


def trainer_links(links: dict[str, LinkFit]) -> dict[str, LinkFit]:
    """The links of the collectives the trainer's tensor and context parallelism issue: their
    reduce-scatter is train.parallel.comm's (`TRAINER_RS`), where the harness measured it."""
    return {**links, "reduce_scatter": links[TRAINER_RS]} if TRAINER_RS in links else links


# --- the local accelerator ------------------------------------------------------------------

def layout_gemm_rate(cfg: ModelConfig, m_tokens: float, lay: Layout, gemms: list[dict]) -> float:
    """FLOP/s this machine reached on the layout's own matmuls: their FLOPs (forward and the
    two backward matmuls) over their measured seconds, each shape counted as often as the
    model runs it."""
    timed = {(g["m"], g["k"], g["n"]): g["fwd_s"] + g["bwd_s"] for g in gemms}
    flops = seconds = 0.0
    for m, k, n, count in forward_gemms(cfg, m_tokens, lay):
        key = (int(m), int(k), int(n))
        if key not in timed:
            raise ValueError(f"matmul {key} of the layout was not measured")
        flops += count * 3 * 2 * m * k * n
        seconds += count * timed[key]
    return flops / seconds


def attention_efficiency(cfg: ModelConfig, micro_batch: int, attention: dict,
                         rate: float) -> float:
    """The performance model's attention efficiency as measured: the FLOPs `perf.step_time`
    charges one layer's causal attention, forward and backward (x 1/2 causal, x 7/6 flash
    backward), over the measured seconds x the matmul rate."""
    core = _attention_core_flops_forward(cfg, cfg.seq_len, layers=1) * micro_batch * cfg.seq_len
    return 3 * core * 0.5 * (7 / 6) / (attention["fwd_bwd_s"] * rate)


def local_accelerator(rate: float, memory_bytes_per_s: float, link: LinkFit,
                      node: int = WORLD, links: dict[str, LinkFit] | None = None) -> Accelerator:
    """This machine as a catalog entry: its measured fp32 matmul rate, memory bandwidth, link
    (both directions = 2 x one way) and latency, `node` processes in one scale-up domain, and
    each collective's own fitted link (`links`, perf's `collective_links`)."""
    own = {op: [f.bytes_per_s / 1e9, f.latency_s * 1e6] for op, f in (links or {}).items()
           if op in COLLECTIVES}
    return Accelerator("this machine (measured)", {"collective_links": own,
        "vendor": "local", "fp32_tflops": rate / 1e12, "memory_gb": None,
        "memory_bw_gbs": memory_bytes_per_s / 1e9,
        "interconnect_gbs": 2 * link.bytes_per_s / 1e9, "network_gbs": link.bytes_per_s / 1e9,
        "node_size": node, "link_latency_us": link.latency_s * 1e6, "matmul_ceiling": {},
        "tdp_w": None, "network_source": "calibrate --parallel",
        "source": "measured by python -m estimate calibrate --parallel"})


def elementwise_bytes_per_dim(bench: dict, d_model: int, act_bytes: float = 4.0) -> float:
    """The performance model's `elementwise_bytes_per_dim` as measured: the profiled
    memory-bound seconds of a block per token, times the memory bandwidth, per model dimension,
    in the factor's 2-byte units (perf scales it by the activation bytes)."""
    per_token = bench["elementwise"]["s_per_token_layer"] * bench["memory_bytes_per_s"]
    return per_token / d_model * 2 / act_bytes


def local_factors(attention_eff: float, elementwise: float | None = None,
                  dp_overlap: float | None = None) -> dict[str, Factor]:
    """The performance model's factors for this machine: the measured rates stand for the
    achievable ones (ceiling, memory and link efficiencies 1), attention at its measured
    efficiency, the memory-bound bytes per dimension measured (`elementwise`; None: the
    defaults' judgement), the share of compute a collective hides behind as measured
    (`dp_overlap`; None: the defaults'), tensor-parallel collectives fully exposed (gloo's
    block the step), the stack efficiency 1 (nothing fitted); the rest at defaults.yaml's
    central values."""
    f = load_factors(load_defaults(), Factor("stack_efficiency", 1, 1, 1, "high", "local: 1"))
    fixed = {"matmul_ceiling_unknown": 1.0, "memory_efficiency": 1.0, "comm_efficiency": 1.0,
             "tp_exposed": 1.0, "attention_efficiency": attention_eff}
    if elementwise is not None:
        fixed["elementwise_bytes_per_dim"] = elementwise
    if dp_overlap is not None:
        fixed["dp_overlap"] = dp_overlap
    for key, value in fixed.items():
        f[key] = Factor(key, value, value, value, f[key].better, "measured by calibrate --parallel")
    return f


# --- checks -----------------------------------------------------------------------------------

@dataclass
class TermCheck:
    """One term: the performance model's prediction beside the measurement."""

    term: str
    predicted_s: float
    measured_s: float
    tolerance: str
    holds: bool
    note: str = ""
    counts: dict | None = None  # collectives per step: {"issued": the run's, "charged": perf's}

    @property
    def verdict(self) -> str:
        return ("holds" if self.holds else "does not hold here") + f" ({self.tolerance})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"verdict": self.verdict}


def relative_check(term: str, predicted: float, measured: float, note: str = "",
                   counts: dict | None = None) -> TermCheck:
    """Holds when |predicted / measured - 1| <= REL_TOL."""
    return TermCheck(term, predicted, measured, f"+-{REL_TOL:.0%}",
                     abs(predicted / measured - 1) <= REL_TOL, note, counts)


def pipeline_rank_costs(row: dict, stage_s: list[float]) -> list[float]:
    """Each pipeline rank's compute per micro-batch: the predicted costs of the stages the
    harness recorded it holding (`rank_stages`)."""
    return [sum(stage_s[s] for s in held) for held in row["rank_stages"]]


def stage_layers(row: dict) -> tuple[int, ...]:
    """Blocks of each stage the trainer's pipeline built for a bench_pp row."""
    return tuple(b - a for a, b in row["stage_blocks"])


def bubble_checks(rows: list[dict], pp: int = WORLD,
                  stage_costs: Callable[[dict], list[float]] | None = None) -> list[TermCheck]:
    """Each schedule's measured bubble (the mean over ranks of the blocked share of a step)
    against the performance model's b / (1 + b), b = perf.bubble_fraction for the stages the
    trainer built: `stage_costs(row)` is perf's compute per micro-batch of each stage (None:
    equal stages), summed per rank as the row's `rank_stages` place them. A prediction of 0
    (DualPipe at pp = 2 with equal stages) holds when the measured bubble is below 1F1B's at
    the same M."""
    one_f = {r["microbatches"]: statistics.mean(r["bubble"]) for r in rows
             if r["schedule"] == "1f1b"}
    out = []
    for r in rows:
        name, m = r["schedule"], r["microbatches"]
        schedule, v = PP_SCHEDULES[name]
        ranks = pipeline_rank_costs(r, stage_costs(r)) if stage_costs else None
        b = bubble_fraction(schedule, pp, m, v, ranks)
        predicted, measured = b / (1 + b), statistics.mean(r["bubble"])
        term = f"pipeline bubble, {name}, pp={pp} M={m} (share of step)"
        note = (f"perf schedule {schedule!r}" + (f", v={v}" if v > 1 else "")
                + "; blocked share of ranks " + ", ".join(f"{x:.3f}" for x in r["bubble"]))
        if ranks:
            note += (f"; stages' blocks {list(stage_layers(r))}, ranks' stages "
                     f"{r['rank_stages']}: predicted compute per micro-batch of ranks "
                     + ", ".join(f"{x * 1e3:.1f} ms" for x in ranks)
                     + f" (slowest / mean {max(ranks) / statistics.mean(ranks):.2f})")
        if r.get("compute"):  # measured: the ranks' compute shares of the step
            c = r["compute"]
            note += ("; measured compute share of ranks " + ", ".join(f"{x:.3f}" for x in c)
                     + f" (slowest / mean {max(c) / statistics.mean(c):.2f})")
        if predicted > 0:
            out.append(relative_check(term, predicted, measured, note))
        elif m in one_f:
            out.append(TermCheck(term, predicted, measured, f"< 1f1b's {one_f[m]:.3f}",
                                 measured < one_f[m], note))
    return out


@dataclass(frozen=True)
class TrainerRun:
    """What calibrate reads of one of the trainer's runs: the median step seconds after
    warm-up, the cores other work used during it, for a tp run the median seconds of its
    tensor-parallel collectives per step and how many it issued per step (metrics.jsonl), for
    a cp run the median seconds of its context-parallel collectives per step."""

    step_s: float
    others_cores: float | None
    tp_comm_s: float | None = None
    tp_collectives: int | None = None
    cp_comm_s: float | None = None


def term_checks(bench: dict, cfg: ModelConfig, micro_batch: int, links: dict[str, LinkFit],
                tp_run: TrainerRun, cp_run: TrainerRun | None = None,
                stage_costs: Callable[[dict], list[float]] | None = None) -> list[TermCheck]:
    """Every communication term of `bench`, the tensor- and context-parallel ones of the
    trainer's tp and cp runs, and the pipeline bubbles (`bubble_checks`, `stage_costs`)
    beside perf's prediction from the fitted links."""
    params = float(count_params(cfg))
    tokens = micro_batch * cfg.seq_len
    ar, ag, rs = links["all_reduce"], links["all_gather"], links["reduce_scatter"]

    def gathers_and_scatters(term, *args, **kw) -> float:
        """A term of two all-gathers and one reduce-scatter (FSDP, CP's forward and
        backward): 2/3 of it over the all-gather's link, 1/3 over the reduce-scatter's."""
        return sum(share * term(*args, link.bytes_per_s, link.latency_s, **kw)
                   for share, link in ((2 / 3, ag), (1 / 3, rs)))

    def fsdp(net, lat, units):
        return dp_comm_seconds(params, WORLD, 1, WORLD, net, net, 4.0, 3, lat, units=units)

    tp_lay = Layout(tp=WORLD, micro_batch=micro_batch, global_batch_tokens=tokens)
    tp_rows = tp_step_collectives(cfg, cfg.seq_len, tp_lay, 4.0)
    charged = sum(count for _, _, count in tp_rows)
    skew = bench.get("arrival", {}).get("skew_s", 0.0)

    def tp_seconds(with_skew: bool) -> float:
        step = in_step(trainer_links(links), skew if with_skew else 0.0)
        return collectives_seconds(tp_rows, WORLD, {op: f.link for op, f in step.items()})
    checks = [
        relative_check(
            "data-parallel gradient all-reduce (DDP buckets), 2 ranks",
            dp_comm_seconds(params, WORLD, 1, WORLD, ar.bytes_per_s, ar.bytes_per_s, 4.0, 0,
                            ar.latency_s), bench["dp_allreduce_s"],
            f"{params / 1e6:.2f}M fp32 gradients"),
        relative_check(
            "FSDP all-gathers + reduce-scatters, 2 ranks",
            gathers_and_scatters(fsdp, units=cfg.n_layer + 1),
            bench["fsdp"]["all_gather_s"] + bench["fsdp"]["reduce_scatter_s"],
            f"measured {bench['fsdp']['all_gathers']} all-gathers, "
            f"{bench['fsdp']['reduce_scatters']} reduce-scatters; perf charges 1.5x an "
            f"all-reduce and {3 * (cfg.n_layer + 1)} latencies; 2/3 over the all-gather's link, "
            "1/3 over the reduce-scatter's"),
        relative_check(
            "tensor-parallel collectives of a training step, tp=2 (the trainer)",
            tp_seconds(True), tp_run.tp_comm_s,
            f"python -m train parallel.tp=2 (sequence parallel): tp_comm_s, the median step's "
            f"seconds inside its collectives; {tp_run.tp_collectives} issued per step, "
            f"{charged:g} charged by perf.tp_step_collectives ("
            + ", ".join(f"{count:g} x {op} of {nbytes / 1e3:,.1f} KB"
                        for op, nbytes, count in tp_rows) + "), each over its own fitted link "
            "(the reduce-scatters over the trainer's: all-to-all + local sum on gloo) "
            f"with the arrival skew measured here ({skew * 1e6:,.0f} us) added to its latency "
            f"(without it: {tp_seconds(False) * 1e3:.2f} ms); the measure includes the wait for "
            "the slower rank inside each collective",
            {"issued": tp_run.tp_collectives, "charged": charged}),
    ]
    if cp_run is not None and cp_run.cp_comm_s:
        def cp_seconds(with_skew: bool) -> float:
            step = in_step(trainer_links(links), skew if with_skew else 0.0)
            return cp_allgather_seconds(tokens / WORLD, cp_kv_width(cfg), cfg.n_layer, WORLD,
                                        {op: f.link for op, f in step.items()}, 4.0)
        msg = tokens * cp_kv_width(cfg) * 4.0
        checks.append(relative_check(
            "context-parallel exchange of keys and values, cp=2 (the trainer)",
            cp_seconds(True), cp_run.cp_comm_s,
            f"python -m train parallel.cp=2: cp_comm_s, the median step's seconds inside its "
            f"collectives; perf.cp_allgather_seconds (the trainer's all-gather CP, "
            f"Layout.cp_exchange='all-gather'): {cfg.n_layer} x all_gather and {cfg.n_layer} x "
            f"reduce_scatter of {msg / 1e3:,.1f} KB (keys and values of the whole sequence), "
            f"each over its own fitted link with the arrival skew added to its latency "
            f"(without it: {cp_seconds(False) * 1e3:.2f} ms); ring CP would send 3/2 of these "
            "bytes, behind attention"))
    return checks + bubble_checks(bench["pp"]["rows"], stage_costs=stage_costs)


@dataclass
class StepCheck:
    """A layout's step time: perf.step_time on the local accelerator beside the measurement."""

    layout: str
    how: str  # what measured it
    predicted_s: float
    measured_s: float
    parts: dict[str, float]
    note: str = ""
    predicted_default_s: float = 0.0  # memory-bound work at the stream bandwidth (defaults)
    share: float = 1.0  # machine_share(): cores the run needed over the cores others left it

    @property
    def shared_error(self) -> float:
        """The prediction's error with the step stretched by `share`."""
        return self.predicted_s * self.share / self.measured_s - 1

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1

    @property
    def holds(self) -> bool:
        """Within REL_TOL once the cores other work took during the run are accounted for."""
        return abs(self.shared_error) <= REL_TOL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"error": self.error, "shared_error": self.shared_error,
                                           "holds": self.holds}


def machine_share(procs: int, cores: int | None, others: float | None) -> float:
    """How much longer a run of `procs` one-thread processes takes when other work used
    `others` of the machine's `cores` meanwhile (measured: estimate.calibrate.sweep.
    others_cores): procs / (cores - others) when fewer than procs cores were left, else 1."""
    if not cores or others is None:
        return 1.0
    return max(1.0, procs / max(cores - others, 0.25))


def host_ops(bench: dict, lay: Layout, seq_len: int, optimizer: bool = True) -> float:
    """Operations one rank dispatches per step: the harness's count of a one-process training
    step; a pipeline rank runs 1/pp of the model's forward and backward operations per
    micro-batch, for each of its micro-batches (and no optimizer step under bench_pp)."""
    ops = bench["ops_per_step"]
    if lay.pp == 1:
        return float(sum(ops.values()) if optimizer else ops["forward"] + ops["backward"])
    return (ops["forward"] + ops["backward"]) / lay.pp * lay.micro_batches(seq_len) + (
        ops["optimizer"] / lay.pp if optimizer else 0.0)


def local_step(cfg: ModelConfig, lay: Layout, bench: dict, link: LinkFit,
               measured_elementwise: bool = True,
               links: dict[str, LinkFit] | None = None) -> tuple[StepTime, float, float]:
    """perf.step_time of `cfg` laid out as `lay` (fp32, no recomputation) on this machine: the
    local accelerator at the matmul rate measured at the layout's own shapes; with its
    (matmul rate, attention efficiency). `measured_elementwise`: the memory-bound work at its
    profiled rate (`elementwise_bytes_per_dim`), else at the stream bandwidth with
    defaults.yaml's bytes."""
    m_tokens = lay.micro_batch * cfg.seq_len / lay.cp
    rate = layout_gemm_rate(cfg, m_tokens, lay, bench["gemms"])
    acc = local_accelerator(rate, bench["memory_bytes_per_s"], link, links=links)
    eff = attention_efficiency(cfg, lay.micro_batch, bench["attention"], rate)
    elem = elementwise_bytes_per_dim(bench, cfg.d_model) if measured_elementwise else None
    st = step_time(cfg, cfg.seq_len, acc, lay.devices, lay, "fp32", "none",
                   local_factors(eff, elem, bench.get("overlap", {}).get("share")),
                   peak_flops=rate)
    return st, rate, eff


def predict_step(cfg: ModelConfig, lay: Layout, bench: dict, link: LinkFit,
                 optimizer: bool = True, measured_elementwise: bool = True,
                 links: dict[str, LinkFit] | None = None) -> tuple[float, dict]:
    """`local_step`'s step time plus the host time of dispatching the step's operations
    (`host_ops` x the measured seconds per operation): the per-operation overhead `project`
    leaves to the stack efficiency, which on GPUs hides behind the kernels of the previous
    ones and on a CPU core adds to them."""
    st, rate, eff = local_step(cfg, lay, bench, link, measured_elementwise, links)
    parts = {k: getattr(st, k) for k in ("gemm", "attention", "memory", "tp_comm", "dp_comm",
                                         "pp_comm", "cp_comm", "bubble")}
    # bench_pp's measured step time holds no optimizer step: neither does its prediction
    if not optimizer:
        st.memory -= ADAM_BYTES_PER_PARAM * count_params(cfg) / lay.devices / bench["memory_bytes_per_s"]
        parts["memory"] = st.memory
    host = host_ops(bench, lay, cfg.seq_len, optimizer) * bench["dispatch_s_per_op"]
    return st.total + host, parts | {"host dispatch": host, "gemm_rate_flops": rate,
                                     "attention_efficiency": eff}


# --- running it -------------------------------------------------------------------------------

def model_config(s: ParallelSweep, vocab: int) -> ModelConfig:
    extra = {k: v for k, v in s.model.items() if k != "preset"}
    return get_preset(str(s.model["preset"]), **extra, n_layer=s.n_layer, d_model=s.d_model,
                      seq_len=s.seq_len, vocab_size=vocab)


def pipeline_config(s: ParallelSweep, vocab: int) -> ModelConfig:
    """train.parallel.bench_pp's balanced model of the same size (untied, d/64 heads)."""
    return ModelConfig(vocab_size=vocab, seq_len=s.seq_len, n_layer=s.n_layer, d_model=s.d_model,
                       n_head=s.d_model // 64, n_kv_head=s.d_model // 64,
                       ffn_hidden=s.d_model * 8 // 3, tie_embeddings=False)


def harness_spec(s: ParallelSweep, cfg: ModelConfig, pp_cfg: ModelConfig) -> dict:
    """What train.parallel.collectives_bench measures: every matmul shape of the layouts
    predicted, attention at the model's shape, the collectives, the pipeline rows."""
    shapes = set()
    for c, lay in ((cfg, Layout()), (cfg, Layout(tp=WORLD)), (pp_cfg, Layout())):
        mb = s.pp_micro_batch if c is pp_cfg else s.micro_batch_size
        shapes |= {(int(m), int(k), int(n)) for m, k, n, _ in forward_gemms(c, mb * s.seq_len, lay)}
    model = {k: v for k, v in vars(cfg).items() if k != "notes"}
    return {"model": model, "micro_batch": s.micro_batch_size, "repeats": s.repeats,
            "warmup": s.harness_warmup, "steps": s.harness_steps, "gemms": sorted(shapes),
            "attention": [s.micro_batch_size, cfg.n_head, cfg.seq_len, cfg.head_dim],
            "sizes_bytes": s.sizes_bytes,
            "pp": {"schedules": s.schedules, "microbatches": s.microbatches,
                   "mb": s.pp_micro_batch}}


def run_harness(spec: dict, workdir: Path) -> dict:
    """python -m train.parallel.collectives_bench SPEC OUT, as a command; its JSON."""
    spec_path, out = workdir / "harness_spec.json", workdir / "harness.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "train.parallel.collectives_bench", str(spec_path), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start, cpu0 = time.monotonic(), cpu_seconds()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the parallel harness failed (exit {result.returncode}):\n  "
                           f"{' '.join(cmd)}\n{(result.stderr or result.stdout)[-3000:]}")
    bench = json.loads(out.read_text())
    bench["others_cores"] = others_cores(cpu0, cpu_seconds(), time.monotonic() - start)
    return bench


@dataclass
class ParallelCalibration:
    """What calibrate --parallel measured and predicted."""

    sweep: ParallelSweep
    machine: dict
    bench: dict
    links: dict[str, LinkFit]
    terms: list[TermCheck]
    steps: list[StepCheck]
    wall_s: float

    def link_table(self) -> str:
        col = self.bench["collectives"]

        def inputs(ops: tuple[str, ...]) -> str:
            return "; ".join(f"{_size(int(b))} {t * 1e3:.3g}" for op in ops
                             for b, t in col[op].items())
        rows = [[name, ", ".join(f.ops), f"{f.latency_s * 1e6:,.0f}", f"{f.bytes_per_s / 1e9:.2f}",
                 inputs(f.ops) if len(f.ops) == 1 else "(the two above)",
                 " ".join(f"{r:+.0%}" for r in f.residuals)] for name, f in self.links.items()]
        return md_table(["link fit", "collectives", "alpha: latency us",
                         "beta: GB/s sent per rank", "measured: message ms (median)",
                         "residuals (measured/fit - 1)"], rows)

    def terms_table(self) -> str:
        return md_table(["term", "predicted", "measured", "pred/meas", "verdict (tolerance)"],
                        [[t.term, _fmt(t.predicted_s, t.term), _fmt(t.measured_s, t.term),
                          f"{t.predicted_s / t.measured_s:.2f}" if t.measured_s else "-",
                          t.verdict] for t in self.terms])

    def steps_table(self) -> str:
        return md_table(
            ["layout", "measured by", "predicted step ms", "measured step ms", "error",
             "others' load: x share", "error on the cores left", "verdict (+-25%)",
             "memory-bound at stream bandwidth: predicted ms (error)", "predicted parts (ms)"],
            [[s.layout, s.how, f"{s.predicted_s * 1e3:,.1f}", f"{s.measured_s * 1e3:,.1f}",
              f"{s.error:+.0%}", f"x{s.share:.2f}", f"{s.shared_error:+.0%}",
              "holds" if s.holds else "does not hold here",
              f"{s.predicted_default_s * 1e3:,.1f} ({s.predicted_default_s / s.measured_s - 1:+.0%})",
              ", ".join(f"{k} {v * 1e3:.1f}" for k, v in s.parts.items()
                        if not k.endswith(("rate_flops", "efficiency")) and v)]
             for s in self.steps])

    def rates_line(self) -> str:
        b = self.bench
        return (f"matmul 1024^3 peak {b['matmul_peak_flops'] / 1e9:.1f} GFLOP/s per process (1 "
                f"thread); at the model's shapes {self.steps[0].parts['gemm_rate_flops'] / 1e9:.1f}"
                f" GFLOP/s (1 process); memory {b['memory_bytes_per_s'] / 1e9:.1f} GB/s (c = a + b); "
                f"attention at {self.steps[0].parts['attention_efficiency']:.0%} of the matmul rate"
                f"; host dispatch {b['dispatch_s_per_op'] * 1e6:.1f} us per operation (a chain of "
                f"tiny ops), x {sum(b['ops_per_step'].values())} operations per step (train.opcount)"
                + (f"; a collective beside compute hides behind {o['share']:.0%} of it (all-reduce "
                   f"{o['comm_s'] * 1e3:.1f} ms, matmuls {o['compute_s'] * 1e3:.1f} ms, both "
                   f"{o['both_s'] * 1e3:.1f} ms: perf's dp_overlap)" if (o := b.get("overlap"))
                   else "")
                + (f"; an all-gather and a reduce-scatter (the trainer's) of {a['bytes'] / 1e3:g} KB, "
                   f"one after another, each entered from compute (no barrier), take "
                   f"{a['in_step_s'] * 1e6:,.0f} us, entered together {a['isolated_s'] * 1e6:,.0f} us: "
                   f"each collective of a step pays {a['skew_s'] * 1e6:,.0f} us more (arrival skew)"
                   if (a := b.get("arrival")) else ""))

    def load_line(self) -> str:
        """How shared the machine was: the cores other work used during the harness (its
        collectives and terms) and during the trainer runs."""
        others = self.bench.get("others_cores")
        if others is None:
            return "other work on the machine: not measured (no /proc/stat)"
        runs = [round((s.share - 1) * 100) for s in self.steps if s.how.startswith("python -m train")]
        return (f"shared machine: other work used {others:.2f} of its "
                f"{self.machine['logical_cores']} cores during the harness (every timing there is "
                "a median of its repeats); the trainer runs' stretch for it is in the step table "
                f"(x share: up to +{max(runs, default=0)}%)")

    def text(self) -> str:
        m = self.machine
        return "\n".join([
            f"parallel calibration on {m['cpu']} ({m['logical_cores']} logical cores, torch "
            f"{m['torch']}), gloo, {WORLD} processes x 1 thread, {self.wall_s / 60:.1f} min",
            self.load_line(), self.rates_line(), "", self.link_table(), "", self.terms_table(), "",
            self.steps_table()])

    def markdown(self, command: str | None = None) -> str:
        s = self.sweep
        return "\n".join([
            header(TITLE, command),
            f"Machine: {self.machine['cpu']}, {self.machine['logical_cores']} logical cores; "
            f"gloo between {WORLD} local processes of 1 thread; {self.wall_s / 60:.1f} min. "
            f"Model preset `{s.model['preset']}` L{s.n_layer} d{s.d_model}, {s.micro_batch_size} x "
            f"{s.seq_len} tokens per micro-batch, fp32. Method: estimate/calibrate/parallel.py. "
            f"{self.load_line()[0].upper()}{self.load_line()[1:]}.",
            "", "## Rates measured", "", self.rates_line() + ".", "", self.link_table(), "",
            "## Parallel terms: the performance model against the measurement", "",
            "Each prediction comes from `estimate.perf`'s own term functions with the link "
            "fitted to the collective the term runs.", "", self.terms_table(), "",
            *[f"- **{t.term}**: {t.note}" for t in self.terms if t.note], "",
            "## Step time: perf.step_time against the measured step", "", self.steps_table(),
            "", *[f"- **{x.layout}**: {x.note}" for x in self.steps if x.note], ""])

    def record(self) -> dict:
        return {"kind": KIND, "format": FORMAT, "device": "cpu", "backend": "gloo",
                "machine": self.machine, "sweep": dataclasses.asdict(self.sweep),
                "wall_s": self.wall_s, "links": {k: v.to_dict() for k, v in self.links.items()},
                "terms": [t.to_dict() for t in self.terms],
                "steps": [x.to_dict() for x in self.steps], "harness": self.bench}


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:g} KB"


def _fmt(value: float, term: str) -> str:
    return f"{value:.3f}" if "bubble" in term else f"{value * 1e3:,.2f} ms"


def trainer_runs(s: ParallelSweep, data_dir: Path, runs_dir: Path, vocab: int,
                 log: Callable[[str], None]) -> dict[str, TrainerRun]:
    """1 process, and on WORLD processes DDP, FSDP, tensor parallel (tp=WORLD) and context
    parallel (cp=WORLD) of this project's trainer."""
    sweep = Sweep(train_config=s.train_config, model=s.model, seq_len=s.seq_len,
                  micro_batch_size=s.micro_batch_size, steps=s.steps,
                  warmup_steps_excluded=s.warmup_steps_excluded)
    shape, T, mb = Shape(s.n_layer, s.d_model), s.seq_len, s.micro_batch_size
    specs = {"1 process": RunSpec("step", shape, T, mb),
             "DDP, 2 processes": RunSpec("step", shape, T, mb, nproc=WORLD),
             "FSDP, 2 processes": RunSpec("step", shape, T, mb, nproc=WORLD, fsdp=True),
             "tp=2": RunSpec("step", shape, T, mb, nproc=WORLD, tp=WORLD),
             "cp=2": RunSpec("step", shape, T, mb, nproc=WORLD, cp=WORLD)}
    runner = Runner(sweep, data_dir, runs_dir, vocab, total=len(specs), log=log)
    out = {}
    for name, spec in specs.items():
        x = runner.run(spec, 0)
        others = x.others_cores_rounds[-1] if x.others_cores_rounds else None
        tp_s = issued = cp_s = None
        if spec.cp > 1:
            cp_s = float(read_summary(Path(x.run_dirs[-1])).raw["cp_comm_s"]["median"])
        if spec.tp > 1:
            run_dir = Path(x.run_dirs[-1])
            tp_s = float(read_summary(run_dir).raw["tp_comm_s"]["median"])
            records, _ = read_metrics(RunDir(run_dir).metrics)
            counts = {r["tp_collectives"] for r in records
                      if "tp_collectives" in r and r.get("step", 0) > s.warmup_steps_excluded}
            if len(counts) != 1:
                raise RuntimeError(f"{run_dir}: tp_collectives per step {sorted(counts)}: "
                                   "expected one count for every steady step")
            issued = counts.pop()
        out[name] = TrainerRun(x.step_s, others, tp_s, issued, cp_s)
    return out


def calibrate_parallel(s: ParallelSweep, data_dir: str | Path, runs_dir: str | Path,
                       log: Callable[[str], None] = print) -> ParallelCalibration:
    """Measure (harness, trainer runs), fit the links, predict every term and step."""
    data_dir = Path(data_dir).resolve()
    if not (data_dir / META).is_file():
        raise ValueError(
            f"no prepared dataset at {data_dir} (no {META}); prepare one first, e.g.\n"
            f"  {sys.executable} -m data_prep configs/prep/demo.yaml out_dir={data_dir}")
    vocab = read_dataset_meta(data_dir).vocab_size
    cfg, pp_cfg = model_config(s, vocab), pipeline_config(s, vocab)
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log("measuring rates, collectives and parallel terms (train.parallel.collectives_bench)")
    bench = run_harness(harness_spec(s, cfg, pp_cfg), runs_dir)
    log("running the trainer: 1 process; DDP, FSDP, tp=2 and cp=2 on 2 processes")
    measured = trainer_runs(s, data_dir, runs_dir, vocab, log)
    col = bench["collectives"]
    links = {op: fit_link(link_points(col, (op,)), (op,)) for op in OPS}
    links["fsdp"] = fit_link(link_points(col, ("all_gather", "reduce_scatter")),
                             ("all_gather", "reduce_scatter"))
    if TRAINER_RS in col:
        links[TRAINER_RS] = fit_link(link_points(col, (TRAINER_RS,)), (TRAINER_RS,))
    mb, T = s.micro_batch_size, s.seq_len
    # a step enters its collectives from compute: each pays the arrival skew
    step_links = in_step(links, bench.get("arrival", {}).get("skew_s", 0.0))
    pp_cfg = ModelConfig(**{k: v for k, v in bench["pp"]["model"].items() if k != "notes"})

    def pp_layout(row: dict) -> Layout:
        """bench_pp's row as perf lays it out: its stages' blocks as `split` built them
        (bench_pp splits evenly: `parallel.stage_split=even`)."""
        counts = stage_layers(row)
        return Layout(pp=WORLD, micro_batch=s.pp_micro_batch, virtual_stages=len(counts) // WORLD,
                      global_batch_tokens=row["microbatches"] * s.pp_micro_batch * T,
                      stage_layers=counts)

    def stage_costs(row: dict) -> list[float]:
        st, _, _ = local_step(pp_cfg, pp_layout(row), bench, step_links["send_recv"],
                              links=step_links)
        return st.stage_s

    terms = term_checks(bench, cfg, mb, links, measured["tp=2"], measured["cp=2"], stage_costs)
    cores = cpu_info()["logical_cores"]
    harness_share = machine_share(WORLD, cores, bench.get("others_cores"))
    steps = []

    def both(c: ModelConfig, lay: Layout, link: str, optimizer: bool = True):
        link_fit = step_links[link]
        own = trainer_links(step_links) if lay.tp > 1 else step_links  # tp: the trainer's
        pred, parts = predict_step(c, lay, bench, link_fit, optimizer, links=own)
        default, _ = predict_step(c, lay, bench, link_fit, optimizer, measured_elementwise=False,
                                  links=own)
        return pred, parts, default

    for name, lay, link in (
            ("1 process", Layout(micro_batch=mb, global_batch_tokens=mb * T), "all_reduce"),
            ("DDP, 2 processes", Layout(dp=WORLD, micro_batch=mb, global_batch_tokens=WORLD * mb * T,
                                        zero=0), "all_reduce"),
            ("FSDP, 2 processes", Layout(dp=WORLD, micro_batch=mb,
                                         global_batch_tokens=WORLD * mb * T, zero=3), "fsdp"),
            ("tp=2", Layout(tp=WORLD, micro_batch=mb, global_batch_tokens=mb * T), "all_reduce")):
        pred, parts, default = both(cfg, lay, link)
        run = measured[name]
        steps.append(StepCheck(name, "python -m train (summary.json median step_s)", pred,
                               run.step_s, parts, predicted_default_s=default,
                               share=machine_share(lay.devices, cores, run.others_cores)))
    for row in bench["pp"]["rows"]:
        if row["schedule"] != "1f1b":
            continue
        M = row["microbatches"]
        pred, parts, default = both(pp_cfg, pp_layout(row), "send_recv", optimizer=False)
        steps.append(StepCheck(f"pp=2 1f1b M={M}", "bench_pp's measure (forward + backward)",
                               pred, max(row["step_s"]), parts,
                               "bench_pp times forward and backward without an optimizer step; "
                               "the prediction leaves out perf's optimizer traffic likewise; "
                               f"stages of {list(stage_layers(row))} blocks as bench_pp split "
                               "them (even), the last with the LM head and loss",
                               predicted_default_s=default, share=harness_share))
    return ParallelCalibration(s, cpu_info(), bench, links, terms, steps,
                               time.monotonic() - started)


def run_parallel_cli(sweep_path: str | Path, data: str, out: str | None, steps: int | None,
                     repeats: int | None, publish: bool = False, command: str | None = None) -> int:
    """`calibrate --parallel`: run, print, write DIR/report.md + parallel_calibration.json,
    and with `publish` docs/measured/calibration-parallel-DATE.md."""
    from estimate.report import write_outputs

    sweep = load_parallel_sweep(sweep_path, steps=steps, repeats=repeats)

    def write(cal: ParallelCalibration, out_dir: Path) -> str:
        return ", ".join(map(str, write_outputs(out_dir, cal.markdown(command), cal.record())))

    return run_calibration(lambda runs_dir: calibrate_parallel(sweep, data, runs_dir), out,
                           "calibrate-parallel-", write,
                           (lambda cal: publish_parallel(cal, command)) if publish else None)


def publish_parallel(cal: ParallelCalibration, command: str | None = None,
                     directory: Path = DOCS) -> Path:
    return publish_table("calibration-parallel", cal.markdown(command), directory)


# --- project --from-calibration ---------------------------------------------------------------

PARALLEL_FILE = KIND + ".json"


@dataclass(frozen=True)
class CheckedTerms:
    """What `project --from-calibration DIR` says of DIR/parallel_calibration.json: which of
    the performance model's parallel terms and layouts were checked, on which hardware."""

    path: Path
    hardware: str
    terms: tuple[tuple[str, str], ...]  # (term, verdict)
    steps: tuple[tuple[str, float, bool], ...]  # (layout, error on the cores left, holds)

    def lines(self) -> list[str]:
        held = sum(v.startswith("holds") for _, v in self.terms)
        out = [f"parallel terms checked on {self.hardware} ({self.path}): {held} of "
               f"{len(self.terms)} hold"]
        out += [f"  {t}: {v}" for t, v in self.terms]
        out += [f"  step time, {layout}: predicted {err:+.0%} of measured (on the cores the "
                "run had)" + ("" if ok else ", outside +-25%") for layout, err, ok in self.steps]
        out.append("  not checked there: expert-parallel all-to-all, multi-node links, "
                   "overlap of communication with GPU kernels; the projection's link and "
                   "matmul figures come from the accelerator's catalog entry, not from this check")
        return out


def read_checked_terms(directory: str | Path) -> CheckedTerms | None:
    """DIR/parallel_calibration.json as CheckedTerms; None when DIR has none; a one-line
    error names a file that is not one."""
    path = Path(directory) / PARALLEL_FILE
    if not path.is_file():
        return None
    try:
        r = json.loads(path.read_text())
        if r.get("kind") != KIND or r.get("format") != FORMAT:
            raise ValueError(f"kind {r.get('kind')!r} format {r.get('format')!r}")
        m = r["machine"]
        hardware = (f"{m['cpu']}, {m['logical_cores']} logical cores, {r['backend']} between "
                    f"{WORLD} processes, torch {m['torch']}")
        terms = tuple((t["term"], t["verdict"]) for t in r["terms"])
        steps = tuple((x["layout"], float(x.get("shared_error", x["error"])), bool(x["holds"]))
                      for x in r["steps"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--from-calibration: {path} is no parallel calibration record "
                         f"({e})") from None
    return CheckedTerms(path, hardware, terms, steps)
