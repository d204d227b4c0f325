"""Experiment trackers through Accelerate: `tracker=wandb`, `tracker=tensorboard` or `tracker=none`.

wandb runs online when the user has credentials (WANDB_API_KEY, or a key stored by `wandb login`
in ~/.netrc) and offline otherwise, into OUT/wandb/, to be uploaded later with
`wandb sync OUT/wandb/offline-run-*`. An explicit WANDB_MODE (online, offline, disabled)
always wins. TensorBoard event files go to OUT/tensorboard/ (`tensorboard --logdir OUT`).
metrics.jsonl is written either way: trackers are a view, not the record.
"""

from __future__ import annotations

import dataclasses
import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

TRACKERS = ("wandb", "tensorboard", "none")
log = logging.getLogger("train")


def wandb_has_credentials(env: dict[str, str] | None = None) -> bool:
    """True when wandb could log in: WANDB_API_KEY is set or the netrc file (NETRC or ~/.netrc,
    where `wandb login` stores the key) has an entry for the wandb host."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_mode(env: dict[str, str] | None = None) -> str:
    """WANDB_MODE if the user set it, else online with credentials and offline without."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if wandb_has_credentials(env) else "offline"


def log_with(tracker: str) -> str | None:
    """The Accelerator's `log_with` for a tracker name; for wandb, also fix WANDB_MODE for this
    process (and the ones it starts) so that every rank agrees."""
    if tracker not in TRACKERS:
        raise ValueError(f"tracker={tracker!r}; valid: {', '.join(TRACKERS)}")
    if tracker == "wandb":
        os.environ["WANDB_MODE"] = wandb_mode()
    return None if tracker == "none" else tracker


def flat_config(value, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as {"model.d_model": 256, ...} with scalar values only (TensorBoard's
    hparams accept nothing else): lists become their string, None the string "none"."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        flat: dict[str, bool | int | float | str] = {}
        for key, item in value.items():
            flat.update(flat_config(item, f"{prefix}{key}."))
        return flat
    key = prefix.rstrip(".")
    if value is None:
        return {key: "none"}
    return {key: value if isinstance(value, bool | int | float | str) else str(value)}


def init_args(cfg, out: Path) -> dict:
    """Keyword arguments for `Accelerator.init_trackers`, and a log line saying where the
    tracker writes (for offline wandb: the command that uploads the run later)."""
    if cfg.tracker == "wandb":
        mode = os.environ.get("WANDB_MODE", "offline")
        where = {
            "online": f"wandb online, project {cfg.wandb_project}",
            "offline": f"wandb offline in {out}/wandb; upload later with "
            f"`wandb sync {out}/wandb/offline-run-*`",
        }.get(mode, f"wandb mode {mode}")
        log.info(f"tracker: {where}")
        return {"project_name": cfg.wandb_project, "config": dataclasses.asdict(cfg),
                "init_kwargs": {"wandb": {"dir": str(out)}}}
    if cfg.tracker == "tensorboard":
        # accelerate writes to <project_dir>/<project_name>: OUT/tensorboard
        log.info(f"tracker: TensorBoard in {out}/tensorboard; view with `tensorboard --logdir {out}`")
        return {"project_name": "tensorboard", "config": flat_config(cfg)}
    raise ValueError(f"no tracker to initialise for tracker={cfg.tracker!r}")
