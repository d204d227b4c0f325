"""A layout planner: the fastest way to lay a training run out on n accelerators that fits.

It searches tensor (tp, within a node), pipeline (pp, with 1F1B, interleaved 1F1B, zero bubble
or DualPipe), context (cp, for long sequences), data (dp) and expert (ep) parallelism, the
micro-batch, the global batch, activation recomputation and ZeRO / FSDP sharding, keeps the
layouts whose memory per device fits (`estimate.memory`), and times the rest with the
performance model (`estimate.perf.step_time`). The fastest per token, failures included
(`perf.goodput` at the accelerators used), wins.

- Any part of the layout may be given (a published run's layout); the planner fills in the rest.
- The planner may use fewer accelerators than it holds (the idle ones are reported), so more
  accelerators are never slower.
- Recomputation and ZeRO stage are not free choices in the model's eyes (more sharding is never
  faster, recomputation only costs), so each layout takes the least of both that fits:
  no recomputation before full, ZeRO-1 (the distributed optimizer of Megatron-LM and
  DeepSpeed) before 2 before 3.
- Global batch: the one given; else the default (defaults.yaml, 4M tokens) or a doubling of it
  (up to 16x), whichever is fastest, up to the compute-optimal batch of DeepSeek LLM's scaling
  law, B_opt = 0.2920 x C^0.3271 tokens for C training FLOPs (DeepSeek-AI 2024, 'DeepSeek LLM',
  arXiv:2401.02954, sec. 3.1; their C is M x D with M the non-embedding FLOPs per token, ours
  counts the LM head too: close enough for a bound). Beyond B_opt a run needs more tokens for
  the same loss, which the model does not count, so the search stops there.
- The fastest wins outright (ties go to the smaller batch, then fewer devices). Data
  parallelism is tried at its largest and at every power of two below, so the candidates at 2n
  include every layout at n (for power-of-two splits) and the chosen time never rises when the
  count doubles.
- The search is pruned by a lower bound: the GEMM FLOPs at the achievable rate on the devices
  used, times the pipeline bubble; candidates are timed in order of that bound until it
  exceeds the best step found.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from estimate.hardware import Accelerator
from estimate.memory import Memory, memory_per_device, usable_bytes
from estimate.perf import Factor, Layout, StepTime, goodput, rates, step_time
from model.config import ModelConfig
from model.flops import count_params, model_flops_per_token

BATCH_DOUBLINGS = 4  # at most 16x the default batch
PRUNE_MARGIN = 0.02  # time candidates whose lower bound is within this of the best found
SEARCHED = ("tp", "pp", "dp", "cp", "ep", "micro_batch", "virtual_stages", "schedule", "zero")


def critical_batch_tokens(flops: float) -> float:
    """DeepSeek LLM's compute-optimal batch size in tokens for C training FLOPs (DeepSeek-AI
    2024, arXiv:2401.02954, sec. 3.1, eq. 1): B_opt = 0.2920 x C^0.3271."""
    return 0.2920 * flops ** 0.3271


@dataclass
class Candidate:
    layout: Layout
    recompute: str
    memory: Memory
    step: StepTime | None = None
    seconds_per_token: float = math.inf  # step / tokens per step / goodput

    def describe(self) -> str:
        lay = self.layout
        sched = lay.schedule if lay.pp > 1 else "no pipeline"
        if lay.pp > 1 and lay.schedule == "1f1b" and lay.virtual_stages > 1:
            sched = f"interleaved 1F1B x{lay.virtual_stages}"
        parts = [f"tp {lay.tp}", f"pp {lay.pp}", f"cp {lay.cp}", f"dp {lay.dp}"]
        if lay.ep > 1:
            parts.append(f"ep {lay.ep}")
        step = f"{self.step.total:.3g} s/step" if self.step else "not timed"
        return (f"{' x '.join(parts)} = {lay.devices} devices, {sched}, micro-batch "
                f"{lay.micro_batch}, {lay.global_batch_tokens / 1e6:.3g}M tokens/step, "
                f"recompute {self.recompute}, ZeRO-{lay.zero}: {step}, "
                f"{self.memory.total / 1e9:.3g} GB/device")


@dataclass
class Plan:
    """The chosen layout, the runner-up and what the search saw."""

    best: Candidate
    runner_up: Candidate | None
    count: int  # accelerators held
    considered: int
    fitting: int
    timed: int
    notes: list[str] = field(default_factory=list)

    @property
    def idle(self) -> int:
        return self.count - self.best.layout.devices

    def lines(self) -> list[str]:
        out = [f"chosen: {self.best.describe()}"]
        if self.runner_up is not None:
            out.append(f"runner-up: {self.runner_up.describe()}")
        out.append(f"searched {self.considered} layouts, {self.fitting} fit in memory, "
                   f"{self.timed} timed")
        return out + self.notes


class DoesNotFit(ValueError):
    """No layout fits the accelerators' memory."""


def _pow2(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def _bubble(pp: int, mb: float, v: int, schedule: str) -> float:
    if pp == 1:
        return 0.0
    if schedule == "dualpipe":
        return max(0.0, pp / 2 - 1) * (2 / 3) / mb
    if schedule == "zero-bubble":
        return (pp - 1) / (3 * mb)
    return (pp - 1) / (mb * v)


def _schedules(pp: int, n_layer: int, given: dict) -> list[tuple[str, int]]:
    """(schedule, virtual stages) pairs to try at pp stages."""
    if pp == 1:
        return [(given.get("schedule") or "1f1b", 1)]
    if "schedule" in given or "virtual_stages" in given:
        sched = given.get("schedule") or "1f1b"
        v = int(given.get("virtual_stages") or (_interleave(n_layer, pp) if sched == "1f1b" else 1))
        return [(sched, v)]
    out = [("1f1b", v) for v in (1, 2, 4, 8) if v * pp <= n_layer]
    out += [("zero-bubble", 1)]
    if pp % 2 == 0:
        out.append(("dualpipe", 1))
    return out


def _schedulable(pp: int, micro_batches: float, v: int, schedule: str, given: dict) -> bool:
    """Interleaved 1F1B needs at least as many micro-batches as stages (Megatron-LM asserts
    that their number is a multiple of pp); DualPipe needs two at least, as its two directions
    each take one (DeepSeek-AI 2024, sec. 3.2.1: stages and micro-batches divisible by 2).
    A schedule that was given is taken as given."""
    if "schedule" in given or "virtual_stages" in given or pp == 1:
        return True
    if schedule == "1f1b" and v > 1:
        return micro_batches >= pp
    if schedule == "dualpipe":
        return micro_batches >= 2
    return True


def _interleave(n_layer: int, pp: int) -> int:
    """Interleaved chunks of about two layers each, for a published pipeline that states no
    chunk count (Narayanan et al. 2021 interleave Megatron's stages so)."""
    return max(1, round(n_layer / pp / 2)) if pp > 1 else 1


def plan(cfg: ModelConfig, seq_len: int, acc: Accelerator, n: int, precision: str,
         factors: dict[str, Factor], *, given: dict | None = None, recompute: str | None = None,
         batch: float | None = None, default_batch: float = 4e6, tokens: float | None = None,
         peak_flops: float | None = None, trust_given: bool = False) -> Plan:
    """The fastest layout of `cfg` at `seq_len` on at most n accelerators that fits in memory.

    `given`: parts of the layout that are fixed (Layout field names); `recompute`: fixed
    recomputation (else none, or full where none does not fit); `batch`: fixed tokens per step
    (else searched from `default_batch` up to the critical batch of `tokens`' compute).
    Raises DoesNotFit, one line with the bytes per device, when no layout fits; with
    `trust_given` (a layout that was published: it ran) the leanest completion of the given
    layout is kept instead, with a note that the memory model finds it too large."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    mem_cap = usable_bytes(float(acc.get("memory_gb") or 80))
    node = acc.node_size()
    f = {k: v.at("central") for k, v in factors.items()}
    rate = rates(acc, precision, f, peak_flops)[0]
    total_params = float(count_params(cfg))
    flops_token = model_flops_per_token(cfg, seq_len)
    matmul_flops_token = model_flops_per_token(cfg, 0)  # 6N
    if batch is not None:
        batches = [float(batch)]
    else:
        top = default_batch
        if tokens:
            top = max(default_batch, critical_batch_tokens(flops_token * tokens))
        batches = [default_batch * 2 ** i for i in range(BATCH_DOUBLINGS + 1)
                   if default_batch * 2 ** i <= top]
    recomputes = [recompute] if recompute else ["none", "full"]

    zeros = [int(given["zero"])] if "zero" in given else [1, 2, 3]
    candidates: list[tuple[float, Candidate]] = []
    considered = 0
    leanest: Candidate | None = None
    good: dict[int, float] = {}  # goodput by devices used
    for lay in _layouts(cfg, seq_len, n, node, batches, given):
        considered += 1
        fit = _least_that_fits(cfg, seq_len, lay, recomputes, zeros, mem_cap, total_params)
        if fit is None:
            c = _leanest(cfg, seq_len, lay, recomputes, total_params)
            if leanest is None or c.memory.total < leanest.memory.total:
                leanest = c
            if not trust_given:
                continue
            fit = c
        # a lower bound of the seconds per token: the GEMMs at the achievable rate, the bubble
        bubble = _bubble(lay.pp, lay.micro_batches(seq_len), lay.virtual_stages, lay.schedule)
        if lay.devices not in good:
            good[lay.devices] = goodput(lay.devices, factors)
        bound = matmul_flops_token / (lay.devices * rate) * (1 + bubble) / good[lay.devices]
        candidates.append((bound, fit))
    if not candidates:
        raise DoesNotFit(_refusal(cfg, acc, n, leanest, mem_cap, total_params))
    candidates.sort(key=lambda x: x[0])
    timed: list[Candidate] = []
    best = math.inf
    for bound, c in candidates:
        if bound > best * (1 + PRUNE_MARGIN) and len(timed) >= 2:
            break
        c.step = step_time(cfg, seq_len, acc, n, c.layout, precision, c.recompute, factors,
                           "central", peak_flops)
        c.seconds_per_token = (c.step.total / c.layout.global_batch_tokens
                               / goodput(c.layout.devices, factors))
        timed.append(c)
        best = min(best, c.seconds_per_token)
    # the fastest; among equally fast ones the smallest batch, then the fewest devices
    ranked = sorted(timed, key=lambda c: (c.seconds_per_token, c.layout.global_batch_tokens,
                                          c.layout.devices))
    chosen = ranked[0]
    runner = next((c for c in ranked if _split(c) != _split(chosen)), None)
    fitting = sum(c.memory.total <= mem_cap for _, c in candidates)
    p = Plan(chosen, runner, n, considered, fitting, len(timed))
    if chosen.memory.total > mem_cap:
        p.notes.append(f"the given layout needs {chosen.memory.total / 1e9:.3g} GB per device "
                       f"by the memory model, more than the {mem_cap / 1e9:.3g} GB usable; it "
                       "is taken as given (it ran: the memory model misses its savings)")
    if p.idle:
        p.notes.append(f"{p.idle} of {n} accelerators left idle: no layout that fits gets "
                       "faster by using them (data parallelism is bounded by the sequences of "
                       "a step, model parallelism by the model's heads, layers and nodes)")
    return p


def _layouts(cfg: ModelConfig, seq_len: int, n: int, node: int, batches: list[float],
             given: dict) -> Iterator[Layout]:
    """Every layout the planner considers: tensor parallel within a node and dividing the
    heads; pipeline stages up to the layers; context parallel down to 8K tokens per device;
    micro-batches of 1 or 2 sequences; data parallel at its largest and every power of two
    below; experts over 8 or more of the ranks they are carved from; each schedule the
    micro-batches allow. What is `given` is fixed."""
    def fixed(key: str, options: list[int]) -> list[int]:
        return [int(given[key])] if key in given else options

    tps = fixed("tp", [t for t in _pow2(min(node, n)) if cfg.n_head % t == 0])
    pps = fixed("pp", _pow2(min(n, cfg.n_layer, 128)))
    cps = fixed("cp", _pow2(min(n, max(1, seq_len // 8192))))
    mbs = fixed("micro_batch", [1, 2])
    for B, tp, pp, cp, mbatch in itertools.product(batches, tps, pps, cps, mbs):
        seqs = B / seq_len
        model_par = tp * pp * cp
        dp_max = min(n // model_par, int(seqs // mbatch))
        for dp in fixed("dp", sorted({dp_max, *_pow2(dp_max)}, reverse=True)):
            if dp < 1 or dp * model_par > n or seqs / (dp * mbatch) < 1:
                continue
            ranks = dp * cp * tp  # expert parallelism is carved from these
            eps = [1] if not cfg.is_moe else [e for e in fixed("ep", [
                e for e in _pow2(min(ranks, cfg.n_experts)) if e >= min(8, ranks)]) if e <= ranks]
            for ep, (sched, v) in itertools.product(eps, _schedules(pp, cfg.n_layer, given)):
                if not _schedulable(pp, seqs / (dp * mbatch), v, sched, given):
                    continue
                yield Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, micro_batch=mbatch,
                             global_batch_tokens=B, virtual_stages=v, schedule=sched,
                             max_nodes_per_token=given.get("max_nodes_per_token"),
                             source="given, completed by the planner" if given else "planned")


def _split(c: Candidate) -> tuple:
    """What makes a layout a different one for the runner-up: the parallel split and schedule."""
    lay = c.layout
    return (lay.tp, lay.pp, lay.cp, lay.dp, lay.ep, lay.schedule, lay.virtual_stages)


def _least_that_fits(cfg, seq_len, lay, recomputes, zeros, cap, total_params) -> Candidate | None:
    for rc in recomputes:
        for z in zeros:
            if z > 0 and lay.dp * lay.cp == 1 and z != zeros[0]:
                break  # nothing to shard over
            m = memory_per_device(cfg, seq_len, lay, rc, total_params, zero=z)
            if m.total <= cap:
                return Candidate(replace(lay, zero=z), rc, m)
    return None


def _leanest(cfg, seq_len, lay, recomputes, total_params) -> Candidate:
    trial = replace(lay, zero=3)
    rc = "full" if "full" in recomputes else recomputes[-1]
    return Candidate(trial, rc, memory_per_device(cfg, seq_len, trial, rc, total_params))


def _refusal(cfg: ModelConfig, acc: Accelerator, n: int, leanest: Candidate | None,
             cap: float, total_params: float) -> str:
    mem = float(acc.get("memory_gb") or 80)
    if leanest is None:
        return (f"no layout of {total_params / 1e9:.4g}B parameters on {n} x {acc.name}: no "
                "split of the model and batch is possible (check the batch and sequence length)")
    lay = leanest.layout
    return (f"does not fit: {total_params / 1e9:.4g}B parameters on {n} x {acc.name} need at "
            f"least {leanest.memory.total / 1e9:.4g} GB per device ({leanest.memory.describe()}; "
            f"leanest layout tp {lay.tp} pp {lay.pp} cp {lay.cp} dp {lay.dp}, ZeRO-3, recompute "
            f"{leanest.recompute}) against {cap / 1e9:.4g} GB usable of {mem:g} GB")
