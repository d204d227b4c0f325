"""Clocks for every training step: phase timings, throughput, FLOP utilisation and memory.

Definitions (all per optimizer step):
- `data_wait_s`: time spent fetching the step's micro-batches from the loader;
- `fwd_bwd_s`: forward + backward of all micro-batches (with DDP this includes the gradient
  all-reduce, which overlaps the last backward);
- `optim_s`: gradient clipping + optimizer step + zeroing;
- `step_s`: wall time of the whole step; `tokens_per_s` counts tokens of all ranks;
- `mfu`: model FLOPs (6N + 12LdT per token, `model.flops`) per second over the peak of all
  processes; `hfu` uses the FLOPs actually executed under activation recomputation.

On a GPU the peak comes from the sourced catalog; on a CPU it is measured with a matmul in the
training dtype, several times during the run (the machine's speed drifts), and the MFU is
reported against the median with the spread of the samples beside it.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from estimate.hardware import Peak, catalog_peak
from model.precision import Precision


class PhaseTimer:
    """Wall-clock phases of one step; synchronises CUDA so GPU work is attributed correctly."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.phases: dict[str, float] = {}
        self._start = self._last = 0.0

    def start(self) -> None:
        self.sync()
        self.phases = {}
        self._start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        return self._last - self._start


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


class PeakSampler:
    """Peak FLOP/s per process: one catalog figure on a GPU, repeated measurements on a CPU."""

    def __init__(self, device: torch.device, precision: Precision):
        self.device, self.precision = device, precision
        self.dtype = getattr(torch, precision.torch_dtype)
        self.samples: list[float] = []
        self.catalog: Peak | None = None
        if device.type == "cuda":
            self.catalog = catalog_peak(torch.cuda.get_device_name(device), precision.catalog)

    @property
    def source(self) -> str:
        if self.catalog is not None:
            return self.catalog.source
        return (f"measured: {self.precision.catalog} 1024^3 matmul on {self.device.type}, best of 3 trials, "
                f"{len(self.samples)} samples")

    def sample(self, trials: int = 3) -> None:
        """Measure once more (CPU, or a GPU missing from the catalog): the best of a few short
        trials, since a peak is what the hardware can reach, and a busy neighbour only lowers it."""
        if self.catalog is None:
            best = max(measure_matmul_flops(self.dtype, self.device, min_seconds=0.1)
                       for _ in range(trials))
            self.samples.append(best)

    def median(self) -> float:
        return self.catalog.flops if self.catalog else statistics.median(self.samples)

    def spread(self) -> dict:
        values = [self.catalog.flops] if self.catalog else self.samples
        return {"median": self.median(), "min": min(values), "max": max(values),
                "samples": values, "source": self.source}


def time_allreduce(numel: int, device: torch.device, repeats: int = 3) -> float:
    """Median seconds for an all-reduce of `numel` fp32 values, the size of the gradients.

    DDP overlaps its gradient all-reduce with the backward pass, so the step clock cannot
    separate it; this probe, run at evaluation steps, measures what the communication alone
    costs on this process group (an upper bound on what the overlap can hide).
    """
    import torch.distributed as dist

    buffer = torch.ones(numel, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    """"cpu" (or "mps"), or the GPU's name, as summary.json records it."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_memory_bytes(device: torch.device) -> int:
    """Allocator peak on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
