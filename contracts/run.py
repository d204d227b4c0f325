"""A training run directory (written by `python -m train`) and its `summary.json` (format 1).

    RUN/
      config.yaml        the fully resolved training config
      metrics.jsonl      one JSON object per step (and the step-0 evaluation)
      summary.json       medians and spread over the steps after warm-up (below)
      model.safetensors  final weights (unsharded, also after fsdp=true)
      tokenizer.json     copied from the dataset
      data_meta.json     the dataset's meta.json (generate and export read its eos token)
      samples.txt        a sample from the final model
      manifest.json      written last: SHA-256 and size of the files generate and export read
                         (RUN_MANIFEST_FILES); removed when a resume starts rewriting them
      checkpoints/       step_NNNNNNNN/ (see contracts.checkpoint)
      run.lock           held (flock) by the run writing here; pid, host, start (contracts.lock)
      earlier_runs/      <UTC time>/: an earlier run's files, set aside by a fresh run here

summary.json keys every reader may rely on (`REQUIRED`): `format`, `device`, `world_size`,
`mixed_precision`, `model` (the model config plus `params`), `seq_len`, `tokens_per_s`,
`step_s`, `mfu` (each a distribution {median, mean, p10, p90, min, max, n}),
`model_flops_per_token`, `hardware_flops_per_token` (with recomputation),
`peak_flops_per_process` {median, min, max, source}, `peak_mem_bytes`. The rest is written by
`train.metrics.summarize` and documented in docs/formats.md.

`launch_training` starts a run as a command (the way ablate, scaling and calibrate do) and
returns its summary: harnesses never import the trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from contracts.checkpoint import (
    MANIFEST,
    SHARDED_INDEX,
    WEIGHTS,
    check_loadable,
    is_checkpoint_dir,
    read_manifest,
    read_trainer,
    write_manifest,
)
from contracts.dataset import META, parse_dataset_meta

FORMAT = 1
ROOT = Path(__file__).resolve().parents[1]  # the checkout: launch/cpu.sh lives here
EOS_TOKEN = "<|endoftext|>"  # the end-of-text token of the BPE data_prep trains
REQUIRED = ("format", "device", "world_size", "mixed_precision", "model", "tokens_per_s",
            "step_s", "mfu", "model_flops_per_token", "peak_flops_per_process")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    weights = property(lambda self: self.root / WEIGHTS)
    tokenizer = property(lambda self: self.root / "tokenizer.json")
    data_meta = property(lambda self: self.root / "data_meta.json")
    samples = property(lambda self: self.root / "samples.txt")
    checkpoints = property(lambda self: self.root / "checkpoints")
    manifest = property(lambda self: self.root / MANIFEST)


# The final files of a run that generate and export read, covered by the run's manifest.json
RUN_MANIFEST_FILES = ("config.yaml", WEIGHTS, "tokenizer.json", "data_meta.json")


def write_run_manifest(run_dir: str | Path) -> dict:
    """Write the run directory's manifest.json over its final files (the trainer's last write)."""
    run = RunDir(run_dir)
    return write_manifest(run.root, names=[n for n in RUN_MANIFEST_FILES if (run.root / n).is_file()])


@dataclass(frozen=True)
class RunSummary:
    """summary.json of a finished run: typed views of the figures readers use, and `raw`."""

    path: Path
    raw: dict

    mfu_median = property(lambda self: float(self.raw["mfu"]["median"]))
    mfu_p10 = property(lambda self: float(self.raw["mfu"].get("p10") or self.mfu_median))
    mfu_p90 = property(lambda self: float(self.raw["mfu"].get("p90") or self.mfu_median))
    tokens_per_s = property(lambda self: self.raw["tokens_per_s"])  # a distribution
    tokens_per_s_median = property(lambda self: float(self.raw["tokens_per_s"]["median"]))
    step_s = property(lambda self: self.raw["step_s"])  # a distribution
    model_flops_per_token = property(lambda self: float(self.raw["model_flops_per_token"]))
    world_size = property(lambda self: int(self.raw["world_size"]))
    mixed_precision = property(lambda self: str(self.raw["mixed_precision"]))
    device = property(lambda self: str(self.raw["device"]))
    params = property(lambda self: int(self.raw["model"]["params"]))
    peak_mem_bytes = property(lambda self: int(self.raw.get("peak_mem_bytes", 0)))
    peak_flops_median = property(lambda self: float(self.raw["peak_flops_per_process"]["median"]))
    peak_source = property(lambda self: str(self.raw["peak_flops_per_process"].get("source", "")))

    @property
    def hardware_flops_per_token(self) -> float | None:
        value = self.raw.get("hardware_flops_per_token")
        return float(value) if value else None

    @property
    def recompute_ratio(self) -> float | None:
        """Hardware / model FLOPs per token of the run (1.0 = no recomputation), if recorded."""
        hw = self.hardware_flops_per_token
        return hw / self.model_flops_per_token if hw else None

    @property
    def on_cpu(self) -> bool:
        return self.device.strip().lower() in ("cpu", "mps")

    @property
    def peak_from_catalog(self) -> bool:
        """True when MFU was taken against a datasheet peak, False for a measured matmul peak."""
        return self.peak_source.startswith("catalog:")


def read_metrics(path: Path) -> tuple[list[dict], bool]:
    """The records of metrics.jsonl, and whether its last line was torn (a run killed or a
    disk filled mid-append leaves half a record there, possibly cut inside a UTF-8 character:
    it is skipped, and the caller who rewrites the file drops it). A bad line anywhere else is
    an error naming the file and the line."""
    records, torn = [], False
    lines = Path(path).read_bytes().splitlines() if Path(path).is_file() else []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i < len(lines) - 1:
                what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not JSON"
                raise ValueError(f"{path}: line {i + 1} is {what}") from None
            torn = True
    return records, torn


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    """Write summary.json, refusing a summary without the keys readers rely on."""
    missing = [k for k in REQUIRED if k not in summary]
    if missing or summary.get("format") != FORMAT:
        raise ValueError(f"summary lacks {missing} or is not format {FORMAT}: a writer bug")
    path = RunDir(run_dir).summary
    path.write_text(json.dumps(summary, indent=2))
    return path


def read_summary(run_dir: str | Path) -> RunSummary:
    """Parse RUN_DIR/summary.json (or the file itself), checking its format and keys."""
    path = Path(run_dir)
    if path.is_dir():
        path = RunDir(path).summary
    if not path.is_file():
        raise ValueError(f"no summary.json at {path}: is {run_dir!r} a finished training run dir?")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)} (format {FORMAT} needs them)")
    if data["format"] != FORMAT:
        raise ValueError(f"{path}: summary format {data['format']!r}, this code reads {FORMAT}")
    if not data["mfu"].get("median"):
        raise ValueError(f"{path}: mfu.median is {data['mfu'].get('median')!r}; the run has no steady steps")
    return RunSummary(path, data)


@dataclass
class RunFiles:
    """What generate and export need of a run directory or one of its checkpoints."""

    config: dict  # the resolved training config
    run_dir: Path
    weights: Path  # model.safetensors, or the sharded checkpoint's .metadata
    sharded: bool
    tokenizer: Path | None
    eos_token: str  # the end-of-text token the training data was packed with


def read_run_config(path: Path) -> tuple[dict, Path]:
    """The resolved training config (as a dict) of a run directory or checkpoint, and the run
    directory it belongs to."""
    path = Path(path)
    if RunDir(path).config.is_file():
        import yaml  # a project dependency; the one non-stdlib import here, kept local

        return yaml.safe_load(RunDir(path).config.read_text()), path
    if is_checkpoint_dir(path):  # RUN/checkpoints/step_NNNNNNNN/
        return read_trainer(path)["config"], path.parent.parent
    raise FileNotFoundError(
        f"{path} is neither a run directory (config.yaml) nor a checkpoint (trainer.json)"
    )


def find_tokenizer(run_dir: Path, config: dict) -> Path | None:
    """The run's tokenizer.json, else the dataset's, else None."""
    for candidate in (RunDir(run_dir).tokenizer, Path(config.get("data_dir", "")) / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    return None


def find_eos_token(tokenizer: Path | None, run_dir: Path, config: dict) -> str:
    """The end-of-text token of the run's data: `eos_token` of the dataset's meta.json as copied
    into the run directory (`data_meta.json`), or of the dataset itself, if that meta.json
    belongs to this tokenizer (same sha256); otherwise `<|endoftext|>`."""
    from contracts.checkpoint import sha256_file

    if tokenizer is None:
        return EOS_TOKEN
    digest = sha256_file(Path(tokenizer))
    metas = [RunDir(run_dir).data_meta]
    metas += [Path(config["data_dir"]) / META] if config.get("data_dir") else []
    for m in metas:
        try:
            meta = parse_dataset_meta(json.loads(m.read_text(encoding="utf-8")), m.parent, str(m))
        except (OSError, ValueError):
            continue
        if meta.tokenizer_sha256 == digest and meta.eos_token:
            return meta.eos_token
    return EOS_TOKEN


TRUST_PICKLE = "--trust-pickle"  # generate's and export's flag to load a sharded checkpoint


def locate_run(path: str | Path, trust_pickle: bool = False) -> RunFiles:
    """The config, weights, tokenizer and end-of-text token of a run directory or checkpoint,
    after checking the files: a checkpoint must match its manifest.json (and the manifest must
    list its weights) or it is refused; a run directory is checked against its manifest.json
    when it has one (runs written before it existed have none). The weights of a run directory
    are always `model.safetensors`. A sharded (FSDP, pipeline) checkpoint is read through its
    consolidated `model.safetensors` where the run wrote one (the last checkpoint of a finished
    run); its DCP files, whose `.metadata` is a pickle that can run code, only with
    `trust_pickle` (a manifest proves the files are whole, not who wrote them)."""
    path = Path(path)
    config, run_dir = read_run_config(path)
    checkpoint = not RunDir(path).config.is_file()  # read_run_config found trainer.json
    sharded = checkpoint and bool(read_trainer(path)["sharded"])
    if sharded and WEIGHTS in (read_manifest(path)[0] or {}):
        sharded = False  # consolidated at the end of the run: read the safetensors
    weights = path / (SHARDED_INDEX if sharded else WEIGHTS)
    if checkpoint:
        check_loadable(path, weights.name)
        if sharded and not trust_pickle:
            raise ValueError(
                f"refusing to load {path}: a sharded (FSDP or pipeline) checkpoint's {SHARDED_INDEX} is a "
                "pickle, which can run code when loaded, and a manifest cannot prove who wrote "
                f"it. Use the run directory's {WEIGHTS} (pickle-free, written at the end of "
                f"every run), or pass {TRUST_PICKLE} if you trust whoever wrote {path}")
    elif not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: the run has not finished (only finished runs and checkpoints "
            "hold weights); pass a checkpoint directory such as "
            f"{RunDir(run_dir).checkpoints / 'step_00000100'}"
        )
    elif RunDir(path).manifest.is_file():
        check_loadable(path, weights.name)
    tokenizer = find_tokenizer(run_dir, config)
    return RunFiles(config, run_dir, weights, sharded, tokenizer,
                    find_eos_token(tokenizer, run_dir, config))


def launch_training(config: str | Path, overrides: list[str], run_dir: Path, nproc: int = 1,
                    env: dict | None = None, python: str = sys.executable) -> RunSummary:
    """Train as a command: `python -m train` for one process, `launch/cpu.sh` for more (on a
    free port). Returns the run's summary; a failed run raises with the command and its tail."""
    args = [str(config), *overrides, f"out_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    if nproc == 1:
        cmd = [python, "-m", "train", *args]
    else:
        launcher = ROOT / "launch" / "cpu.sh"
        if not launcher.is_file():
            raise RuntimeError(f"{launcher} not found: multi-process runs start from a checkout")
        cmd = [str(launcher), *args]
        env.setdefault("MASTER_PORT", str(29500 + (os.getpid() + time.monotonic_ns() // 1000) % 1000))
        env |= {"NPROC": str(nproc), "PY": python}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not RunDir(run_dir).summary.is_file():
        tail = (result.stderr or result.stdout)[-3000:]
        raise RuntimeError(f"training run {run_dir} failed (exit {result.returncode}):\n"
                           f"  {' '.join(cmd)}\n{tail}")
    return read_summary(run_dir)
