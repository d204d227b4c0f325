"""Pipeline parallelism in the trainer (`parallel.pp=N`): what the loop asks of a pipelined run.

The world is dp x pp processes, rank = d * pp + s (`dp_pp_groups`): replica d loads its share
of every batch (data rank d of dp), its pipeline of pp ranks runs it through the model split
by `train.parallel.pipeline`. One step: the schedule's forward and backward over M
micro-batches, the gradients summed over the replicas (`reduce_dp`), clipped by the whole
model's norm, one AdamW update.

Each rank builds only its stages (`meta_build.build_part`: the model on the meta device, its
own blocks, embedding and head made real with the values one process draws from the same
seed, bit for bit; `pipeline.keep_stages`), never the whole model; its optimizer covers its
own parameters.
So weights, gradients and AdamW state are per stage, under the whole model's parameter names.
A checkpoint is sharded by stage: every rank writes its own parameters and optimizer state
through torch.distributed.checkpoint (`train.checkpoint`), no rank gathers the whole state;
the run resumes from it exactly, and it loads in one process by name (generate, export:
`train.load`). A run also resumes under another pipeline layout or in one process, and a
one-process checkpoint under pp (`train.checkpoint.load`): the RNG states and data position
are saved per replica by its first stage (`pp_rank` 0), under its data-parallel rank. Only at the end does `full_model` assemble the whole weights (not the
optimizer state) on every rank of a pipeline: checksums, model.safetensors, samples, and the
last checkpoint's consolidated safetensors, as an FSDP run's.

The clocks (`record`): per step, this rank's compute by kind, and every pipeline rank's
blocked share of the step (the bubble as measured, `StepClock.blocked`) and idle share
(step minus compute: bubble plus the schedule's own work); the summary keeps their medians
beside the schedule's formula (`summary`).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator

from model.transformer import Transformer
from train.clock import PhaseTimer
from train.config import TrainConfig
from train.data import BatchLoader
from train.load import with_tied
from train.metrics import StepResult
from train.optim import build_optimizer, skip_update
from train.parallel.meta_build import build_part
from train.parallel.pipeline import bubble_formula, dp_pp_groups, keep_stages, split
from train.techniques import apply_techniques


def check_layout(cfg: TrainConfig, world: int) -> None:
    """Refuse, in one line, a pipelined run this world cannot hold."""
    pp = cfg.parallel.pp
    if world % pp:
        raise ValueError(f"parallel.pp={pp} does not divide the {world} processes; launch a "
                         f"multiple of {pp}")
    dp = world // pp
    per_rank = cfg.batch_size // dp
    if cfg.batch_size % (cfg.micro_batch_size * dp):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size x "
                         f"data-parallel replicas = {cfg.micro_batch_size} x {dp} (pp={pp})")
    m = microbatches(cfg, dp)
    if per_rank % m:
        raise ValueError(f"parallel.microbatches={m} does not divide the {per_rank} sequences of "
                         f"each pipeline's batch (batch_size={cfg.batch_size} / {dp} replicas)")


def microbatches(cfg: TrainConfig, dp: int) -> int:
    """M: parallel.microbatches, or each replica's batch over micro_batch_size (0)."""
    return cfg.parallel.microbatches or cfg.batch_size // dp // cfg.micro_batch_size


class PipelineRun:
    """This rank's pipelined model (`model`: its stages only), its optimizer, its place in the
    dp x pp world, and the step, evaluation and end-of-run assembly the loop calls instead of
    the DDP ones."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        world, self.pp = accelerator.num_processes, cfg.parallel.pp
        check_layout(cfg, world)
        self.dp = world // self.pp
        self.dp_rank = accelerator.process_index // self.pp
        self.pp_rank = accelerator.process_index % self.pp
        self.schedule, self.m = cfg.parallel.schedule, microbatches(cfg, self.dp)
        self.stage_split = cfg.parallel.stage_split
        tied = cfg.model.tie_embeddings
        self.pp_group, self.dp_group, tied_group = dp_pp_groups(self.dp, self.pp, tied)
        # this rank's stages only, built without the whole model (`meta_build`), initialised
        # as one process initialises them
        self.model = build_part(cfg.model, lambda whole: keep_stages(
            apply_techniques(whole, cfg), self.schedule, self.pp, self.pp_rank,
            self.stage_split)).to(accelerator.device)
        self.pipe = split(self.model, self.schedule, self.m, self.pp_group, tied_group,
                          cfg.parallel.stage_split)  # self.model: this rank's stages only
        self.optimizer = build_optimizer(self.model, cfg.optim, accelerator.device,
                                         cfg.compile_optimizer)
        self.accelerator = accelerator

    def train_step(self, model, optimizer, batches: list, accelerator: Accelerator,
                   timer: PhaseTimer, grad_clip: float, poison: bool = False) -> StepResult:
        """`train.loop.train_step` for a pipeline: the same loss normalisation (every target
        token of the step, all replicas, weighs the same), clipping and skipping; the step's
        clocks go to `last_record`."""
        x = torch.cat([b[0] for b in batches]).to(accelerator.device)
        y = torch.cat([b[1] for b in batches]).to(accelerator.device)
        step_tokens = float(self.dp * y.numel())
        loss, clock = self.pipe.step(x, y, torch.tensor(step_tokens))  # fp32 (config.PP_REFUSED)
        if poison:
            loss = loss * float("nan")
        timer.lap("fwd_bwd_s")
        comm_s = clock.comm_s
        if self.dp > 1:
            start = time.perf_counter()
            self.pipe.reduce_dp(self.dp_group)
            dist.all_reduce(loss, group=self.dp_group)
            comm_s += time.perf_counter() - start
        grad_norm = self.pipe.clip_grad_norm_(grad_clip)
        train_loss = loss.double()
        found_inf = ~torch.isfinite(train_loss) | ~torch.isfinite(grad_norm)
        skip_update(optimizer, found_inf)
        optimizer.zero_grad(set_to_none=True)
        timer.lap("optim_s")
        self.last_record = self._record(clock, comm_s)
        return StepResult(train_loss, grad_norm, step_tokens, found_inf, found_inf)

    def _record(self, clock, comm_s: float) -> dict:
        """The step's clocks: this rank's compute by kind and exposed communication, and the
        blocked, idle and compute share of every pipeline rank (one small all-gather)."""
        mine = torch.tensor([clock.blocked, clock.bubble, clock.busy_s / clock.step_s],
                            dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(self.pp)]
        dist.all_gather(every, mine, group=self.pp_group)
        shares = [t.tolist() for t in every]
        return {"pp_step_s": clock.step_s,
                **{f"pp_{kind}_s": seconds for kind, seconds in clock.compute.items()},
                "pp_blocked_s": clock.blocked_s, "pp_overhead_s": clock.overhead_s,
                "comm_exposed_s": comm_s,
                "pp_bubble_per_rank": [b for b, _, _ in shares],
                "pp_idle_per_rank": [i for _, i, _ in shares],
                "pp_compute_per_rank": [c for _, _, c in shares]}

    @torch.no_grad()
    def evaluate(self, loader: BatchLoader, batches: int) -> float:
        """Mean validation loss per token over `batches` micro-batches of every replica, each
        pipeline running them forward only (`Pipeline.forward_loss`)."""
        self.model.eval()
        loader.load_state_dict({"epoch": 0, "cursor": 0})
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(min(batches, loader.per_rank // loader.micro_batch_size)):
            x, y = loader.next()
            device = self.accelerator.device
            total[0] += float(self.pipe.forward_loss(x.to(device), y.to(device)))
            total[1] += y.numel()
        self.model.train()
        if self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        return float(total[0] / total[1])

    def full_model(self) -> Transformer:
        """The whole model, weights only, on every rank of this pipeline (a collective): each
        rank's stage weights all-gathered over the pipeline group into a fresh `Transformer`
        (built without touching the RNG). For the end of the run: checksums, the run's
        model.safetensors and samples. The optimizer state stays with the stages."""
        mine = {name: t.detach().cpu() for name, t in self.model.state_dict().items()}
        every: list = [None] * self.pp
        dist.all_gather_object(every, mine, group=self.pp_group)
        state = {name: t for theirs in every for name, t in theirs.items()}
        with torch.random.fork_rng(devices=[]):
            whole = Transformer(self.model.cfg)
        whole.load_state_dict(with_tied(state, whole.cfg), strict=True)
        return whole.to(self.accelerator.device)

    def summary(self, records: list[dict], warmup: int) -> dict:
        """summary.json's `pipeline`: the layout, and per pipeline rank the median bubble
        (blocked share) and idle share over the steps after `warmup`, beside the formula."""
        clocked = [r for r in records if "pp_bubble_per_rank" in r]
        steady = [r for r in clocked if r["step"] > warmup] or clocked

        def medians(key: str) -> list[float | None]:
            return [statistics.median(r[key][i] for r in steady) if steady else None
                    for i in range(self.pp)]

        return {"pp": self.pp, "dp": self.dp, "schedule": self.schedule, "microbatches": self.m,
                "stage_split": self.stage_split,
                "blocks_per_stage": [len(r) for r in self.pipe.ranges],
                "bubble_formula": bubble_formula(self.schedule, self.pp, self.m),
                "bubble_median_per_rank": medians("pp_bubble_per_rank"),
                "idle_median_per_rank": medians("pp_idle_per_rank"),
                "compute_median_per_rank": medians("pp_compute_per_rank"),
                "steps_measured": len(steady)}
