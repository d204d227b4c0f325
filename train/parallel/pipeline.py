"""Pipeline parallelism: the Transformer split at block boundaries into stages, run by one of
the schedules torch.distributed.pipelining ships, each stage's compute clocked.

The model file knows nothing of this. `split` takes a built `Transformer` and wraps slices of
it in `StageModule`s: the first stage holds the token embedding, every stage a run of blocks,
the last the final norm and the LM head, whose loss is the pipelining API's `loss_fn` (the
model's chunked linear + cross-entropy, divided by the step's token count as the trainer's
loss is). Parameter names stay the full model's (`blocks.5.attn.wo.weight`), so a stage's
state dict is a slice of the model's.

Schedules, and how many stages each rank holds (v):
| name | torch class | v | stage placement |
|---|---|---|---|
| gpipe | ScheduleGPipe | 1 | rank r: stage r |
| 1f1b | Schedule1F1B (Narayanan et al. 2021, PipeDream-Flush) | 1 | rank r: stage r |
| interleaved | ScheduleInterleaved1F1B (Narayanan et al. 2021, sec. 2.2) | 2 | rank r: r, r+p |
| zero_bubble | ScheduleZBVZeroBubble (Qi et al. 2024, ZB-V, sec. 6) | 2 | V: rank r: r, 2p-1-r |
| dualpipev | ScheduleDualPipeV (DeepSeek-V3 report's DualPipe, V form) | 2 | V: rank r: r, 2p-1-r |

Tied input/output embeddings: the first and the last stage each hold a copy of the matrix
(the same Parameter when one rank holds both, as under the V schedules); `step` sums the two
copies' gradients across their ranks (Megatron-LM's embedding group), so the copies, equal at
the start, take the same optimizer updates.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
    schedules,
)

from model.config import ModelConfig
from model.flops import piece_flops_per_token
from model.transformer import Transformer, compute_dtype, linear_cross_entropy

# name -> (schedule class, stages per rank, placement style of torch's stage-to-rank mapping)
SCHEDULES: dict[str, tuple[type, int, str]] = {
    "gpipe": (ScheduleGPipe, 1, "loop"),
    "1f1b": (Schedule1F1B, 1, "loop"),
    "interleaved": (ScheduleInterleaved1F1B, 2, "loop"),
    "zero_bubble": (ScheduleZBVZeroBubble, 2, "v"),
    "dualpipev": (ScheduleDualPipeV, 2, "v"),
}


def stages_per_rank(schedule: str) -> int:
    """v: how many model chunks (stages) each pipeline rank holds under `schedule`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule={schedule!r} is not one of {sorted(SCHEDULES)}")
    return SCHEDULES[schedule][1]


def rank_stages(schedule: str, pp: int, pp_rank: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, in increasing order: stage s on rank
    s % pp for looped schedules; r and 2pp-1-r for V schedules (both ends of the model on
    rank 0, so it computes the loss right after the embedding's chunk)."""
    v = stages_per_rank(schedule)
    if SCHEDULES[schedule][2] == "v":
        return sorted({pp_rank, 2 * pp - 1 - pp_rank})
    return [pp_rank + i * pp for i in range(v)]


STAGE_SPLITS = ("even", "balanced")


def block_ranges(n_layer: int, n_stages: int) -> list[range]:
    """Blocks of each stage: contiguous, as even as possible, the extra blocks on the first
    stages (the last one also runs the LM head and the loss)."""
    if n_layer < n_stages:
        raise ValueError(
            f"pipeline of {n_stages} stages needs model.n_layer >= {n_stages}, got {n_layer}")
    base, extra = divmod(n_layer, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in pairwise(bounds)]


def balanced_ranges(blocks: list[float], first: float, last: float, n_stages: int) -> list[range]:
    """Blocks of each stage, contiguous, at least one each, so that the costliest stage costs
    as little as block granularity allows: stage cost = its blocks' costs, plus `first` on
    the first stage (the embedding) and `last` on the last (final norm, LM head and loss).
    Llama 3 balances its pipeline the same way, one layer fewer on the first and the last
    stage (Dubey et al. 2024, "The Llama 3 Herd of Models", sec. 3.3.2). Exact minimax by
    dynamic programming over (stage, blocks so far); among the splits with that maximum, the
    one with the smaller sum of squared stage costs found along the way."""
    n = len(blocks)
    if n < n_stages:
        raise ValueError(f"pipeline of {n_stages} stages needs model.n_layer >= {n_stages}, got {n}")
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (first if s == 0 else 0.0) + (last if s == n_stages - 1 else 0.0)

    # best[s][j]: (max, sum of squares, start of stage s) of stages 0..s over blocks [0, j)
    best: list[dict[int, tuple[float, float, int]]] = [{} for _ in range(n_stages)]
    for j in range(1, n - n_stages + 2):
        c = cost(0, 0, j)
        best[0][j] = (c, c * c, 0)
    for s in range(1, n_stages):
        for j in range(s + 1, n - n_stages + s + 2):
            options = []
            for i, (mx, sq, _) in best[s - 1].items():
                if i < j:
                    c = cost(s, i, j)
                    options.append((max(mx, c), sq + c * c, i))
            best[s][j] = min(options)
    bounds, j = [n], n
    for s in range(n_stages - 1, 0, -1):
        j = best[s][j][2]
        bounds.append(j)
    bounds.append(0)
    return [range(a, b) for a, b in pairwise(reversed(bounds))]


def stage_ranges(cfg: ModelConfig, n_stages: int, how: str = "even") -> list[range]:
    """Blocks of each of `n_stages` stages: `even` (`block_ranges`), or `balanced` by training
    FLOPs per token from the model's shape (`balanced_ranges`, `model.flops.piece_flops_per_token`)."""
    if how == "even":
        return block_ranges(cfg.n_layer, n_stages)
    if how != "balanced":
        raise ValueError(f"parallel.stage_split={how!r} is not one of {list(STAGE_SPLITS)}")
    embedding, blocks, head = piece_flops_per_token(cfg)
    return balanced_ranges(blocks, embedding, head, n_stages)


class _HeadLoss(torch.autograd.Function):
    """`linear_cross_entropy` (the model's chunked LM head + cross-entropy, which computes
    its gradients in the forward pass) with a backward that may run twice. Zero-bubble and
    DualPipeV schedules split a stage's backward into an input pass and a weight pass
    (`stage_backward_input`, then `stage_backward_weight`), and both run this node: the
    model's own backward scales its saved gradients in place, so a second run is refused;
    this one returns scaled copies. The gradients are the model function's own (taken by
    autograd inside the forward), so the arithmetic is not written twice."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk):
        with torch.enable_grad():
            h_, w_ = h.detach().requires_grad_(), weight.detach().requires_grad_()
            loss = linear_cross_entropy(h_, w_, targets, dtype, chunk)
            grad_h, grad_w = torch.autograd.grad(loss, (h_, w_))
        ctx.save_for_backward(grad_h, grad_w)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
                None, None, None)


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: [token embedding] -> blocks[lo:hi] -> [final norm];
    takes token ids (first stage) or the residual stream [B, T, d], returns the residual
    stream (the last stage's, normed, is what the LM head and loss read)."""

    def __init__(self, model: Transformer, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        self.tok_emb = model.tok_emb if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:
            x = self.tok_emb(x)
        T, dtype = x.size(1), compute_dtype(x)
        cos, sin = self.rope_cos[:T].to(dtype), self.rope_sin[:T].to(dtype)
        for block in self.blocks.values():
            x = block(x, cos, sin)
        return self.norm(x) if self.norm is not None else x


class ClockedStage(PipelineStage):
    """A PipelineStage that adds up the seconds its computations take, by kind (`busy`:
    forward, backward, and the weight half of a split backward under zero-bubble and
    DualPipeV); what a step spends outside them is waiting (the bubble, exposed
    point-to-point transfers) or the schedule's own bookkeeping."""

    busy: dict[str, float]

    @contextlib.contextmanager
    def _busy(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.busy[kind] = self.busy.get(kind, 0.0) + time.perf_counter() - start

    @property
    def busy_s(self) -> float:
        return sum(getattr(self, "busy", {}).values())

    def forward_one_chunk(self, *args, **kwargs):
        with self._busy("forward"):
            return super().forward_one_chunk(*args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        with self._busy("backward"):
            return super().backward_one_chunk(*args, **kwargs)

    def backward_weight_one_chunk(self, *args, **kwargs):
        with self._busy("weight"):
            return super().backward_weight_one_chunk(*args, **kwargs)


class _Blocked:
    """Seconds this process spends blocked in the schedules' point-to-point waits
    (`torch.distributed.pipelining.schedules._wait_batch_p2p`, through which the torch
    schedules wait for a send or a receive): time a stage sits idle for its neighbour,
    the transfer included. Installed once per process; `Pipeline.step` reads it per step."""

    seconds = 0.0
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        wait = schedules._wait_batch_p2p

        def timed_wait(work):
            start = time.perf_counter()
            try:
                return wait(work)
            finally:
                cls.seconds += time.perf_counter() - start

        schedules._wait_batch_p2p = timed_wait
        cls.installed = True


@dataclass
class StepClock:
    """One rank's clock of one pipeline step: the step's wall time (from a barrier before it
    to a barrier after, so every rank measures the same step), its compute by kind, and the
    time it sat blocked: in point-to-point waits and in the closing barrier (a stage that
    finishes before the others, as the last one does in the drain). `comm_s`: the tied
    embedding's gradient sum and the loss's all-reduce after the step (exposed, outside
    step_s)."""

    step_s: float
    busy_s: float
    blocked_s: float = 0.0
    compute: dict[str, float] = field(default_factory=dict)  # forward, backward, weight, loss
    comm_s: float = 0.0

    @property
    def idle_s(self) -> float:
        return max(self.step_s - self.busy_s, 0.0)

    @property
    def bubble(self) -> float:
        """Fraction of the step this rank did not compute (compute clocks only): the bubble
        plus the schedule's own work, an upper bound of the bubble."""
        return self.idle_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def blocked(self) -> float:
        """Fraction of the step this rank waited for a peer: the bubble as measured, the
        schedule's own per-micro-batch work counted as the stage's work (as the formula
        counts a stage's whole time per micro-batch)."""
        return min(self.blocked_s / self.step_s, 1.0) if self.step_s > 0 else 0.0

    @property
    def overhead_s(self) -> float:
        """Neither compute nor blocked: the schedule's bookkeeping, splitting the batch into
        micro-batches, posting transfers."""
        return max(self.step_s - self.busy_s - self.blocked_s, 0.0)


def bubble_formula(schedule: str, pp: int, microbatches: int) -> float | None:
    """The idle fraction of a step a schedule's analysis predicts with equal stages:
    (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) for interleaved 1F1B with v chunks per
    rank (Narayanan et al. 2021, sec. 2.2: bubble time (p-1)/m, and (1/v)(p-1)/m interleaved,
    of the ideal time); None for zero-bubble and DualPipeV, whose bubble depends on how the
    backward splits into its input and weight halves (zero when F = B = W, Qi et al. 2024)."""
    p, m, v = pp, microbatches, stages_per_rank(schedule)
    if schedule in ("gpipe", "1f1b", "interleaved"):
        return (p - 1) / (v * m + p - 1)
    return None


@dataclass
class Pipeline:
    """This rank's part of a pipeline-parallel model: its stages, their modules (one
    nn.ModuleList, for the optimizer and the state dict) and the schedule that runs them."""

    schedule_name: str
    schedule: object
    stages: list[ClockedStage]
    module: nn.ModuleList
    group: dist.ProcessGroup
    tied: nn.Parameter | None = None  # this rank's copy of a tied embedding, when it holds one
    tied_group: dist.ProcessGroup | None = None  # the ranks whose copies are summed
    loss_s: list[float] = field(default_factory=lambda: [0.0])
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (h, targets) -> loss sum
    width: int = 0  # the residual stream's width, d_model: what one stage sends the next
    ranges: list[range] = field(default_factory=list)  # every stage's blocks, by stage index

    @property
    def has_last(self) -> bool:
        return any(stage.is_last for stage in self.stages)

    def step(self, idx: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, StepClock]:
        """Forward and backward of one batch [B, T] in M micro-batches; gradients accumulate
        in the stage modules as if the whole model had run (loss_sum / tokens).backward(),
        `tokens` being the step's target count (by default this batch's; under data
        parallelism pass the count over every replica, then sum gradients with `reduce_dp`).
        Returns the step's loss, the mean cross-entropy per target token (the same on every
        pipeline rank), and this rank's clock of the step."""
        m = self.schedule._n_microbatches
        if idx.size(0) % m:
            raise ValueError(f"batch of {idx.size(0)} sequences does not split into "
                             f"parallel.microbatches={m} equal micro-batches")
        if tokens is None:
            tokens = (targets != -100).sum()
        tokens = tokens.clamp(min=1).to(torch.float32)
        for stage in self.stages:
            stage.busy = {}
        self.loss_s[0] = 0.0
        _Blocked.install()
        losses: list[torch.Tensor] = []
        dist.barrier(group=self.group)
        start, blocked = time.perf_counter(), _Blocked.seconds
        self.schedule.step(idx, target=targets, losses=losses, return_outputs=False,
                           loss_kwargs={"tokens": tokens})
        done = time.perf_counter()
        dist.barrier(group=self.group)
        end = time.perf_counter()
        compute = {"forward": 0.0, "backward": 0.0, "weight": 0.0, "loss": self.loss_s[0]}
        for stage in self.stages:
            for kind, seconds in stage.busy.items():
                compute[kind] += seconds
        clock = StepClock(end - start, sum(compute.values()),
                          _Blocked.seconds - blocked + (end - done), compute)
        if self.tied_group is not None:
            dist.all_reduce(self.tied.grad, group=self.tied_group)
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros(())
        # the last stage's rank holds the loss; its pipeline peers hold zeros
        dist.all_reduce(loss, group=self.group)
        clock.comm_s = time.perf_counter() - end
        return loss, clock

    def stage_rank(self, stage: int) -> int:
        """The pipeline rank (in `group`) that holds stage `stage`."""
        pp = dist.get_world_size(self.group)
        if SCHEDULES[self.schedule_name][2] == "v":
            return stage if stage < pp else 2 * pp - 1 - stage
        return stage % pp

    @torch.no_grad()
    def forward_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of a batch [B, T], forward only (evaluation): stage after
        stage, each stage's output sent to the next stage's rank; the same on every rank of
        the pipeline afterwards."""
        me, n = dist.get_rank(self.group), self.stages[0].num_stages
        mine = {stage.stage_index: stage.submod for stage in self.stages}
        h = idx
        for s in sorted(mine):
            if s > 0 and self.stage_rank(s - 1) != me:
                h = torch.empty((*idx.shape, self.width), device=idx.device)
                dist.recv(h, group=self.group, group_src=self.stage_rank(s - 1))
            h = mine[s](h)
            if s < n - 1 and self.stage_rank(s + 1) != me:
                dist.send(h.float().contiguous(), group=self.group, group_dst=self.stage_rank(s + 1))
        loss = self.head(h, targets) if n - 1 in mine else torch.zeros((), device=idx.device)
        loss = loss.detach().float()
        dist.all_reduce(loss, group=self.group)
        return loss

    def reduce_dp(self, dp_group: dist.ProcessGroup) -> None:
        """Sum every gradient over the data-parallel replicas of this rank's stages (each
        replica's loss was already divided by the global token count)."""
        for p in self.module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=dp_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm (every stage's, over the pipeline group; a tied
        matrix counted once), and clip to max_norm as torch.nn.utils.clip_grad_norm_ does."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        skip = self.tied if (self.tied is not None and self.tied_group is not None
                             and not any(s.is_first for s in self.stages)) else None
        sq = sum((p.grad.double().pow(2).sum() for p in params if p is not skip),
                 torch.zeros((), dtype=torch.float64))
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt().to(torch.float32)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm


def split(model: Transformer, schedule: str, microbatches: int,
          group: dist.ProcessGroup | None = None, tied_group: dist.ProcessGroup | None = None,
          stage_split: str = "even") -> Pipeline:
    """This rank's stages of `model` under `schedule` with `microbatches` micro-batches per
    step, over the pipeline process group `group` (default: the world), blocks assigned to
    stages by `stage_split` (`stage_ranges`).

    `model` is the whole model, built from the same seed on every rank (so its init is one
    process's, draw for draw), or already cut to this rank's stages (`keep_stages`; the
    trainer builds only those, `train.parallel.meta_build`, with the same values). It is cut
    down in place (`keep_only`): the blocks, embedding, final norm and head of other ranks'
    stages are dropped and freed, so `model` holds this rank's stages only, under the whole
    model's parameter names.

    With tied embeddings split across two ranks, `tied_group` is the group of the first and
    the last stage's ranks (`tied_embedding_group`); built from `group` when it is None."""
    v = stages_per_rank(schedule)  # checks the name
    group = group or dist.group.WORLD
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    cls, _, style = SCHEDULES[schedule]
    n_stages = pp * v
    if pp < 2:
        raise ValueError(f"parallel.pp must be >= 2 to pipeline, got {pp}")
    if microbatches < 1:
        raise ValueError(f"parallel.microbatches must be >= 1, got {microbatches}")
    ranges = stage_ranges(model.cfg, n_stages, stage_split)
    device = next(model.parameters()).device  # (the embedding may be cut away already)
    loss_s = [0.0]

    def loss_fn(h: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        loss = _HeadLoss.apply(h.flatten(0, 1), model.lm_head.weight, targets.reshape(-1),
                               compute_dtype(h), model.loss_chunk) / tokens
        loss_s[0] += time.perf_counter() - start
        return loss

    def head(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, targets.reshape(-1),
                                    compute_dtype(h), model.loss_chunk)

    stages, modules = [], []
    for s in rank_stages(schedule, pp, pp_rank):
        module = StageModule(model, ranges[s], s == 0, s == n_stages - 1)
        modules.append(module)
        stages.append(ClockedStage(module, s, n_stages, device, group=group))
    kwargs = dict(n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    sched = cls(stages[0], **kwargs) if v == 1 else cls(stages, **kwargs)
    holds_first = any(st.is_first for st in stages)
    holds_last = any(st.is_last for st in stages)
    tied = None
    if model.cfg.tie_embeddings and (holds_first or holds_last):
        tied = model.tok_emb.weight
    if style == "v":  # both ends on pipeline rank 0: one Parameter, nothing to sum
        tied_group = None
    elif model.cfg.tie_embeddings and tied_group is None:
        tied_group = tied_embedding_group(group)
    pipe = Pipeline(schedule, sched, stages, nn.ModuleList(modules), group, tied,
                    tied_group if tied is not None else None, loss_s, head, model.cfg.d_model,
                    ranges)
    keep_only(model, [ranges[st.stage_index] for st in stages], holds_first, holds_last)
    return pipe


def keep_stages(model: Transformer, schedule: str, pp: int, pp_rank: int,
                stage_split: str = "even") -> Transformer:
    """`model` cut down, in place, to the stages pipeline rank `pp_rank` of `pp` holds under
    `schedule` (`keep_only`); returns it. `split` accepts the result in place of the whole
    model (`train.parallel.meta_build` builds only this part)."""
    n_stages = pp * stages_per_rank(schedule)
    ranges = stage_ranges(model.cfg, n_stages, stage_split)
    mine = rank_stages(schedule, pp, pp_rank)
    keep_only(model, [ranges[s] for s in mine], 0 in mine, n_stages - 1 in mine)
    return model


def keep_only(model: Transformer, ranges: list[range], first: bool, last: bool) -> None:
    """Cut `model` down, in place, to the blocks of `ranges`, the token embedding if `first`,
    the final norm and LM head if `last`: the other modules are replaced by None (and freed
    once nothing else holds them), so `model.named_parameters()` and `state_dict()` list this
    rank's parameters only, under their whole-model names. A tied matrix keeps its embedding
    module on a last stage too (the same Parameter, unused there), so that it is named
    `tok_emb.weight` on every rank, as in one process, and its optimizer state with it: a
    checkpoint of any layout then finds it under one name."""
    mine = {i for r in ranges for i in r}
    for i in range(len(model.blocks)):
        if i not in mine:
            model.blocks[i] = None
    if not first and not (last and model.cfg.tie_embeddings):
        model.tok_emb = None
    if not last:
        model.norm = None
        model.lm_head = None


def tied_embedding_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A process group of the first and the last pipeline rank of `group` (looped schedules
    put the embedding on pipeline rank 0 and the head on rank pp-1). Every rank of the world
    must call it, as `dist.new_group` requires."""
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group([ranks[0], ranks[-1]])


def dp_pp_groups(dp: int, pp: int, tied: bool) -> tuple[dist.ProcessGroup, dist.ProcessGroup,
                                                         dist.ProcessGroup | None]:
    """(pipeline group, data-parallel group, tied-embedding group or None) of this rank in a
    dp x pp world laid out rank = d * pp + s (a pipeline's ranks adjacent, as torchtitan's
    mesh puts pp outermost of the inner dims). Every rank must call it: each `new_group` is
    collective over the world."""
    if dist.get_world_size() != dp * pp:
        raise ValueError(f"dp={dp} x pp={pp} needs {dp * pp} processes, "
                         f"got {dist.get_world_size()}")
    rank = dist.get_rank()
    mine = {}
    for d in range(dp):
        ranks = list(range(d * pp, (d + 1) * pp))
        pp_group = dist.new_group(ranks)
        tied_group = dist.new_group([ranks[0], ranks[-1]]) if tied else None
        if rank in ranks:
            mine.update(pp=pp_group, tied=tied_group)
    for s in range(pp):
        dp_group = dist.new_group([d * pp + s for d in range(dp)])
        if rank % pp == s:
            mine["dp"] = dp_group
    return mine["pp"], mine["dp"], mine["tied"]
