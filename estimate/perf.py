"""Step time from what a step does on given hardware: the performance model behind `project`.

A training step on one of n accelerators (all do the same work) is modelled as

    step = (GEMMs + attention core + memory-bound work + exposed communication)
           x (1 + pipeline bubble) / stack efficiency

- **GEMMs**: every weight matrix of the block (attention projections, MLP or experts, MTP
  modules) and the LM head as a matmul of the micro-batch's tokens, shaped as tensor and expert
  parallelism cut it, timed by the roofline of that one matmul: max(FLOPs / achievable matmul
  rate, bytes / HBM bandwidth) (Williams et al. 2009). The achievable rate is the measured
  "maximum achievable matmul FLOPS" of the accelerator (catalog `matmul_ceiling`), below the
  datasheet peak; narrow models and small matmuls drop below it through the bandwidth term.
  Backward is two matmuls of the same shape per forward one; recomputation re-runs forwards.
- **Attention core**: causal kernels (FlashAttention, Dao 2023) skip the masked half and
  recompute the scores in the backward pass (5 matmuls backward for 2 forward), at a fraction
  of peak (`attention_efficiency`).
- **Memory-bound work**: norms, activations, residual adds, RoPE, the loss and the optimizer
  update, as bytes moved over HBM bandwidth.
- **Communication** (ring collectives, Patarasuk & Yuan 2009: each device sends 2(g-1)/g of an
  all-reduced message, (g-1)/g of a reduce-scatter or all-gather):
  - tensor parallel: 4 collectives of the micro-batch's activations per layer (Megatron,
    Shoeybi et al. 2019; with sequence parallelism, Korthikanti et al. 2022, the same bytes)
    over the scale-up links (NVLink, ICI), partly hidden behind GEMMs (`tp_exposed`);
  - expert parallel: dispatch and combine all-to-alls, forward and backward, of k copies of
    each token, the share leaving the node over the scale-out network; `dualpipe` schedules
    (DeepSeek-AI 2024, sec. 3.2.1) hide them behind compute;
  - data parallel: reduce-scatter of gradients and all-gather of parameters (ZeRO,
    Rajbhandari et al. 2020) once per step over the scale-out network, hidden behind the last
    micro-batch's backward pass where it fits;
  - pipeline: point-to-point activations between stages;
  - context parallel: keys and values around the ring (ring attention), behind the attention,
    or gathered whole before it (Llama 3's all-gather, the trainer's), not hidden
    (`Layout.cp_exchange`).
- **Pipeline bubble**: (pp - 1) / (m v) of the compute for 1F1B with v interleaved chunks and
  m micro-batches (Narayanan et al. 2021, sec. 2.2); DualPipe's (pp/2 - 1)(F&B + B - 3W)
  (DeepSeek-AI 2024, table 2) is taken as 2/3 of (pp/2 - 1)(F + B). Stages are unequal (the
  first holds the embedding, the last the LM head and loss): the steady state runs at the
  slowest stage (`bubble_fraction` with each rank's cost).
- **Stack efficiency**: what the terms above leave out (launch overheads, stragglers, load
  imbalance), one number fitted on published runs (`estimate.validate`, leave-one-out).

The run then takes tokens / tokens-per-step steps, divided by the goodput of `goodput()`.
Every number the model uses is a `Factor` with a central value, a range and a source
(`defaults.yaml`, `performance:`); the range of a projection comes from these ranges.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field

from estimate.hardware import Accelerator
from model.config import ModelConfig
from model.flops import (
    _attention_core_flops_forward,
    count_params,
    model_flops_per_token,
    recomputed_layers,
)
from model.precision import precision as precision_of

BYTES_PER_GB = 1e9
# Pipeline schedules: 1F1B (interleaved when virtual_stages > 1, Narayanan et al. 2021),
# DualPipe (DeepSeek-AI 2024, sec. 3.2.1) and zero bubble (ZB-H1, Qi et al. 2024, ICLR,
# 'Zero Bubble Pipeline Parallelism', sec. 3: the weight-gradient pass W fills the bubble).
SCHEDULES = ("1f1b", "dualpipe", "zero-bubble")
# Context parallelism's exchange of keys and values: around a ring, hidden behind attention
# (ring attention, Liu et al. 2023), or gathered whole before it (Llama 3, Dubey et al. 2024,
# sec. 3.3.2: one all-gather per layer; train/parallel/context.py runs this one).
CP_EXCHANGES = ("ring", "all-gather")
ZERO_STAGES = (0, 1, 2, 3)
# DDP all-reduces gradients in buckets of 25 MB (Li et al. 2020, 'PyTorch Distributed', sec.
# 3.2.3, its default bucket_cap_mb): the number of collectives a step pays a link latency for.
DDP_BUCKET_BYTES = 25 * 2**20
# Adam's update: fp32 master weights, m and v read and written, the 16-bit copy written
ADAM_BYTES_PER_PARAM = 32
# The embedding per token: its row read and the activation written forward, the activation's
# gradient read and the row's gradient updated backward (4 values of d each, activation bytes)
EMBEDDING_BYTES_PER_DIM = 4
_MEMO: dict = {}


def _memo(what: str, cfg: ModelConfig, fn, *args):
    """count_params / model FLOPs walk every layer: remember them per shape (the planner asks
    for the same shape thousands of times)."""
    key = (what, tuple(vars(cfg).values()), args)
    if key not in _MEMO:
        _MEMO[key] = fn(cfg, *args)
    return _MEMO[key]


def layer_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(dense blocks, mixture-of-experts blocks)."""
    moe = cfg.n_layer - cfg.n_dense_layers if cfg.is_moe else 0
    return cfg.n_layer - moe, moe


@dataclass(frozen=True)
class Factor:
    """A number the model depends on; `better` says which end makes the run faster."""

    key: str
    central: float
    low: float
    high: float
    better: str  # "high" or "low"
    source: str

    def at(self, case: str) -> float:
        if case == "central":
            return self.central
        good = self.high if self.better == "high" else self.low
        bad = self.low if self.better == "high" else self.high
        return {"best": good, "worst": bad}[case]


def load_factors(defaults: dict, stack_efficiency: Factor) -> dict[str, Factor]:
    """The model's factors from defaults.yaml's `performance:` section, plus the fitted stack
    efficiency."""
    out = {"stack_efficiency": stack_efficiency}
    for key, e in defaults["performance"].items():
        if "central" in e:
            out[key] = Factor(key, float(e["central"]), float(e["low"]), float(e["high"]),
                              e["better"], " ".join(str(e["source"]).split()))
    return out


@dataclass
class Layout:
    """How the n accelerators split the work (Megatron-style 4D parallelism, plus experts).

    tp x pp x cp x dp = n; expert parallelism (ep) is carved out of the data-parallel ranks,
    as in DeepSeek-V3 and Megatron-Core, so it does not change n."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    micro_batch: int = 1  # sequences per micro-batch
    global_batch_tokens: float = 4e6
    virtual_stages: int = 1  # interleaved 1F1B chunks per device
    schedule: str = "1f1b"
    max_nodes_per_token: int | None = None  # node-limited expert routing (DeepSeek-V3: 4)
    zero: int = 1  # ZeRO stage of the data-parallel sharding (3: FSDP, parameters too)
    cp_exchange: str = "ring"  # how context parallelism moves keys and values (CP_EXCHANGES)
    # blocks of each pipeline stage (pipeline_stages() of them), in model order; None: as many
    # on each (a fraction where they do not divide)
    stage_layers: tuple[int, ...] | None = None
    source: str = "given"

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def check(self, n: int, cfg: ModelConfig, seq_len: int | None = None) -> None:
        for name in ("tp", "pp", "dp", "cp", "ep", "micro_batch", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {name}={getattr(self, name)} must be >= 1")
        if self.devices > n:  # fewer is allowed: the rest stay idle (the planner says so)
            raise ValueError(f"layout tp x pp x cp x dp = {self.tp} x {self.pp} x {self.cp} x "
                             f"{self.dp} = {self.devices} does not fit {n} accelerators")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"layout schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.zero not in ZERO_STAGES:
            raise ValueError(f"layout zero={self.zero}; valid: 0-3")
        if self.cp_exchange not in CP_EXCHANGES:
            raise ValueError(f"layout cp_exchange={self.cp_exchange!r}; valid: "
                             f"{', '.join(CP_EXCHANGES)}")
        if self.stage_layers is not None and (
                len(self.stage_layers) != pipeline_stages(self)
                or sum(self.stage_layers) != cfg.n_layer or min(self.stage_layers) < 0):
            raise ValueError(f"layout stage_layers={list(self.stage_layers)}: need "
                             f"{pipeline_stages(self)} counts (pp x chunks per rank) of blocks "
                             f"that add up to n_layer={cfg.n_layer}")
        if self.ep > 1 and not cfg.is_moe:
            raise ValueError(f"layout ep={self.ep} needs a mixture-of-experts model")
        if self.ep > self.dp * self.cp * self.tp:
            raise ValueError(f"layout ep={self.ep} exceeds the data x context x tensor parallel "
                             f"ranks ({self.dp * self.cp * self.tp}) it is carved from")
        T = seq_len or cfg.seq_len
        if self.micro_batches(T) < 1:
            raise ValueError(
                f"layout dp={self.dp} x micro_batch={self.micro_batch} x {T} tokens "
                f"is more than the {self.global_batch_tokens:.4g} tokens of a step: some data-"
                "parallel ranks would have no data")

    def micro_batches(self, seq_len: int) -> float:
        """Micro-batches each pipeline processes per step."""
        return self.global_batch_tokens / (self.dp * self.micro_batch * seq_len)


@dataclass
class StepTime:
    """Seconds per optimizer step on each accelerator, by where they go."""

    gemm: float
    recompute: float
    attention: float
    memory: float
    tp_comm: float
    ep_comm: float
    dp_comm: float
    pp_comm: float
    bubble: float
    stack: float  # the share of the step the stack efficiency adds
    tokens: float  # tokens per step (all accelerators)
    model_flops: float  # model FLOPs per step (all accelerators)
    notes: list[str] = field(default_factory=list)
    cp_comm: float = 0.0  # context parallel's exchange of keys and values, where exposed
    stage_s: list[float] = field(default_factory=list)  # each pipeline stage, per micro-batch

    @property
    def total(self) -> float:
        return (self.gemm + self.recompute + self.attention + self.memory + self.tp_comm
                + self.ep_comm + self.dp_comm + self.pp_comm + self.cp_comm + self.bubble
                + self.stack)

    def parts(self) -> dict[str, float]:
        """Where the time goes, in seconds per step: compute, recompute, communication,
        bubble and the rest (memory-bound work and the stack's overheads)."""
        return {"compute": self.gemm + self.attention, "recompute": self.recompute,
                "memory-bound": self.memory,
                "communication": (self.tp_comm + self.ep_comm + self.dp_comm + self.pp_comm
                                  + self.cp_comm),
                "pipeline bubble": self.bubble, "overheads": self.stack}


def _gemm_seconds(m: float, k: float, n: float, rate: float, bw: float, elem_bytes: float) -> float:
    """One [m, k] x [k, n] matmul: the slower of its FLOPs at the achievable rate and its bytes
    (both inputs and the output, once each) at the memory bandwidth."""
    if m <= 0 or k <= 0 or n <= 0:
        return 0.0
    return max(2.0 * m * k * n / rate, elem_bytes * (m * k + k * n + m * n) / bw)


def _block_gemms(cfg: ModelConfig, layer: int, m: float,
                 lay: Layout) -> list[tuple[float, float, float, float]]:
    """The forward matmuls of block `layer` on one device for a micro-batch of m tokens, as
    (m, k, n, how many): column-parallel weights split n, row-parallel ones k, by tp
    (Megatron)."""
    d, H, tp = cfg.d_model, cfg.n_head, lay.tp
    out: list[tuple[float, float, float, float]] = []
    if cfg.is_mla:
        q_out = H * cfg.qk_head_dim
        if cfg.q_lora_rank:
            out += [(m, d, cfg.q_lora_rank, 1), (m, cfg.q_lora_rank, q_out / tp, 1)]
        else:
            out.append((m, d, q_out / tp, 1))
        out += [(m, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 1),
                (m, cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim) / tp, 1),
                (m, H * cfg.v_head_dim / tp, d, 1)]
    else:
        qkv = (H + 2 * cfg.n_kv_head) * cfg.head_dim
        out += [(m, d, qkv / tp, 1), (m, H * cfg.head_dim / tp, d, 1)]
    if not cfg.is_moe_layer(layer):
        f = cfg.ffn_hidden / tp
        return out + [(m, d, f, 2), (m, f, d, 1)]
    # Router, shared experts (split by tp), routed experts: the ep ranks' tokens meet at the
    # experts each rank holds, k copies per token, spread evenly (balanced routing).
    out.append((m, d, cfg.n_experts, 1))
    if cfg.n_shared_experts:
        f = cfg.n_shared_experts * cfg.moe_ffn_hidden / tp
        out += [(m, d, f, 2), (m, f, d, 1)]
    local_experts = cfg.n_experts / lay.ep
    tokens_per_expert = m * cfg.n_experts_active / cfg.n_experts * lay.ep
    if lay.ep == 1:  # experts split by tp instead
        tokens_per_expert = m * cfg.n_experts_active / cfg.n_experts
    f = cfg.moe_ffn_hidden / (tp if lay.ep == 1 else 1)
    k = int(round(local_experts))
    return out + [(tokens_per_expert, d, f, 2 * k), (tokens_per_expert, f, d, k)]


def forward_gemms(cfg: ModelConfig, m_tokens: float,
                  lay: Layout) -> list[tuple[float, float, float, float]]:
    """Every forward matmul of the whole model on one device for a micro-batch of m tokens,
    as (m, k, n, how many): each block's (`_block_gemms`, shaped by tp) and the LM head, as
    `step_time` charges them (MTP modules left out). What `calibrate --parallel` times on
    this machine to measure the matmul rate at the model's own shapes."""
    out: list[tuple[float, float, float, float]] = []
    for layer in range(cfg.n_layer):
        out += _block_gemms(cfg, layer, m_tokens, lay)
    return out + [(m_tokens, cfg.d_model, cfg.vocab_size / lay.tp, 1)]


def activation_bytes(precision: str) -> float:
    """Bytes of an activation or gradient element between kernels: 2 in 16-bit and fp8
    training (fp8 keeps activations in bf16, DeepSeek-V3 sec. 3.3), 4 in fp32."""
    return max(2.0, float(precision_of(precision).bytes))


def link_latency_s(acc: Accelerator) -> float:
    """Seconds each collective pays before its bytes flow (the alpha of an alpha-beta model,
    Hockney 1994): the entry's `link_latency_us`, which `calibrate --parallel` measures for
    this machine; 0 for catalog accelerators, whose microseconds vanish beside their messages."""
    return float(acc.get("link_latency_us") or 0.0) * 1e-6


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
# a collective's link: bytes per second one rank sends, and the latency (alpha) in seconds
Link = tuple[float, float]


def sent_bytes(op: str, nbytes: float, group: int) -> float:
    """Bytes one rank of `group` sends for a collective on a message of `nbytes` (the
    all-reduced tensor, the gathered output, the scattered input, the sent message): ring
    algorithms (Patarasuk & Yuan 2009) send 2(g-1)/g of an all-reduced message, (g-1)/g of a
    gathered or scattered one."""
    share = {"all_reduce": 2 * (group - 1) / group, "all_gather": (group - 1) / group,
             "reduce_scatter": (group - 1) / group, "send_recv": 1.0}
    if op not in share:
        raise ValueError(f"unknown collective {op!r}; valid: {', '.join(share)}")
    return share[op] * nbytes


def collective_seconds(op: str, nbytes: float, group: int, link: Link) -> float:
    """One collective, alpha-beta (Hockney 1994): the link's latency, then the bytes this rank
    sends at its bandwidth."""
    bytes_per_s, latency_s = link
    return latency_s + sent_bytes(op, nbytes, group) / bytes_per_s


def collective_links(acc: Accelerator, link: float, latency_s: float) -> dict[str, Link]:
    """Each collective's link on `acc`: the entry's `collective_links` ({op: [GB/s sent per
    rank, latency us]}, what `calibrate --parallel` fits per collective on this machine), else
    the scale-up `link` and `latency_s` for all."""
    own = acc.get("collective_links") or {}
    return {op: ((own[op][0] * BYTES_PER_GB, own[op][1] * 1e-6) if op in own
                 else (link, latency_s)) for op in COLLECTIVES}


def tp_collectives(m_tokens: float, d_model: int, layers: float, tp: int, act_bytes: float,
                   sequence_parallel: bool = True, ends: float = 0.0,
                   ) -> list[tuple[str, float, float]]:
    """The tensor-parallel collectives of one micro-batch on one device, as (collective,
    message bytes, count), the message being the micro-batch's activations [m_tokens, d].
    Each layer's attention and MLP enter through f and leave through g (Megatron: Shoeybi et
    al. 2019, sec. 3): f is an all-reduce backward, g one forward, 4 per layer; with sequence
    parallelism (Korthikanti et al. 2022, sec. 4.2.2) f is an all-gather (its backward a
    reduce-scatter) and g a reduce-scatter (its backward an all-gather), 8 per layer of the
    same bytes in all, and each norm weight's gradient, a partial sum over this rank's tokens,
    is all-reduced (fp32). `ends`: the share of the embedding and the loss this device runs
    (1 without a pipeline): the vocabulary-parallel embedding leaves through g, the LM head's
    input enters through f, the final norm's gradient (under sp), and the vocabulary-parallel
    cross-entropy all-reduces three fp32 values per token (the max, the sum of exponentials,
    the target's logit; Megatron-LM's vocab-parallel cross-entropy)."""
    if tp <= 1:
        return []
    msg = m_tokens * d_model * act_bytes
    if sequence_parallel:
        out = [("all_gather", msg, 4 * layers + 2 * ends),
               ("reduce_scatter", msg, 4 * layers + 2 * ends),
               ("all_reduce", 4.0 * d_model, 2 * layers + ends)]
    else:
        out = [("all_reduce", msg, 4 * layers + 2 * ends)]
    return out + [("all_reduce", 4.0 * m_tokens, 3 * ends)]


def collectives_seconds(collectives: list[tuple[str, float, float]], group: int,
                        links: dict[str, Link]) -> float:
    """(collective, message bytes, count) rows, each at its link's alpha-beta time."""
    return sum(count * collective_seconds(op, nbytes, group, links[op])
               for op, nbytes, count in collectives if count)


def tp_comm_seconds(m_tokens: float, d_model: int, layers: float, tp: int,
                    link: float | dict[str, Link], act_bytes: float, latency_s: float = 0.0,
                    sequence_parallel: bool = True, ends: float = 0.0) -> float:
    """Tensor-parallel collectives of one micro-batch on one device, none of them hidden
    (`tp_collectives`), each at its link's alpha-beta time: `link` bytes/s with `latency_s`
    for all, or each collective's own (`collective_links`)."""
    links = link if isinstance(link, dict) else dict.fromkeys(COLLECTIVES, (link, latency_s))
    return collectives_seconds(tp_collectives(m_tokens, d_model, layers, tp, act_bytes,
                                              sequence_parallel, ends), tp, links)


def tp_step_collectives(cfg: ModelConfig, seq_len: int, lay: Layout, act_bytes: float,
                        sequence_parallel: bool = True) -> list[tuple[str, float, float]]:
    """A step's tensor-parallel collectives on one device: `tp_collectives` of each of its
    micro-batches (the embedding and the loss spread over the stages like the LM head's
    GEMMs) and one all-reduce of the gradient norm (fp64) for clipping."""
    if lay.tp <= 1:
        return []
    mb = lay.micro_batches(seq_len)
    per_mb = tp_collectives(lay.micro_batch * seq_len / lay.cp, cfg.d_model,
                            cfg.n_layer / lay.pp, lay.tp, act_bytes, sequence_parallel,
                            ends=1 / lay.pp)
    return [(op, nbytes, mb * count) for op, nbytes, count in per_mb] + [("all_reduce", 8.0, 1)]


def dp_comm_seconds(local_params: float, dp_group: int, tp: int, node: int, net: float,
                    link: float, grad_bytes: float, zero: int, latency_s: float = 0.0,
                    units: int = 1) -> float:
    """Data-parallel traffic of one step on one device, before any overlap: a gradient
    all-reduce (or reduce-scatter + all-gather, the same bytes) of `local_params` in 16-bit,
    ZeRO-3 / FSDP's second all-gather for the backward pass making it 1.5x (Rajbhandari et al.
    2020, sec. 7.2.2). Ranks are laid out tensor-parallel innermost, then data-parallel
    (Megatron-LM's order), so a node holds node / tp data-parallel replicas of each shard: the
    collective reduces among them over the scale-up `link` first, and each of their NICs
    carries 1/r of the message across nodes over `net` (hierarchical all-reduce, Jia et al.
    2018, arXiv:1807.11205). With a latency, each collective pays it once: DDP's gradient
    buckets (DDP_BUCKET_BYTES), or under ZeRO-3 three per sharded unit (`units`: the blocks
    and the root) per step."""
    if dp_group <= 1:
        return 0.0
    r = max(1, min(dp_group, node // tp))
    nodes = max(1.0, dp_group / r)
    ring = 2 * (nodes - 1) / nodes * local_params * grad_bytes / r if nodes > 1 else 0.0
    inside = 2 * (r - 1) / r * local_params * grad_bytes if r > 1 else 0.0
    sharded = 1.5 if zero == 3 else 1.0
    calls = dp_collectives(local_params, grad_bytes, zero, units)
    return sharded * (ring / net + inside / link) + calls * latency_s


def dp_collectives(local_params: float, grad_bytes: float, zero: int, units: int = 1) -> int:
    """Data-parallel collectives of one step: DDP's gradient buckets (DDP_BUCKET_BYTES), or
    under ZeRO-3 three per sharded unit (an all-gather forward, one backward, a
    reduce-scatter)."""
    return int(3 * units if zero == 3 else -(-local_params * grad_bytes // DDP_BUCKET_BYTES))


def cp_ring_seconds(m_tokens: float, kv_width: float, layers: float, cp: int, link: float,
                    act_bytes: float, latency_s: float = 0.0) -> float:
    """Context-parallel exchange of one micro-batch on one device, none of it hidden (ring
    attention, Liu et al. 2023, arXiv:2310.01889): its chunk's keys and values (`kv_width`
    channels per token) pass cp - 1 hops forward, and keys, values and their gradients
    backward: 3 (cp - 1) transfers of the chunk per layer."""
    if cp <= 1:
        return 0.0
    kv = m_tokens * kv_width * act_bytes
    return layers * 3 * (cp - 1) * (kv / link + latency_s)


def cp_kv_width(cfg: ModelConfig, tp: int = 1) -> float:
    """Channels per token of the keys and values context parallelism exchanges on one
    tensor-parallel rank (MLA: keys and values expanded, every head)."""
    kv_heads = cfg.n_head if cfg.is_mla else cfg.n_kv_head
    return kv_heads / tp * (cfg.qk_head_dim + cfg.value_head_dim)


def cp_allgather_seconds(m_tokens: float, kv_width: float, layers: float, cp: int,
                         links: dict[str, Link], act_bytes: float) -> float:
    """Context-parallel exchange of one micro-batch on one device as Llama 3 runs it (Dubey et
    al. 2024, sec. 3.3.2; train/parallel/context.py): per layer one all-gather of every rank's
    keys and values (`kv_width` channels per token, a message of the cp chunks) before the
    attention, and its backward, a reduce-scatter of their gradients; each at its link's
    alpha-beta time (`collective_links`), none hidden (the attention waits for the keys)."""
    if cp <= 1:
        return 0.0
    msg = cp * m_tokens * kv_width * act_bytes
    return collectives_seconds([("all_gather", msg, layers), ("reduce_scatter", msg, layers)],
                               cp, links)


def stage_costs(cfg: ModelConfig, stages: int, stage_layers: tuple[int, ...] | None,
                dense: float, moe: float, first: float, last: float, pp: int | None = None,
                placement: str = "loop") -> list[float]:
    """Each pipeline stage's compute for one micro-batch: its blocks at `dense` or `moe`
    seconds each, plus `first` on the first stage (the embedding) and `last` on the last (final
    norm, LM head, loss, MTP). `stage_layers`: each stage's block count, contiguous in model
    order; None: whole blocks at the model's mean block cost, split over the `pp` ranks
    (holding the stages by `placement`) as evenly as the ends allow (`balanced_stage_layers`;
    n_layer / stages each, a fraction, where blocks are fewer than stages)."""
    n_dense, n_moe = layer_counts(cfg)
    if stage_layers is None:
        mean = (n_dense * dense + n_moe * moe) / cfg.n_layer
        if cfg.n_layer < stages:
            out = [mean * cfg.n_layer / stages] * stages
        else:
            out = [mean * k for k in balanced_stage_layers(cfg.n_layer, stages, mean, first,
                                                           last, pp, placement)]
    else:
        out, layer = [], 0
        for count in stage_layers:
            out.append(sum(moe if cfg.is_moe_layer(i) else dense
                           for i in range(layer, layer + count)))
            layer += count
    out[0] += first
    out[-1] += last
    return out


def balanced_stage_layers(n_layer: int, stages: int, block: float, first: float = 0.0,
                          last: float = 0.0, pp: int | None = None,
                          placement: str = "loop") -> list[int]:
    """Blocks per stage (at least one each) that make the slowest pipeline rank as fast as
    whole blocks of `block` seconds allow when the first stage also carries `first` and the
    last `last`: each block in turn to the stage that leaves its ranks' load lowest (ties: the
    stage with fewer blocks). `pp` ranks hold the stages by `placement` (`stage_holders`;
    default: a rank per stage). What runs do by hand: Llama 3 405B's pipeline holds one block
    fewer on its first and last stages (Dubey et al. 2024, sec. 3.3.2); Megatron-LM takes the
    first and last stage's block counts as options."""
    return list(_balanced(n_layer, stages, block, first, last, pp, placement))


@functools.lru_cache(maxsize=1 << 16)  # the planner asks the same split many times
def _balanced(n_layer: int, stages: int, block: float, first: float, last: float,
              pp: int | None, placement: str) -> tuple[int, ...]:
    pp = pp or stages
    if n_layer < stages or block <= 0:
        raise ValueError(f"{n_layer} blocks of {block} s do not fill {stages} stages")
    counts = [1] * stages
    holders = [stage_holders(s, stages, pp, placement) for s in range(stages)]
    costs = [block] * stages
    costs[0] += first
    costs[-1] += last
    load = rank_costs(costs, pp, placement)

    def key(x: int) -> tuple[float, int, int]:
        return max(load[r] + w * block for r, w in holders[x]), counts[x], x

    # each block to the stage of least key, as min(range(stages), key=key) would pick it, from
    # a heap: loads only rise, so a popped key that is still current is the least one
    heap = [key(x) for x in range(stages)]
    heapq.heapify(heap)
    for _ in range(n_layer - stages):
        while True:
            k = heapq.heappop(heap)
            if k == key(k[2]):
                break
            heapq.heappush(heap, key(k[2]))
        s = k[2]
        counts[s] += 1
        for r, w in holders[s]:
            load[r] += w * block
        heapq.heappush(heap, key(s))
    return tuple(counts)


def pipeline_stages(lay: Layout) -> int:
    """Model chunks (pipeline stages) of a layout: v per rank under 1F1B and zero bubble
    (interleaved when v > 1); pp under DualPipe, each in two mirrored copies."""
    return lay.pp if lay.schedule == "dualpipe" else lay.pp * lay.virtual_stages


PLACEMENTS = ("loop", "v", "dual")


def stage_holders(stage: int, stages: int, pp: int, placement: str = "loop",
                  ) -> list[tuple[int, float]]:
    """The pipeline ranks that run `stage` of `stages`, with the share of the micro-batches
    each runs it for: stage s on rank s % pp ("loop": 1F1B, interleaved 1F1B); rank r holds
    stages r and 2pp-1-r ("v": DualPipeV, ZB-V, so rank 0 runs both the embedding's and the
    LM head's stage); DualPipe's two directions ("dual", DeepSeek-AI 2024, sec. 3.2.1: two
    copies of pp stages, mirrored): stage s on rank s for half the micro-batches and on rank
    pp-1-s for the other half."""
    if placement == "v":
        return [(stage if stage < pp else 2 * pp - 1 - stage, 1.0)]
    if placement == "dual":
        mirror = pp - 1 - stage
        return [(stage, 1.0)] if mirror == stage else [(stage, 0.5), (mirror, 0.5)]
    if placement != "loop":
        raise ValueError(f"stage placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
    return [(stage % pp, 1.0)]


def schedule_placement(schedule: str) -> str:
    """How perf's `schedule` places its stages on ranks (`stage_holders`)."""
    return "dual" if schedule == "dualpipe" else "loop"


def rank_costs(stage_costs: list[float], pp: int, placement: str = "loop") -> list[float]:
    """Each pipeline rank's compute per micro-batch: the costs of the stages it holds (the
    mean over the micro-batches, where a stage runs on two ranks)."""
    out = [0.0] * pp
    for s, cost in enumerate(stage_costs):
        for r, share in stage_holders(s, len(stage_costs), pp, placement):
            out[r] += share * cost
    return out


def bubble_fraction(schedule: str, pp: int, microbatches: float, virtual_stages: int = 1,
                    rank_costs: list[float] | None = None) -> float:
    """Pipeline idle time as a fraction of the compute.

    Equal stages: (pp - 1) / (m v) for 1F1B with v interleaved chunks (Narayanan et al. 2021,
    sec. 2.2); ZB-H1's (p-1)(F + B - W) against 1F1B's (p-1)(F + B + W) with F = B = W (Qi
    et al. 2024, sec. 3.1); DualPipe's (pp/2 - 1)(F&B + B - 3W) (DeepSeek-AI 2024, table 2)
    taken as 2/3 of (pp/2 - 1)(F + B).

    Unequal stages (`rank_costs`: each rank's compute for one micro-batch, forward and
    backward, e.g. the last rank's LM head and loss): every rank does its m micro-batches at
    the pace of the slowest, C_max, and the fill and drain pass through the others. For 1F1B
    (interleaved or not) a step takes m C_max + (p C_mean - C_max) / v, so

        b = (C_max - C_mean) / C_mean + (p C_mean - C_max) / (m v C_mean)

    (the flow-shop makespan of identical jobs, sum + (m - 1) max, which
    train.parallel.schedule_sim reproduces on torch's own orders); the other schedules'
    fill and drain term is scaled alike: b = (C_max / C_mean - 1) + b_equal (p C_mean -
    C_max) / ((p - 1) C_mean). Equal costs give the formulas above exactly. The share of the
    step the mean rank idles is b / (1 + b)."""
    if pp <= 1:
        return 0.0
    if schedule == "dualpipe":
        equal = max(0.0, pp / 2 - 1) * (2 / 3) / microbatches
    elif schedule == "zero-bubble":
        equal = (pp - 1) / (3 * microbatches)
    else:
        equal = (pp - 1) / (microbatches * virtual_stages)
    if rank_costs is None or max(rank_costs) == min(rank_costs):
        return equal
    if len(rank_costs) != pp or min(rank_costs) < 0:
        raise ValueError(f"rank_costs={rank_costs}: need {pp} costs >= 0, one per pipeline rank")
    mean, slowest = sum(rank_costs) / pp, max(rank_costs)
    return slowest / mean - 1 + equal * (pp * mean - slowest) / ((pp - 1) * mean)


def rates(acc: Accelerator, precision: str, f: dict[str, float],
          peak_flops: float | None = None) -> tuple[float, float, float]:
    """(GEMM rate, rate of what stays in 16-bit, the precision's peak) in FLOP/s.

    The achievable GEMM rate is the peak times the measured matmul ceiling (catalog), or the
    stated default where none was measured. Under fp8 only the block GEMMs run in fp8
    (DeepSeek-V3 sec. 3.3.1 keeps the embedding, output head, gating, norms and attention in
    bf16/fp32): the rest runs at the 16-bit rate. `peak_flops` overrides the catalog peak."""
    prec = precision_of(precision).catalog
    peak = peak_flops or acc.peak_flops(prec)
    wide = "bf16" if "bf16" in acc.precisions() else "fp16"
    wide_peak = peak if prec not in ("fp8",) else acc.peak_flops(wide)
    ceiling = None if peak_flops else acc.matmul_ceiling(prec)
    wide_ceiling = None if peak_flops else acc.matmul_ceiling(wide)
    unknown = f["matmul_ceiling_unknown"]
    return peak * (ceiling or unknown), wide_peak * (wide_ceiling or unknown), peak


def attention_efficiency(acc: Accelerator, default: Factor, case: str = "central") -> float:
    """The fraction of the peak the attention kernel reaches on `acc`: the catalog entry's own
    `attention_efficiency` (central, low, high, source) where it has one (Hopper: the
    FlashAttention-2 of most runs reaches 35% of the H100's peak, FlashAttention-3 75%), else
    defaults.yaml's (measured on A100)."""
    own = acc.get("attention_efficiency")
    if not own:
        return default.at(case)
    return Factor("attention_efficiency", float(own["central"]), float(own["low"]),
                  float(own["high"]), "high", str(own["source"])).at(case)


def step_time(cfg: ModelConfig, seq_len: int, acc: Accelerator, n: int, lay: Layout,
              precision: str, recompute: str, factors: dict[str, Factor], case: str = "central",
              peak_flops: float | None = None) -> StepTime:
    """Seconds per optimizer step of `cfg` at `seq_len` on n accelerators laid out as `lay`."""
    lay.check(n, cfg, seq_len)
    f = {k: v.at(case) for k, v in factors.items()}
    f["attention_efficiency"] = attention_efficiency(acc, factors["attention_efficiency"], case)
    rate, wide_rate, peak = rates(acc, precision, f, peak_flops)
    wide_peak = wide_rate / rate * peak if rate else peak
    fp8 = precision_of(precision).catalog == "fp8"
    bw = float(acc.get("memory_bw_gbs")) * BYTES_PER_GB * f["memory_efficiency"]
    act_bytes = activation_bytes(precision)
    latency = link_latency_s(acc)
    gemm_bytes = 1.0 if fp8 else act_bytes
    T, L, tp, pp, cp = seq_len, cfg.n_layer, lay.tp, lay.pp, lay.cp
    m_tokens = lay.micro_batch * T / cp  # tokens of a micro-batch on one device
    mb = lay.micro_batches(T)  # micro-batches per pipeline per step
    notes: list[str] = []

    # GEMMs, forward, per micro-batch on one device: the blocks of its stage (blocks spread
    # evenly over stages), the MTP modules and the LM head (on the last stage; spread here).
    def layer_gemm(layer: int) -> float:
        return sum(c * _gemm_seconds(mm, k, nn, rate, bw, gemm_bytes)
                   for mm, k, nn, c in _block_gemms(cfg, layer, m_tokens, lay))

    n_dense, n_moe = layer_counts(cfg)
    dense_g = layer_gemm(0) if n_dense else 0.0
    moe_g = layer_gemm(L - 1) if n_moe else 0.0
    blocks = n_dense * dense_g + n_moe * moe_g
    head = _gemm_seconds(m_tokens, cfg.d_model, cfg.vocab_size / tp, wide_rate, bw, act_bytes)
    mtp = cfg.mtp_depth * ((moe_g if n_moe else dense_g) + head + _gemm_seconds(
        m_tokens, 2 * cfg.d_model, cfg.d_model, rate, bw, gemm_bytes))
    fwd = (blocks + head + mtp) / pp
    gemm = 3 * fwd * mb  # forward, and the two backward matmuls of each
    re_layers = recomputed_layers(L, recompute) if recompute in ("full", "every_k") else []
    re_dense = sum(not cfg.is_moe_layer(i) for i in re_layers)
    recompute_s = mb * (re_dense * dense_g + (len(re_layers) - re_dense) * moe_g) / pp

    # Attention core: counted FLOPs x 1/2 (causal) x 7/6 (flash backward: 5 matmuls, not 4),
    # in 16-bit.
    core_fwd = _attention_core_flops_forward(cfg, T) * lay.micro_batch * T / (tp * cp * pp)
    attn_rate = wide_peak * f["attention_efficiency"]
    attention = mb * 3 * core_fwd * 0.5 * (7 / 6) / attn_rate
    if recompute != "none":
        share = len(re_layers) / L if re_layers else 1.0  # selective, attention: every layer
        recompute_s += mb * core_fwd * 0.5 * share / attn_rate

    # Memory-bound work: elementwise traffic per token and layer (split over tp by sequence
    # parallelism), fp8 casts of the GEMM inputs, the fp32 loss over the vocabulary, the
    # embedding's gather and its gradient's scatter, and the optimizer update.
    # (the factor counts 2-byte elements; fp32 training moves twice the bytes)
    elem = f["elementwise_bytes_per_dim"] * cfg.d_model * act_bytes / 2
    if fp8:  # casts: read 16-bit, write 8-bit, each GEMM input, forward and both backward
        width = cfg.ffn_hidden if not cfg.is_moe else (
            (cfg.n_experts_active + cfg.n_shared_experts) * cfg.moe_ffn_hidden)
        elem += 3 * 3 * (2 * cfg.d_model + cfg.n_head * cfg.value_head_dim + width)
    # per micro-batch, one layer (or module) of the whole model on this device
    layer_mem = m_tokens / tp * elem / bw
    # MoE token permutation: each of a token's k routed copies is gathered into its expert's
    # block before the experts and scattered back, weighted, after them: a read and a write
    # of d values each way, forward, and twice in the backward pass
    permute = (m_tokens / tp * 3 * 2 * 2 * cfg.n_experts_active * cfg.d_model * act_bytes / bw
               if cfg.is_moe else 0.0)
    logits_mem = m_tokens * 12 * cfg.vocab_size / tp / bw  # fp32 logits: write, read, grad
    # the embedding: read and write each token's row forward, read the gradient and update
    # the row backward (EMBEDDING_BYTES_PER_DIM values per token and model dimension)
    embed_mem = m_tokens / tp * EMBEDDING_BYTES_PER_DIM * cfg.d_model * act_bytes / bw
    memory = mb / pp * (layer_mem * (L + cfg.mtp_depth) + permute * n_moe + logits_mem
                        + embed_mem)
    params = float(_memo("params", cfg, count_params))
    memory += ADAM_BYTES_PER_PARAM * params / lay.devices / bw

    # Tensor-parallel collectives: 4 per layer (2 forward, 2 backward), each of the micro-batch's
    # activations; a ring moves 2(tp-1)/tp of the message, over the scale-up links one way.
    scale_up = acc.get("interconnect_gbs")  # both directions; TPU v3 gives only its pod's
    link = (scale_up / 2 if scale_up else acc.network_gbs()) * BYTES_PER_GB * f["comm_efficiency"]
    # (tp_step_collectives: with sequence parallelism, the embedding and the loss, and the
    # gradient norm; each collective over its own link where the entry has one)
    tp_comm = collectives_seconds(tp_step_collectives(cfg, T, lay, act_bytes), tp,
                                  collective_links(acc, link, latency)) * f["tp_exposed"]

    # Expert-parallel all-to-alls: dispatch and combine, forward and backward, k copies of each
    # token; the share bound for other nodes crosses the scale-out network, the share bound for
    # other accelerators of the same node the scale-up links.
    net = acc.network_gbs() * BYTES_PER_GB * f["comm_efficiency"]
    node = acc.node_size()
    ep_comm = 0.0
    if cfg.is_moe and lay.ep > 1:
        moe_layers = n_moe / pp
        per_copy = (gemm_bytes + act_bytes) * 2 * cfg.d_model
        inside = cfg.n_experts_active * (min(lay.ep, node) - 1) / lay.ep
        ep_comm = mb * moe_layers * m_tokens * per_copy * (
            remote_copies(cfg, lay, node) / net + inside / link)
        if lay.schedule == "dualpipe":  # overlapped with another micro-batch's compute
            ep_comm = max(0.0, ep_comm - (gemm + attention))
        else:
            ep_comm *= f["ep_exposed"]

    # Data-parallel gradient reduce-scatter + parameter all-gather (16-bit), once per step over
    # the network. Sharded data parallelism prefetches the all-gather during the forward pass
    # and reduce-scatters layer by layer during the backward pass, so both hide behind the
    # last micro-batch's forward and backward where they fit.
    # Ranks are laid out tensor-parallel innermost, then data-parallel (Megatron-LM's order),
    # so a node holds node / tp data-parallel replicas of each shard: the collective reduces
    # among them over the scale-up links first, and each of their NICs carries 1/r of the
    # message across nodes (hierarchical all-reduce, Jia et al. 2018, arXiv:1807.11205).
    # (dp_comm_seconds: hierarchical inside and across nodes, 1.5x under ZeRO-3)
    dp_comm = 0.0
    dp_group = lay.dp * lay.cp
    if dp_group > 1:
        local = params / (tp * pp * (lay.ep if cfg.is_moe else 1))
        last = gemm / mb  # forward + backward GEMMs of one micro-batch
        units = int(L / pp) + 1
        raw = dp_comm_seconds(local, dp_group, tp, node, net, link, act_bytes, lay.zero,
                              latency, units=units)
        # the last bucket (or unit) is ready only when the backward pass ends: at most
        # (calls - 1) / calls of the traffic can hide (one bucket: none of it)
        calls = dp_collectives(local, act_bytes, lay.zero, units)
        dp_comm = raw - min(last * f["dp_overlap"], raw * (calls - 1) / calls)

    # Pipeline: activations to the next stage and their gradients back, per micro-batch; v
    # interleaved chunks per device cross v times as many stage boundaries (Narayanan et al.
    # 2021, sec. 2.2.2: "the amount of communication also increases by v").
    pp_comm = (mb * 2 * m_tokens * cfg.d_model * act_bytes / tp / net * lay.virtual_stages
               if pp > 1 else 0.0)

    # Context parallel, over the scale-up links. Ring (ring attention, Liu et al. 2023,
    # arXiv:2310.01889): each device passes its chunk's keys and values around the ring of cp
    # devices (cp - 1 hops), forward, and keys, values and their gradients backward; each hop
    # overlaps with the attention of the chunk in hand, so only what exceeds that attention
    # shows. All-gather (Llama 3): each layer gathers every rank's keys and values before its
    # attention and reduce-scatters their gradients after it, none of it hidden.
    cp_comm = 0.0
    if cp > 1:
        kv_width = cp_kv_width(cfg, tp)
        if lay.cp_exchange == "all-gather":
            cp_comm = mb * cp_allgather_seconds(m_tokens, kv_width, L / pp, cp,
                                                collective_links(acc, link, latency), act_bytes)
        else:
            ring_s = mb * cp_ring_seconds(m_tokens, kv_width, L / pp, cp, link, act_bytes,
                                          latency)
            cp_comm = max(0.0, ring_s - attention)

    compute = gemm + recompute_s + attention + memory + tp_comm
    # Pipeline stages: each one's compute for a micro-batch, forward and backward: its blocks
    # (their GEMMs, memory-bound work and permutation; attention, recomputation and the
    # tensor-parallel collectives spread evenly over the blocks), the embedding on the first,
    # the final norm, LM head, loss and MTP modules on the last (DeepSeek-V3 sec. 2.2 keeps
    # MTP beside the head). The slowest stage sets the pace (bubble_fraction).
    stage_s: list[float] = []
    bubble = 0.0
    if pp > 1:
        spread = (attention + recompute_s + tp_comm) * pp / mb / (L + cfg.mtp_depth)
        dense_c = 3 * dense_g + layer_mem + spread
        moe_c = 3 * moe_g + layer_mem + permute + spread
        ends = 3 * (head + mtp) + logits_mem + cfg.mtp_depth * (layer_mem + spread)
        placement = schedule_placement(lay.schedule)
        stage_s = stage_costs(cfg, pipeline_stages(lay), lay.stage_layers, dense_c, moe_c,
                              embed_mem, ends, pp, placement)
        bubble = compute * bubble_fraction(lay.schedule, pp, mb, lay.virtual_stages,
                                           rank_costs(stage_s, pp, placement))
        if mb < pp:
            notes.append(f"{mb:.3g} micro-batches per step for {pp} pipeline stages: the "
                         "bubble dominates")
    busy = compute + ep_comm + dp_comm + pp_comm + cp_comm + bubble
    stack = busy * (1 / f["stack_efficiency"] - 1)
    tokens = lay.global_batch_tokens
    return StepTime(gemm, recompute_s, attention, memory, tp_comm, ep_comm, dp_comm, pp_comm,
                    bubble, stack, tokens, _memo("flops", cfg, model_flops_per_token, T) * tokens,
                    notes, cp_comm, stage_s)


def remote_copies(cfg: ModelConfig, lay: Layout, node: int) -> float:
    """Copies of a token that cross the network to reach its k experts, spread evenly over
    ep / node nodes. Without node-limited routing each routed expert gets its own copy (k
    copies, the remote share of them leaving the node); with it (DeepSeek-V3 sec. 3.2.2: at
    most M nodes per token, one IB transfer per node, then NVLink inside it) a copy per
    distinct remote node, at most M."""
    nodes = lay.ep / node
    if nodes <= 1:
        return 0.0
    remote = (nodes - 1) / nodes
    k = cfg.n_experts_active
    if lay.max_nodes_per_token is None:
        return k * remote
    distinct = nodes * (1 - (1 - 1 / nodes) ** k)
    return min(lay.max_nodes_per_token, distinct) * remote


def mfu(st: StepTime, n: int, peak: float) -> float:
    """Model FLOPs utilisation of a modelled step."""
    return st.model_flops / (n * peak * st.total)


def goodput(n: int, factors: dict[str, Factor], case: str = "central") -> float:
    """Fraction of wall-clock time that trains on n accelerators: interruptions arrive at
    `interruptions_per_acc_hour` x n per hour (Llama 3: 419 unexpected interruptions in 54
    days on 16,384 H100, Llama Team 2024 sec. 3.3.4); each costs a restart plus, on average,
    half a checkpoint interval of redone work."""
    f = {k: v.at(case) for k, v in factors.items()}
    per_hour = f["interruptions_per_acc_hour"] * n
    lost = f["restart_hours"] + f["checkpoint_interval_hours"] / 2
    return 1.0 / (1.0 + per_hour * lost)
