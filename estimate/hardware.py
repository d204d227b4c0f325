"""The hardware catalog: dense peaks, measured matmul ceilings, memory, links and network.

MFU is only as honest as its denominator. For accelerators we use the vendor's dense (no
sparsity) peak from `catalog.yaml`, each figure with its source. A CPU has no meaningful
datasheet figure for our purposes: the trainer measures one (`train.clock`). No torch here:
the estimator is arithmetic.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from model.precision import PRECISIONS as PRECISION_TABLE
from model.precision import precision

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")


@dataclass
class Peak:
    """A peak FLOP/s figure and where it came from."""

    flops: float
    source: str


# The catalog columns (`<key>_tflops`), model.precision's keys in display order: the reduced
# precisions first, fp32 (the fallback) last.
PRECISIONS = (*[k for k in PRECISION_TABLE if k != "fp32"], "fp32")
REQUIRED_FIELDS = (
    "vendor", "memory_gb", "memory_bw_gbs", "interconnect_gbs", "tdp_w", "source",
    "matmul_ceiling", "network_gbs", "node_size", "network_source",
)


@cache
def _parsed(path: str, mtime_ns: int) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def read_yaml(path: str | Path) -> dict:
    """A YAML file, parsed once per version of it (validation reads the catalog and the
    defaults hundreds of times); a copy, so callers may change it."""
    return copy.deepcopy(_parsed(str(path), os.stat(path).st_mtime_ns))


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, dict]:
    """The hardware catalog as {name: entry}; every entry carries a `source`."""
    return read_yaml(path)["accelerators"]


@dataclass(frozen=True)
class Accelerator:
    """One catalog entry: dense peaks per precision and the figures energy/memory checks use."""

    name: str
    entry: dict

    @property
    def source(self) -> str:
        return self.entry["source"]

    @property
    def logical_devices(self) -> int:
        return int(self.entry.get("logical_devices", 1))

    def precisions(self) -> list[str]:
        """Precisions with a peak in the catalog, in PRECISIONS order."""
        return [p for p in PRECISIONS if self.entry.get(f"{p}_tflops") is not None]

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s per accelerator (package) in `precision`; raises naming what exists."""
        tflops = self.entry.get(f"{precision}_tflops")
        if tflops is None:
            raise ValueError(
                f"{self.name} has no {precision} peak in the catalog; "
                f"available: {', '.join(self.precisions()) or 'none'}"
            )
        return float(tflops) * 1e12

    def matmul_ceiling(self, precision_name: str) -> float | None:
        """Measured max achievable matmul FLOP/s as a fraction of the dense peak, or None.

        `precision_name` is any spelling model.precision accepts; its catalog key is looked up.
        fp16 takes bf16's figure when it has none of its own (same tensor-core rate); tf32 and
        fp32 are never measured: None. None also where the entry has no measurement (`missing`
        says why) and the caller uses its stated default.
        """
        key = precision(precision_name).catalog
        table = self.entry.get("matmul_ceiling") or {}
        if key in ("tf32", "fp32"):
            return None
        value = table.get(key)
        if value is None and key == "fp16":
            value = table.get("bf16")
        return None if value is None else float(value)

    def network_gbs(self) -> float:
        """Scale-out bandwidth per accelerator, one direction, GB/s; raises naming the entry."""
        return float(self._required("network_gbs"))

    def node_size(self) -> int:
        """Accelerators per scale-up domain (NVLink/Infinity Fabric node, TPU pod)."""
        return int(self._required("node_size"))

    def _required(self, field: str):
        value = self.entry.get(field)
        if value is None:
            why = (self.entry.get("missing") or {}).get(field, "not in the catalog")
            raise ValueError(f"{self.name} has no {field} in the catalog: {why}")
        return value

    def get(self, field: str):
        """A catalog field (memory_gb, tdp_w, ...), None where the vendor gives none."""
        return self.entry.get(field)


def get_accelerator(name: str, catalog: dict[str, dict] | None = None) -> Accelerator:
    """The catalog entry `name` (case-insensitive); an unknown name lists the valid ones."""
    catalog = catalog if catalog is not None else load_catalog()
    for key, entry in catalog.items():
        if key.lower() == name.strip().lower():
            return Accelerator(key, entry)
    raise ValueError(
        f"unknown accelerator {name!r}; valid (case-insensitive): {', '.join(catalog)}"
    )


def match_device_name(device_name: str, catalog: dict[str, dict] | None = None) -> Accelerator | None:
    """The entry whose alias is the longest substring of `device_name` (as torch reports it).

    Longest match, so "NVIDIA A100 80GB PCIe" picks the PCIe entry over the generic "a100 80gb"
    alias, and "NVIDIA GB200" picks GB200 over "b200".
    """
    catalog = catalog if catalog is not None else load_catalog()
    name = device_name.lower()
    best: tuple[int, str] | None = None
    for key, entry in catalog.items():
        for alias in entry.get("aliases", []):
            if alias.lower() in name and (best is None or len(alias) > best[0]):
                best = (len(alias), key)
    return Accelerator(best[1], catalog[best[1]]) if best else None


def catalog_peak(device_name: str, precision_name: str) -> Peak | None:
    """Dense peak per framework device for a GPU whose name matches a catalog alias.

    A package the framework splits into several devices (MI250X: 2 GCDs) has its peak divided
    accordingly. fp32 falls back to the TF32 tensor-core peak where there is no fp32 figure.
    """
    key = precision(precision_name).catalog
    acc = match_device_name(device_name)
    if acc is None:
        return None
    tflops = acc.get(f"{key}_tflops")
    if tflops is None and key == "fp32":
        tflops = acc.get("tf32_tflops")
    if tflops is None:
        return None
    per_device = tflops * 1e12 / acc.logical_devices
    return Peak(per_device, f"catalog:{acc.name} ({acc.source})")
