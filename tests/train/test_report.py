"""`python -m train.report`: renders from a short real run, and degrades to notes (not errors)
on a run directory that lacks fields or files."""

import json
import sys

import pytest

from tests.utils import run_cmd
from train.generate import generate_text
from train.load import load_run
from train.report import PLOTS, write_report

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def real_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    run_cmd([sys.executable, "-m", "train", "configs/train/tiny.yaml", f"data_dir={tiny_data}",
             f"out_dir={out}", "steps=12", "eval_every=6", "tracker=none"])
    return out


def test_report_from_real_run(real_run):
    result = run_cmd([sys.executable, "-m", "train.report", str(real_run)])
    assert "report.md" in result.stdout
    report = (real_run / "report.md").read_text()
    for name in PLOTS:
        png = real_run / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == PNG, name
        assert f"](plots/{name}.png)" in report
    assert "Plot skipped" not in report
    summary = json.loads((real_run / "summary.json").read_text())
    assert f"{summary['final_val_loss']:.4f}" in report
    sample = (real_run / "samples.txt").read_text().strip()
    assert sample.splitlines()[-1] in report


def test_real_run_is_loadable_for_generation(real_run):
    """The run directory the training loop writes is what train.generate reads."""
    run = load_run(real_run)
    texts, stats = generate_text(run, "def ", max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    assert texts[0].startswith("def ") and stats["new_tokens"] == 8


def test_report_survives_missing_fields(real_run, tmp_path):
    """An older or interrupted run: no summary.json, no samples, no memory or phase timings,
    a truncated last line. Each missing plot becomes a note."""
    run = tmp_path / "old"
    run.mkdir()
    lines = (real_run / "metrics.jsonl").read_text().splitlines()
    old = []
    for line in lines:
        record = json.loads(line)
        for key in ("peak_mem_bytes", "data_wait_s", "fwd_bwd_s", "optim_s", "mfu"):
            record.pop(key, None)
        old.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(old) + '\n{"step": 13, "lo')
    report = write_report(run, tmp_path / "out").read_text()
    assert (tmp_path / "out" / "plots" / "loss.png").read_bytes()[:4] == PNG
    assert (tmp_path / "out" / "plots" / "throughput.png").is_file()  # tokens/s without MFU
    assert "_Plot skipped: no `peak_mem_bytes`" in report
    assert "_Plot skipped: no step phases" in report
    assert "No summary.json" in report and "No samples.txt" in report


def test_report_refuses_a_non_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path)
