"""Peak FLOP/s of the accelerator in use: a sourced catalog for GPUs/TPUs, a measurement on CPU.

MFU is only as honest as its denominator. For accelerators we use the vendor's dense (no
sparsity) peak from `catalog.yaml`, each figure with its source. A CPU has no meaningful
datasheet figure for our purposes, so we measure it: a square matmul in the training dtype,
timed after a warm-up. The measurement is noisy on shared machines, so callers take several
samples (interleaved with the work) and report their spread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Peak:
    """A peak FLOP/s figure and where it came from."""

    flops: float
    source: str


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, dict]:
    """The hardware catalog as {name: entry}; every entry carries a `source`."""
    with open(path) as f:
        data = yaml.safe_load(f)
    return data["accelerators"]


def catalog_peak(device_name: str, dtype: torch.dtype) -> Peak | None:
    """Dense peak for a GPU whose name (as torch reports it) matches a catalog alias."""
    key = _DTYPE_KEYS.get(dtype)
    name = device_name.lower()
    for entry_name, entry in load_catalog().items():
        aliases = [a.lower() for a in entry.get("aliases", [])]
        if any(alias in name for alias in aliases):
            tflops = entry.get(f"{key}_tflops") if key else None
            if tflops is None and key == "fp32":
                tflops = entry.get("tf32_tflops")
            if tflops is None:
                return None
            return Peak(tflops * 1e12, f"catalog:{entry_name} ({entry['source']})")
    return None


def measure_matmul_flops(
    dtype: torch.dtype, device: str | torch.device = "cpu", n: int = 1024, min_seconds: float = 0.3
) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device`, after one warm-up call."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        iters += 1
        if iters % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return 2.0 * n**3 * iters / elapsed


def peak_flops(device: torch.device, dtype: torch.dtype) -> Peak:
    """Catalog peak for a known accelerator, else a measured matmul peak (one sample)."""
    if device.type == "cuda":
        found = catalog_peak(torch.cuda.get_device_name(device), dtype)
        if found is not None:
            return found
    measured = measure_matmul_flops(dtype, device)
    return Peak(measured, f"measured: {_DTYPE_KEYS.get(dtype, str(dtype))} matmul on {device.type}")
