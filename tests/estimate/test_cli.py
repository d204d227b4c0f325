import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimate.__main__ import main
from tests.estimate.test_assumptions import write_summary

ROOT = Path(__file__).resolve().parents[2]


def test_project_writes_report_json_and_plot(tmp_path, capsys):
    """A preset with a published run takes its precision, count and layout (DeepSeek-V3:
    fp8 on 2,048 H800, DualPipe); projection.png shows where the time goes."""
    out = tmp_path / "proj"
    rc = main(["project", "-m", "deepseek-v3", "--tokens", "14.8T", "--accelerator", "h800-sxm5-80gb",
               "--price", "2:1.5:3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "days" in text and "accelerator-hours" in text and "cost" in text
    assert "published run 'DeepSeek-V3'" in text and "fp8" in text and "where time goes" in text
    report = (out / "report.md").read_text()
    assert "| assumption |" in report and "performance model" in report
    assert "Where the central case's wall-clock time goes" in report
    record = json.loads((out / "projection.json").read_text())
    assert record["accelerator"]["count"] == 2048 and record["precision"] == "fp8"
    o = record["outcomes"]
    assert o["best"]["days"] <= o["central"]["days"] <= o["worst"]["days"]
    assert record["target"]["active_params"] < 0.1 * record["target"]["params"]
    for png in ("projection.png", "projection-range.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_project_inputs_are_applied_or_refused(capsys):
    # a size becomes a shape (printed); --count may be left out (~30-day rule, said so)
    assert main(["project", "--params", "70B", "--seq-len", "8192", "-t", "2T",
                 "-a", "H100-SXM5-80GB", "-n", "1024"]) == 0
    out = capsys.readouterr().out
    assert "assumed shape" in out and "d_model 8192" in out and "context 8192" in out
    assert "chosen:" in out and "runner-up:" in out
    assert main(["project", "--params", "70B", "-t", "2T", "-a", "H100-SXM5-80GB"]) == 0
    assert "no --count:" in capsys.readouterr().out
    assert main(["project", "-m", "llama2-70b", "-t", "2T", "-a", "A100-SXM4-80GB",
                 "--peak-tflops", "300", "--global-batch", "4M"]) == 0
    out = capsys.readouterr().out
    assert "300 TFLOP/s dense peak" in out and "tokens/step" in out
    short = main(["project", "-m", "llama2-70b", "--seq-len", "1024", "-t", "2T", "-a",
                  "A100-SXM4-80GB", "-n", "2048", "--global-batch", "4M"])
    assert short == 0 and "2048 x A100" in capsys.readouterr().out


def test_deepseek_r1_stages(tmp_path, capsys):
    assert main(["project", "--model", "deepseek-r1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for stage in ("pre-training", "context extension", "R1-Zero", "SFT data creation", "total"):
        assert stage in text
    assert "2.66M" in text and "119K" in text and "101K" in text  # published beside
    assert "it is not pre-training alone" in text and "$" in text
    assert (tmp_path / "report.md").read_text() in text


def test_project_with_mfu_from_run(tmp_path, capsys):
    run = write_summary(tmp_path / "run", device="cpu", mixed_precision="bf16",
                        peak_flops_per_process={"median": 1e11, "min": 1e11, "max": 1e11,
                                                "source": "measured: bf16 matmul on cpu"})
    rc = main(["project", "-m", "llama-1b", "-t", "20B", "-a", "A100-SXM4-80GB", "-n", "64",
               "--mfu-from", str(run), "--out", str(tmp_path / "o")])
    assert rc == 0
    assert "does not transfer" in capsys.readouterr().out
    assert "does not transfer" in (tmp_path / "o" / "report.md").read_text()


def test_unknown_accelerator_lists_valid_names(capsys):
    rc = main(["project", "-m", "gpt2-124m", "-t", "10B", "-a", "H1000", "-n", "8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown accelerator 'H1000'" in err and "H100-SXM5-80GB" in err and "TPU-v5p" in err


def test_bad_tokens_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["project", "-m", "gpt2-124m", "-t", "ten billion", "-a", "H100-SXM5-80GB", "-n", "8"])
    assert e.value.code == 2
    assert "cannot read --tokens" in capsys.readouterr().err


def test_mfu_and_mfu_from_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["project", "-m", "tiny", "-t", "1B", "-a", "H100-SXM5-80GB", "-n", "1",
              "--mfu", "0.4", "--mfu-from", "x"])


@pytest.mark.slow  # validate's whole CLI run, 45 runs x three cross-validations: 15 s: the default tier stays under 3 minutes
def test_validate_writes_outputs(tmp_path, capsys):
    assert main(["validate", "--out", str(tmp_path)]) == 0
    assert "median |ln error|" in capsys.readouterr().out
    data = json.loads((tmp_path / "validation.json").read_text())
    assert data["summary"]["n"] >= 8
    assert (tmp_path / "validation.png").stat().st_size > 1000
    assert "Sources and caveats" in (tmp_path / "report.md").read_text()


def test_module_entry_point_subprocess():
    r = subprocess.run([sys.executable, "-m", "estimate", "catalog"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "H100-SXM5-80GB" in r.stdout and "TPU-v4" in r.stdout
