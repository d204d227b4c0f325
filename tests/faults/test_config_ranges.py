"""Every key of the training config has a checked range: a bad value for ANY key is refused at
config time with one line naming the key. The walk covers every field of the config
dataclasses, so a key added without a bad value here (and a range in its RANGES) fails."""

import dataclasses

import pytest

from train.config import TrainConfig, load_config

# One bad value per key (a value of the right type but outside the range where the type allows)
BAD = {
    "data_dir": "' '", "out_dir": "' '", "seed": "-1", "steps": "0", "batch_size": "-16",
    "micro_batch_size": "0", "seq_len": "-1", "mixed_precision": "fp4",
    "activation_checkpointing": "some", "checkpoint_every_k": "0", "compile": "maybe",
    "compile_scope": "layers", "compile_mode": "fast", "compile_optimizer": "maybe",
    "fsdp": "maybe", "world_size": "-2", "threads_per_process": "-1", "eval_every": "0",
    "eval_batches": "0", "log_every": "0", "warmup_steps_excluded": "-1", "peak_samples": "0",
    "checkpoint_every": "-1", "keep_checkpoints": "-1", "resume": "' '", "time_limit_s": "-5",
    "collective_timeout_s": "0", "max_bad_steps": "0", "inject_nan_at_steps": "[3,-1]",
    "tracker": "mlflow", "wandb_project": "' '", "sample_prompt": "[1,2]", "sample_tokens": "-1",
    "sample_temperature": "-0.5", "sample_top_k": "-1",
    "optim.lr": "inf", "optim.min_lr_ratio": "2", "optim.warmup_steps": "-1",
    "optim.weight_decay": "-1", "optim.beta1": "1", "optim.beta2": "-0.1", "optim.eps": "0",
    "optim.grad_clip": "-1", "optim.fused": "maybe",
    "parallel.tp": "0", "parallel.cp": "-1", "parallel.pp": "0", "parallel.schedule": "zigzag",
    "parallel.microbatches": "-1", "parallel.stage_split": "lumpy", "parallel.dp_replicate": "-1",
    "parallel.dp_shard": "-2",
    "parallel.sequence_parallel": "maybe",
    "model.vocab_size": "-1", "model.seq_len": "0", "model.n_layer": "-1", "model.d_model": "0",
    "model.n_head": "0", "model.n_kv_head": "0", "model.ffn_hidden": "-4",
    "model.multiple_of": "0", "model.tie_embeddings": "maybe", "model.rope_theta": "-1",
    "model.norm_eps": "0", "model.init_std": "nan", "model.n_experts": "-1",
    "model.n_experts_active": "-1", "model.n_shared_experts": "-1", "model.moe_ffn_hidden": "-1",
    "model.n_dense_layers": "-1", "model.kv_lora_rank": "-1", "model.q_lora_rank": "-1",
    "model.qk_nope_head_dim": "-1", "model.qk_rope_head_dim": "-1", "model.v_head_dim": "-1",
    "model.mtp_depth": "-1", "model.notes": "[1]",
}


def config_keys(schema=TrainConfig, prefix="") -> list[str]:
    """Every dotted key of the config, nested sections walked."""
    keys = []
    for f in dataclasses.fields(schema):
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested):
            keys += config_keys(nested, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_key_has_a_bad_value_here():
    keys = config_keys()
    assert "optim.grad_clip" in keys and "model.n_layer" in keys  # the walk reaches sections
    assert sorted(keys) == sorted(BAD), "give every new config key a range and a bad value"


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_of_every_key_is_one_line_naming_it(key):
    override = f"{key}={BAD[key]}"
    with pytest.raises(ValueError) as refused:
        load_config(None, [override])
    message = str(refused.value)
    assert "\n" not in message and key in message, message


@pytest.mark.parametrize("override, message", [
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0 (0 = no clipping), got -1"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("threads_per_process=-1", "threads_per_process must be >= 0 (0 = cores / local processes)"),
    ("time_limit_s=-5", "time_limit_s must be >= 0 (0 = no limit), got -5"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1], got 2"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1"),
    ("sample_tokens=-1", "sample_tokens must be >= 0, got -1"),
    ("collective_timeout_s=0.5", "collective_timeout_s must be in [1, 604800], got 0.5"),
])
def test_the_values_the_issue_found_accepted_are_refused(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_the_edges_of_the_ranges_are_valid():
    cfg = load_config(None, ["optim.grad_clip=0", "optim.min_lr_ratio=1", "time_limit_s=0",
                             "threads_per_process=0", "sample_tokens=0", "sample_top_k=0",
                             "sample_temperature=0", "optim.weight_decay=0", "seed=0"])
    assert cfg.optim.grad_clip == 0 and cfg.optim.min_lr_ratio == 1
