"""The files that pass between tokenclock's stages, and the only code that parses them.

    data_prep ──► dataset dir (meta.json, tokenizer.json, shards)     contracts.dataset
    train     ──► run dir (config.yaml, metrics.jsonl, summary.json,  contracts.run
                  model.safetensors, tokenizer.json, data_meta.json,
                  checkpoints/step_NNNNNNNN/ with manifest.json)      contracts.checkpoint
    estimate  ◄── summary.json of any run

Every package may import this one; it imports nothing of the project and only the standard
library at module level (PyYAML, a dependency of the project, is imported inside the one
function that reads `config.yaml`). Each format carries `"format": 1`, bumped on any change a
reader of the old format would misread.
"""

from contracts.checkpoint import (
    MANIFEST,
    TRAINER,
    checkpoint_dirs,
    read_trainer,
    sha256_file,
    verify_checkpoint,
    write_manifest,
)
from contracts.dataset import DatasetMeta, read_dataset_meta, write_dataset_meta
from contracts.run import RunDir, RunFiles, RunSummary, locate_run, read_summary, write_summary

__all__ = [
    "MANIFEST",
    "TRAINER",
    "DatasetMeta",
    "RunDir",
    "RunFiles",
    "RunSummary",
    "checkpoint_dirs",
    "locate_run",
    "read_dataset_meta",
    "read_summary",
    "read_trainer",
    "sha256_file",
    "verify_checkpoint",
    "write_dataset_meta",
    "write_manifest",
    "write_summary",
]
