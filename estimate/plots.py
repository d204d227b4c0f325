"""Figures for estimate reports (matplotlib, Agg backend: no display needed).

- `predicted_vs_reported`: log-log scatter with the identity line and each prediction's
  best-worst interval (validate; calibrate reuses it for measured vs predicted throughput).
- `projection_range`: the best / central / worst wall-clock and accelerator-hours of one or
  more projections as intervals.
- `series_vs_size`: one or more named series against model size, log-log (calibrate: measured
  throughput or MFU vs parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)


@dataclass
class Point:
    """A labelled prediction against a reference value, with an optional [low, high] interval."""

    label: str
    reference: float
    predicted: float
    low: float | None = None
    high: float | None = None


def predicted_vs_reported(points: Sequence[Point], path: str | Path, *, xlabel: str,
                          ylabel: str, title: str, band: float | None = 2.0) -> Path:
    """Log-log scatter of predicted against reported with y = x and a factor-`band` band."""
    if not points:
        raise ValueError("predicted_vs_reported needs at least one point")
    fig, ax = plt.subplots(figsize=(7, 6))
    values = [v for p in points for v in (p.reference, p.predicted, p.low, p.high) if v]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="predicted = reported")
    if band:
        ax.fill_between([lo, hi], [lo / band, hi / band], [lo * band, hi * band], color="0.9",
                        label=f"within {band:g}x" if band >= 1.5 else f"within {band - 1:.0%}")
    for p in points:
        yerr = None
        if p.low is not None and p.high is not None:
            yerr = [[p.predicted - p.low], [p.high - p.predicted]]
        ax.errorbar([p.reference], [p.predicted], yerr=yerr, fmt="o", capsize=3)
        ax.annotate(p.label, (p.reference, p.predicted), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


@dataclass
class Interval:
    """Best / central / worst values of one quantity for one labelled projection."""

    label: str
    best: float
    central: float
    worst: float


def projection_range(panels: dict[str, Sequence[Interval]], path: str | Path, *,
                     title: str) -> Path:
    """One horizontal panel per quantity (e.g. days, accelerator-hours): a bar from best to
    worst with the central value marked, one row per projection."""
    if not panels:
        raise ValueError("projection_range needs at least one panel")
    n_rows = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 1.1 * n_rows * len(panels)),
                             squeeze=False)
    for ax, (quantity, intervals) in zip(axes[:, 0], panels.items(), strict=True):
        for i, iv in enumerate(intervals):
            ax.barh(i, iv.worst - iv.best, left=iv.best, height=0.5, color="tab:blue", alpha=0.35)
            ax.plot([iv.central], [i], "o", color="tab:blue")
            ax.annotate(f"{iv.central:.3g}", (iv.central, i), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
        ax.set_yticks(range(len(intervals)), [iv.label for iv in intervals])
        ax.set_xlabel(quantity + "  (bar: best to worst case, dot: central)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0, 0].set_title(title)
    return _save(fig, path)


def series_vs_size(sizes: Sequence[float], series: dict[str, Sequence[float]],
                   path: str | Path, *, xlabel: str, ylabel: str, title: str,
                   logy: bool = True) -> Path:
    """Named series (e.g. measured and predicted tokens/s) against model size, log x."""
    if not series:
        raise ValueError("series_vs_size needs at least one series")
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, ys in series.items():
        if len(ys) != len(sizes):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(sizes)} sizes")
        ax.plot(sizes, ys, "o-", label=name)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def time_breakdown(parts: dict[str, float], path: str | Path, *, title: str, unit: str,
                   published: float | None = None, published_label: str = "published") -> Path:
    """One horizontal bar split into where the time goes (e.g. compute, recompute,
    communication, pipeline bubble, failures), with the published figure marked if known."""
    if not parts:
        raise ValueError("time_breakdown needs at least one part")
    fig, ax = plt.subplots(figsize=(9, 2.8))
    left = 0.0
    colors = plt.get_cmap("tab10").colors
    for i, (name, value) in enumerate(parts.items()):
        ax.barh(0, value, left=left, height=0.5, color=colors[i % len(colors)],
                label=f"{name}: {value:.3g}")
        left += value
    if published is not None:
        ax.axvline(published, color="black", ls="--", lw=1.5)
        ax.annotate(f"{published_label}: {published:.3g}", (published, 0), xytext=(-4, 0),
                    textcoords="offset points", fontsize=8, ha="right", va="center",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_yticks([])
    ax.set_xlim(0, max(left, published or 0) * 1.1)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=8, frameon=False)
    return _save(fig, path)
