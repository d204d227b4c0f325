"""Reading a training run directory (the files `python -m train` writes), never `train` itself.

Only `summary.json` is needed here. Its format-1 keys used by the estimator:
`format`, `mfu` {median, p10, p90}, `tokens_per_s` {median, p10, p90}, `model_flops_per_token`,
`world_size`, `mixed_precision`, `device`, `peak_flops_per_process` {median, min, max, source};
optional: `hardware_flops_per_token` (tells which recomputation the run used), `hfu`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUMMARY_FORMAT = 1
_REQUIRED = ("format", "mfu", "tokens_per_s", "model_flops_per_token", "world_size",
             "mixed_precision", "device", "peak_flops_per_process")


@dataclass
class RunSummary:
    """The throughput facts of one measured run."""

    path: Path
    mfu_median: float
    mfu_p10: float
    mfu_p90: float
    tokens_per_s_median: float
    model_flops_per_token: float
    hardware_flops_per_token: float | None
    world_size: int
    mixed_precision: str
    device: str
    peak_flops_median: float
    peak_source: str
    raw: dict

    @property
    def recompute_ratio(self) -> float | None:
        """Hardware / model FLOPs per token of the run (1.0 = no recomputation), if recorded."""
        if not self.hardware_flops_per_token:
            return None
        return self.hardware_flops_per_token / self.model_flops_per_token

    @property
    def on_cpu(self) -> bool:
        return self.device.strip().lower() in ("cpu", "mps")

    @property
    def peak_from_catalog(self) -> bool:
        """True when MFU was taken against a datasheet peak, False for a measured matmul peak."""
        return self.peak_source.startswith("catalog:")


def read_summary(run_dir: str | Path) -> RunSummary:
    """Parse RUN_DIR/summary.json (or a path to the file itself), checking format and keys."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise ValueError(f"no summary.json at {path}: is {run_dir!r} a finished training run dir?")
    data = json.loads(path.read_text())
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)} (format {SUMMARY_FORMAT} needs them)")
    if data["format"] != SUMMARY_FORMAT:
        raise ValueError(f"{path}: summary format {data['format']!r}, this estimator reads {SUMMARY_FORMAT}")
    mfu = data["mfu"]
    if not mfu.get("median"):
        raise ValueError(f"{path}: mfu.median is {mfu.get('median')!r}; the run has no steady steps")
    peak = data["peak_flops_per_process"]
    return RunSummary(
        path=path,
        mfu_median=float(mfu["median"]),
        mfu_p10=float(mfu.get("p10") or mfu["median"]),
        mfu_p90=float(mfu.get("p90") or mfu["median"]),
        tokens_per_s_median=float(data["tokens_per_s"]["median"]),
        model_flops_per_token=float(data["model_flops_per_token"]),
        hardware_flops_per_token=(float(data["hardware_flops_per_token"])
                                  if data.get("hardware_flops_per_token") else None),
        world_size=int(data["world_size"]),
        mixed_precision=str(data["mixed_precision"]),
        device=str(data["device"]),
        peak_flops_median=float(peak["median"]),
        peak_source=str(peak.get("source", "")),
        raw=data,
    )
