"""Load a trained model from a run directory or one of its checkpoints (for generate, export).

Where the files are (config, weights, tokenizer, end-of-text token) is `contracts.run.locate_run`;
this module rebuilds the `Transformer` and loads its weights: `model.safetensors`, or the sharded
files of an FSDP checkpoint (torch.distributed.checkpoint), into one unsharded model.

`locate_run` refuses a checkpoint whose files do not match its manifest, and a run directory
whose files do not match its manifest when it has one. Loading safetensors runs no code; DCP's
`.metadata` is a pickle, unpickled only after that check (`check_loadable`, repeated here before
the DCP read) and only when the caller says it trusts the writer (`trust_pickle`, generate's and
export's --trust-pickle): the check catches corruption, not a forger who rewrites the manifest
too (docs/faults.md). The last checkpoint of a finished FSDP run also holds consolidated
safetensors weights, read without the flag.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

from contracts.checkpoint import SHARDED_INDEX, check_loadable
from contracts.run import EOS_TOKEN, TRUST_PICKLE, locate_run
from model.config import ModelConfig
from model.hf import fuse_separate
from model.transformer import Transformer

UNFUSED = ("saved before q/k/v and gate/up were fused into one projection each (wqkv, "
           "w_gate_up)")


def unfused_names(names) -> list[str]:
    """The separate key or gate weights among parameter `names` (a run saved before the
    fusion; today's model has neither name), [] for a run of today's model."""
    return sorted(n for n in names if n.endswith((".wk.weight", ".w_gate.weight")))


def load_weights(model: Transformer, path: Path) -> None:
    """Load `model.safetensors` into `model` (strict): weights of a run saved before the
    projections were fused are stacked into the fused ones as they load (`fuse_separate`);
    a tied embedding, stored once, fills both names."""
    model.load_state_dict(with_tied(fuse_separate(load_file(str(path))), model.cfg), strict=True)


def with_tied(state: dict, cfg: ModelConfig) -> dict:
    """`state` with a tied embedding under both of its names (stored under one, or held under
    one by each of a pipeline's first and last stages)."""
    if cfg.tie_embeddings:
        shared = state.get("tok_emb.weight", state.get("lm_head.weight"))
        state.setdefault("tok_emb.weight", shared)
        state.setdefault("lm_head.weight", shared)
    return state


def refuse_unfused(path: Path) -> None:
    """Raise ValueError (one line) if the weights file `path` holds separate q/k/v or gate/up
    weights: resuming such a run would need its optimizer state re-stacked too."""
    with safe_open(str(path), "pt") as f:
        old = unfused_names(set(f.keys()))
    if old:
        raise ValueError(f"cannot resume from {path.parent}: it was {UNFUSED}; generate and "
                         f"export still load it (weights mapped), training cannot continue it")


@dataclasses.dataclass
class LoadedRun:
    """A trained model with where it came from: the weights' directory, the tokenizer file."""

    model: Transformer
    cfg: ModelConfig
    weights: Path
    tokenizer_path: Path | None
    eos_token: str = EOS_TOKEN  # the end-of-text token the training data was packed with


def model_config_from_dict(section: dict) -> ModelConfig:
    """The `model:` section of a run's resolved config as a ModelConfig (unknown keys are
    errors); a vocab_size of 0 was never resolved from data, so it is no trained model."""
    cfg = ModelConfig.from_dict(section)
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} in the run's config: not a trained model")
    return cfg


def load_sharded_weights(model: Transformer, path: Path) -> None:
    """Load the weights of an FSDP checkpoint (torch.distributed.checkpoint: one file of slices
    per rank, indexed by `.metadata`) into an unsharded model, in this one process. Refuses
    (ValueError) a directory whose files do not match its manifest before DCP reads anything."""
    check_loadable(path, SHARDED_INDEX)
    state = {"model": model.state_dict()}  # the run saved {"model": ..., "optimizer": ...}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if unfused_names({k.removeprefix("model.") for k in saved}):
        raise ValueError(f"cannot load the sharded checkpoint {path}: it was {UNFUSED}, which "
                         "is mapped for model.safetensors only")
    with warnings.catch_warnings():  # "...assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"], strict=True)


def add_trust_pickle(parser) -> None:
    """generate's and export's flag for loading a sharded checkpoint's pickled DCP files."""
    parser.add_argument(
        TRUST_PICKLE, action="store_true",
        help="load a sharded (FSDP) checkpoint through its DCP files, whose .metadata is a "
        "pickle that can RUN CODE: only for checkpoints you wrote yourself (finished runs and "
        "their last checkpoint have pickle-free model.safetensors)")


def load_run(path: str | Path, device: str | torch.device = "cpu",
             trust_pickle: bool = False) -> LoadedRun:
    """Rebuild the model of a run directory or checkpoint and load its weights (eval mode):
    `model.safetensors`, or, with `trust_pickle`, an FSDP checkpoint's sharded files."""
    files = locate_run(path, trust_pickle)
    cfg = model_config_from_dict(files.config["model"])
    model = Transformer(cfg)
    if files.sharded:
        load_sharded_weights(model, files.weights.parent)
    else:
        load_weights(model, files.weights)
    return LoadedRun(model.to(device).eval(), cfg, files.weights, files.tokenizer, files.eos_token)
