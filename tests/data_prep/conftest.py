from __future__ import annotations

from pathlib import Path

import pytest

from data_prep import load_config, run

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "prep" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny slice of the embedded corpus, prepped once per test session."""
    out = tmp_path_factory.mktemp("tiny")
    cfg = load_config(TINY, [f"out_dir={out}", "progress=false"])
    return run(cfg)
