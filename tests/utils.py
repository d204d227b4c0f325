"""Helpers shared by the test packages."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cmd(args: list[str], env: dict | None = None, check: bool = True, timeout: int = 600):
    """Run a project command from the repository root; show its output when it fails."""
    result = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
