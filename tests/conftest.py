import os
import sys
from pathlib import Path

import pytest

from tests.utils import run_cmd

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny slice of the embedded corpus, prepared once per test session."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    run_cmd([sys.executable, "-m", "data_prep", "configs/prep/tiny.yaml", f"out_dir={out}"])
    return out
