"""Training configuration: dataclasses loaded from YAML with `key=value` command-line overrides.

OmegaConf structured configs give us typed fields, dotted overrides (`train.lr=3e-4` style:
here `optim.lr=3e-4`) and errors for unknown keys. A `model.preset` key picks a preset from
`model.config.PRESETS` whose explicit fields the rest of the `model:` section then overrides;
derived fields (SwiGLU width, kv heads, expert width) follow the final shape unless given.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from contracts.config import Choice, Each, Flag, Range, Text, check_ranges, load_structured
from model.config import DERIVED, PRESET_FIELDS, ModelConfig, preset_fields
from model.flops import TRAINABLE_RECOMPUTE
from model.precision import TRAINING_SWITCHES

PRECISIONS = TRAINING_SWITCHES
CHECKPOINTING = TRAINABLE_RECOMPUTE
COMPILE_SCOPES = ("model", "blocks")
COMPILE_SWITCH = ("auto", "true", "false")  # auto: compile on a CUDA GPU, not on CPU or MPS
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's `mode`
# Switches whose "off" is a word, and that word. YAML reads `no`, `off` and `false` as the
# boolean False and `null` or `~` as None, so `mixed_precision=no` would arrive as False.
OFF_WORDS = {"mixed_precision": "no", "activation_checkpointing": "none", "tracker": "none",
             "resume": "none", "compile": "false"}


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1  # applied to >= 2-D parameters only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = True  # use the fused AdamW kernel where torch has one for the device


OPTIM_RANGES = {
    "lr": Range(0, open_lo=True), "min_lr_ratio": Range(0, 1), "warmup_steps": Range(0),
    "weight_decay": Range(0), "beta1": Range(0, 1, open_hi=True),
    "beta2": Range(0, 1, open_hi=True), "eps": Range(0, open_lo=True),
    "grad_clip": Range(0, note="0 = no clipping"), "fused": Flag(),
}


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble", "dualpipev")  # torch's pipelining
PP_STAGE_SPLITS = ("even", "balanced")  # train.parallel.pipeline.stage_ranges


@dataclass
class ParallelConfig:
    """How the world's processes are laid out: tp x cp x pp x dp_replicate x dp_shard = world.
    Data parallel takes whatever the other degrees leave (0 = that remainder)."""
    tp: int = 1  # tensor parallel degree (Megatron column/row sharding of attention and MLP)
    cp: int = 1  # context parallel degree (the sequence split across ranks)
    pp: int = 1  # pipeline parallel stages (torch.distributed.pipelining)
    schedule: str = "1f1b"  # pipeline schedule: gpipe | 1f1b | interleaved | zero_bubble | dualpipev
    microbatches: int = 0  # pipeline micro-batches per step per dp rank; 0 = from micro_batch_size
    stage_split: str = "balanced"  # pipeline blocks per stage: balanced (equal FLOPs, embedding and LM head counted) | even (equal counts)
    dp_replicate: int = 0  # replicated data-parallel degree (DDP); 0 = the remainder
    dp_shard: int = 0  # sharded data-parallel degree (FSDP2; > 1 sets fsdp=true); 0 = the remainder when fsdp=true, else 1
    sequence_parallel: bool = True  # with tp > 1: norms and residuals on 1/tp of the sequence


PARALLEL_RANGES = {
    "tp": Range(1), "cp": Range(1), "pp": Range(1), "schedule": Choice(PP_SCHEDULES),
    "microbatches": Range(0, note="0 = from micro_batch_size"),
    "stage_split": Choice(PP_STAGE_SPLITS),
    "dp_replicate": Range(0, note="0 = the remainder"), "dp_shard": Range(0, note="0 = the remainder"),
    "sequence_parallel": Flag(),
}


@dataclass
class TrainConfig:
    data_dir: str = "data/demo"
    out_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1337
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # global sequences per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 0  # 0 = model.seq_len
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU) | fp8 (torchao float8, CUDA >= sm_89)
    activation_checkpointing: str = "none"  # none | full (every block) | every_k | attention
    checkpoint_every_k: int = 2  # with activation_checkpointing=every_k
    compile: str = "auto"  # auto (compile on a CUDA GPU, not on CPU/MPS) | true | false
    compile_scope: str = "model"  # model (one graph) | blocks (each block on its own)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    compile_optimizer: bool = False  # torch.compile the AdamW step (its foreach implementation)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2, train/fsdp.py)
    world_size: int = 0  # processes this run must have; 0 = $WORLD_SIZE or 1
    threads_per_process: int = 0  # torch threads per process; 0 = cores / local processes
    eval_every: int = 50  # steps between validation passes (and a final one)
    eval_batches: int = 8  # micro-batches per validation pass, per rank
    log_every: int = 10  # steps between log lines (metrics.jsonl gets every step)
    warmup_steps_excluded: int = 5  # first steps left out of the throughput summary
    peak_samples: int = 3  # CPU matmul peak measurements (start, evals, end)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only on preemption
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 keeps all
    resume: str = "none"  # none | auto (newest valid checkpoint in out_dir) | a checkpoint dir
    time_limit_s: float = 0.0  # checkpoint and exit before this much wall time; 0 = no limit
    collective_timeout_s: float = 600.0  # a rank silent this long in a collective ends the run
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    inject_nan_at_steps: list[int] = field(default_factory=list)  # fault injection, for tests
    tracker: str = "wandb"  # wandb | tensorboard | none (train/trackers.py)
    wandb_project: str = "tokenclock"
    sample_prompt: str = "def "
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 40


_POSITIVE, _COUNT = Range(0, open_lo=True), Range(0)
# The valid range of every key (the model's are model.config.RANGES, the optimizer's
# OPTIM_RANGES): checked at config time, each refusal one line naming the key.
RANGES = {
    "data_dir": Text(empty=False), "out_dir": Text(empty=False),
    "seed": Range(0, 2**32 - 1),  # numpy's seeds
    "steps": _POSITIVE, "batch_size": _POSITIVE, "micro_batch_size": _POSITIVE,
    "seq_len": Range(0, note="0 = model.seq_len"), "mixed_precision": Choice(PRECISIONS),
    "activation_checkpointing": Choice(CHECKPOINTING), "checkpoint_every_k": _POSITIVE,
    "compile": Choice(COMPILE_SWITCH), "compile_scope": Choice(COMPILE_SCOPES),
    "compile_mode": Choice(COMPILE_MODES), "compile_optimizer": Flag(), "fsdp": Flag(),
    "world_size": Range(0, note="0 = $WORLD_SIZE or 1"),
    "threads_per_process": Range(0, note="0 = cores / local processes"),
    "eval_every": _POSITIVE, "eval_batches": _POSITIVE, "log_every": _POSITIVE,
    "warmup_steps_excluded": _COUNT, "peak_samples": _POSITIVE,
    "checkpoint_every": Range(0, note="0 = only on preemption"),
    "keep_checkpoints": Range(0, note="0 keeps all"), "resume": Text(empty=False),
    "time_limit_s": Range(0, note="0 = no limit"),
    "collective_timeout_s": Range(1, 7 * 24 * 3600),
    "max_bad_steps": _POSITIVE, "inject_nan_at_steps": Each(_POSITIVE),
    "tracker": Choice(("wandb", "tensorboard", "none")), "wandb_project": Text(empty=False),
    "sample_prompt": Text(), "sample_tokens": _COUNT,
    "sample_temperature": Range(0, note="0 = greedy"),
    "sample_top_k": Range(0, note="0 = every token"),
}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Merge defaults, the YAML file at `path` and `key=value` overrides into a TrainConfig."""
    cfg: TrainConfig = load_structured(TrainConfig, path, overrides, example="optim.lr=3e-4",
                                       prepare=_presets_and_off_words)
    validate(cfg)
    return cfg


def _presets_and_off_words(base, user, overrides: list[str]):
    """Before merging: `model.preset` (from the file or an override, the override winning)
    becomes the model section's defaults, and off switches are spelled as their word."""
    for key, off in OFF_WORDS.items():
        if key in user and _means_off(key, user[key]):
            user[key] = off
    preset = None
    if "preset" in (user.get("model") or {}):
        preset = user.model.pop("preset")
    kept = []
    for override in overrides:
        key, value = override.split("=", 1)
        if key == "model.preset":
            preset = value
            continue
        if key in OFF_WORDS and _means_off(key, OmegaConf.from_dotlist([override])[key]):
            user[key] = OFF_WORDS[key]  # a dotlist would read `no` back as False
            continue
        kept.append(override)
    # The model section starts from the preset's explicit fields (or the defaults) with the
    # derived ones (DERIVED: ffn_hidden, n_kv_head, moe_ffn_hidden) unset, so that they are
    # computed from the final shape unless the preset or the user gives them.
    model = OmegaConf.structured(ModelConfig)
    for name in DERIVED:
        model[name] = None
    if preset is not None:
        model = OmegaConf.merge(model, preset_fields(str(preset)))
    base.model = model
    return base, user, kept


def _means_off(key: str, value) -> bool:
    """False, None and (except for `resume`, a path) the strings false/no/none/off/null mean
    the switch's off word: `mixed_precision=no` and `tracker=false` mean what they say."""
    if value is None or value is False:
        return True
    spelled = str(value).lower()
    return spelled in ("null", "~") or (key != "resume" and spelled in ("false", "no", "none", "off"))


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the bad value and what would be valid."""
    cfg.compile = str(cfg.compile).lower()  # YAML's true/false arrive as "True"/"False"
    check_ranges(cfg, RANGES, skip=("model", "optim", "parallel"))
    check_ranges(cfg.optim, OPTIM_RANGES, "optim.")
    check_ranges(cfg.parallel, PARALLEL_RANGES, "parallel.")
    if cfg.parallel.dp_shard > 1:  # sharded data parallel is FSDP2: config.yaml says fsdp=true
        cfg.fsdp = True
    if cfg.parallel.pp > 1:
        validate_pipeline(cfg)
    if cfg.seq_len > cfg.model.seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds model.seq_len={cfg.model.seq_len}")
    cfg.model.validate()
    check_tp_cp(cfg)


def check_tp_cp(cfg: TrainConfig) -> None:
    """The tensor- and context-parallel layouts the trainer runs (train/parallel/layout.py),
    each other combination refused in one line."""
    p, m = cfg.parallel, cfg.model
    if p.tp == 1 and p.cp == 1:
        return
    where = f"parallel.tp={p.tp}, parallel.cp={p.cp}"
    if p.pp > 1:
        raise ValueError(f"{where} with parallel.pp={p.pp}: pipeline stages do not compose with "
                         "tensor/context parallel yet; what runs: tp/cp x data parallel (DDP, or "
                         "FSDP2 with fsdp=true), or pp x DDP")
    if m.is_mla or m.n_experts:
        raise ValueError(f"{where}: standard attention and dense MLPs only; multi-head latent "
                         "attention (model.kv_lora_rank) and MoE (model.n_experts) are not split")
    for key in ("n_kv_head", "ffn_hidden", "vocab_size"):
        if getattr(m, key) % p.tp:
            raise ValueError(f"parallel.tp={p.tp} needs model.{key} ({getattr(m, key)}) "
                             "divisible by it: a rank holds whole heads, hidden columns and "
                             "vocabulary rows")
    seq_len = cfg.seq_len or m.seq_len
    chunks = 2 * p.cp * (p.tp if p.sequence_parallel else 1) if p.cp > 1 else p.tp
    if seq_len % chunks:
        raise ValueError(f"seq_len={seq_len} must be a multiple of {chunks} at {where} (context "
                         "parallel cuts 2 x cp chunks, sequence parallel tp shards of each rank's)")
    if cfg.compile == "true" or cfg.mixed_precision == "fp8":
        raise ValueError(f"{where}: compile=true and mixed_precision=fp8 are not supported with "
                         "tensor/context parallel; use compile=false")


# Switches a pipelined run (parallel.pp > 1) does not combine with, and why, in one line each
PP_REFUSED = {
    "fsdp": "pipeline stages are not sharded with FSDP here; use fsdp=false (data parallel "
            "across pipelines is plain replication)",
    "compile": "the pipeline stages are not compiled; use compile=false",
    "compile_optimizer": "the pipelined optimizer is not compiled; use compile_optimizer=false",
    "mixed_precision": "the pipeline runs in fp32 only so far (autocast's dtypes against the "
                       "stages' inferred transfer shapes are untested); use mixed_precision=no",
}


def validate_pipeline(cfg: TrainConfig) -> None:
    """One-line refusals of what parallel.pp > 1 does not run (the world's size is checked at
    launch: train.parallel.pp_train.check_layout)."""
    pp, schedule = cfg.parallel.pp, cfg.parallel.schedule
    on = {"fsdp": cfg.fsdp, "compile": cfg.compile == "true",
          "compile_optimizer": cfg.compile_optimizer,
          "mixed_precision": cfg.mixed_precision != "no"}
    for key, why in PP_REFUSED.items():
        if on[key]:
            value = getattr(cfg, key)
            value = str(value).lower() if isinstance(value, bool) else value
            raise ValueError(f"parallel.pp={pp} with {key}={value}: {why}")
    if cfg.compile == "auto":  # would compile on a GPU: settled here, config.yaml says so
        cfg.compile = "false"
    v = 1 if schedule in ("gpipe", "1f1b") else 2  # stages per rank (pipeline.SCHEDULES)
    if cfg.model.n_layer < pp * v:
        raise ValueError(f"parallel.pp={pp} with parallel.schedule={schedule} splits the model into "
                         f"{pp * v} stages of whole blocks: model.n_layer={cfg.model.n_layer} must "
                         f"be >= {pp * v}")


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe_keys() -> str:
    """Every config key with its default and the comment beside its field (for --help), then
    the model presets."""
    lines = []
    for prefix, schema in (("", TrainConfig), ("optim.", OptimConfig), ("parallel.", ParallelConfig),
                           ("model.", ModelConfig)):
        comments = _field_comments(schema)
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        for f in dataclasses.fields(schema):
            if f.name in ("model", "optim", "parallel"):
                continue
            value = defaults[f.name]
            if prefix == "model." and f.name in DERIVED:
                value = "(derived)"
            elif isinstance(value, str) and (not value or value != value.strip()):
                value = repr(value)
            note = comments.get(f.name, "")
            lines.append(f"  {prefix + f.name}={value}" + (f"  # {note}" if note else ""))
    lines.append("  model.preset=NAME  # start the model section from a preset: "
                 + ", ".join(PRESET_FIELDS))
    return "\n".join(lines)


def _field_comments(schema: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source, by field name."""
    comments = {}
    for line in inspect.getsource(schema).splitlines():
        m = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments
