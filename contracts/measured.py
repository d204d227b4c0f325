"""Measured tables are generated files that say when, where and how they were measured.

A benchmark command (train.ablate, train.scaling, estimate calibrate, data_prep.bench) writes its
table under docs/measured/ as `NAME-YYYY-MM-DD.md`, headed by `header()`: the date, the machine
(CPU model, cores, GPU if any), the torch version and the exact command. Figures from one
2-core VM are not facts about every machine; the header keeps them honest.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "measured"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine in words: CPU model and cores (and the GPU the caller names, if any)."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def header(title: str, command: list[str] | str | None = None, device: str | None = None) -> str:
    """The Markdown head of a measured table: title, date, machine, torch, command."""
    cmd = command if isinstance(command, str) else shlex.join(command or ["python", *sys.argv])
    lines = [f"# {title}", "",
             f"- date: {dt.date.today().isoformat()}",
             f"- machine: {machine()}" + (f"; device {device}" if device else ""),
             f"- torch {package_version('torch')}, python {platform.python_version()}",
             f"- command: `{cmd}`", ""]
    return "\n".join(lines)


def dated_path(name: str, directory: Path = DOCS) -> Path:
    """docs/measured/NAME-YYYY-MM-DD.md"""
    return directory / f"{name}-{dt.date.today().isoformat()}.md"


def publish(name: str, markdown: str, directory: Path = DOCS) -> Path:
    """Write a measured table as DIRECTORY/NAME-YYYY-MM-DD.md; returns its path."""
    path = dated_path(name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    return path
