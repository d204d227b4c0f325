"""The measured tables of train.ablate and train.scaling: headed (date, machine, torch, command)
and published as docs/measured/NAME-DATE.md on request. Fake rows: no training here."""

import datetime
import json

from train import ablate, scaling

TODAY = datetime.date.today().isoformat()


def _check_header(table: str, title: str, command: str) -> None:
    assert table.startswith(f"# {title}\n\n- date: {TODAY}\n- machine: ")
    assert f"- command: `{command}`" in table and "- torch " in table


def test_ablation_tables_are_headed_and_published(tmp_path):
    rows = [{"technique": t.name, "tokens_per_s": 100.0 / (i + 1),
             "tokens_per_s_vs_baseline": 1 / (i + 1), "step_peak_bytes": 2**20 * (i + 1),
             "step_memory_vs_baseline": i + 1.0, "peak_rss_bytes": 2**30, "flops_ratio": 1.2,
             "expectation": t.expectation} for i, t in enumerate(ablate.TECHNIQUES[:3])]
    rows.append({"technique": "fp16", "skipped": "needs a GPU", "expectation": "x"})
    command = "python -m train.ablate configs/train/ablate.yaml --steps 30 --publish"
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    table = ablate.write_tables(out, rows, "a test machine", command, 30, publish=docs)
    _check_header(table, ablate.TITLE, command)
    assert "Measured on a test machine." in table and "(skipped: needs a GPU)" in table
    assert (out / "ablation.md").read_text() == table
    assert json.loads((out / "ablation.json").read_text())["command"] == command
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert (docs / f"ablation-{TODAY}.md").read_text() == table
    ablate.write_tables(out, rows, "a test machine", command, 30)  # no publish: nothing more
    assert len(list(docs.iterdir())) == 1


def test_scaling_tables_are_headed_and_published(tmp_path):
    rows = [{"case": "1 process", "processes": 1, "micro_batch_size": 8, "batch_size": 8,
             "tokens_per_s": 1000.0, "step_s": 0.5, "grad_allreduce_s": None, "speedup": 1.0,
             "scaling_efficiency": 1.0},
            {"case": "2 processes, fixed per-process batch", "processes": 2,
             "micro_batch_size": 8, "batch_size": 16, "tokens_per_s": 1800.0, "step_s": 0.55,
             "grad_allreduce_s": 0.02, "speedup": 1.8, "scaling_efficiency": 0.9}]
    command = "python -m train.scaling configs/train/ablate.yaml --nproc 2 --publish"
    table = scaling.write_tables(tmp_path / "out", rows, command, "4 layers.", 1,
                                 publish=tmp_path / "docs")
    _check_header(table, scaling.TITLE, command)
    assert "| 2 processes, fixed per-process batch | 2 | 8 | 16 | 1,800 | 1.80x | 90% | 550 | 20.0 |" \
        in table
    assert (tmp_path / "out" / "scaling.md").read_text() == table
    assert (tmp_path / "docs" / f"scaling-{TODAY}.md").read_text() == table
