"""`python -m train.ablate --parallel`: the parallel layouts' rows.

Fast tier: the menu (one row per layout and schedule, each on 2 processes, M in the overrides,
the bubble formula in the expectation) and the table's rendering. Slow tier: the command end to
end on the tiny config, the 1-process baseline, tp=2 and pp=2 under 1F1B each trained by the
real trainer on 2 gloo processes and probed for memory on 2 more: tp=2 holds about half the
weights per rank, the pipeline ranks hold the whole model but AdamW state only for their
stage, and the bubble is each pipeline rank's measured share beside (p-1)/(m+p-1)."""

import json
import sys

import pytest

from tests.utils import run_cmd
from train import ablate
from train.parallel.pipeline import SCHEDULES


def test_parallel_menu_has_every_layout_and_schedule():
    menu = ablate.parallel_techniques(8)
    assert [t.name for t in menu][:3] == ["DDP, 2 processes", "tp=2 + sequence parallel", "cp=2"]
    pp = [t for t in menu if "parallel.pp=2" in t.overrides]
    assert [t.name for t in pp] == [f"pp=2 {s}, M=8" for s in SCHEDULES]
    assert all(t.nproc == 2 for t in menu)
    assert all("parallel.microbatches=8" in t.overrides for t in pp)
    by_schedule = {t.name.split()[1].rstrip(","): t.expectation for t in pp}
    assert "= 0.111" in by_schedule["1f1b"]  # (p-1)/(m+p-1) at p=2, m=8
    assert "= 0.059" in by_schedule["interleaved"]  # (p-1)/(v*m+p-1), v=2
    assert "below 1F1B's 0.111" in by_schedule["zero_bubble"]


def test_parallel_table_renders_per_rank_figures(tmp_path):
    base = {"technique": "baseline", "nproc": 1, "tokens_per_s": 1000.0,
            "tokens_per_s_vs_baseline": 1.0, "step_peak_bytes_per_rank": [200 * 2**20],
            "weight_bytes_per_rank": [16 * 2**20], "optimizer_bytes_per_rank": [32 * 2**20],
            "expectation": "reference"}
    pipe = {**base, "technique": "pp=2 zero_bubble, M=4", "nproc": 2,
            "tokens_per_s_vs_baseline": 0.9, "step_peak_bytes_per_rank": [150 * 2**20, 90 * 2**20],
            "weight_bytes_per_rank": [16 * 2**20] * 2,
            "optimizer_bytes_per_rank": [16 * 2**20, 16 * 2**20],
            "bubble_per_rank": [0.031, 0.364], "bubble_formula": None, "expectation": "ZB-V"}
    tp = {**base, "technique": "tp=2", "nproc": 2, "comm_s": 0.0412,
          "step_peak_bytes_per_rank": [100 * 2**20] * 2, "expectation": "Megatron"}
    table = ablate.markdown_parallel([base, tp, pipe], "a test machine", "python -m train.ablate")
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| 150 / 90 | 16 / 16 | 16 / 16 | — | 0.031 / 0.364 | no closed form | ZB-V |" \
        in lines["pp=2 zero_bubble, M=4"]
    assert "| 100 / 100 | 16 | 32 | 41 | — | — | Megatron |" in lines["tp=2"]
    assert lines["baseline"].startswith("| baseline | 1 | 1,000 | 1.00x | 200 |")


@pytest.mark.slow
def test_parallel_ablation_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "ablation"
    run_cmd([sys.executable, "-m", "train.ablate", "configs/train/tiny.yaml",
             f"data_dir={tiny_data}", "--parallel", "--microbatches", "2", "--steps", "4",
             "--only", "tp=2,1f1b", "--out", str(out)], timeout=900)
    rows = {r["technique"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    base, tp, pp = rows["baseline (fp32, fused AdamW)"], rows["tp=2 + sequence parallel"], \
        rows["pp=2 1f1b, M=2"]
    assert (base["nproc"], tp["nproc"], pp["nproc"]) == (1, 2, 2)
    weights, moments = base["weight_bytes_per_rank"][0], base["optimizer_bytes_per_rank"][0]
    assert moments == pytest.approx(2 * weights, rel=1e-3)  # AdamW: two fp32 moments (+ step)
    # tp=2: each rank about half the weights and moments (norms stay whole on every rank)
    assert all(0.45 * weights < w < 0.6 * weights for w in tp["weight_bytes_per_rank"])
    assert all(0.45 * moments < m < 0.6 * moments for m in tp["optimizer_bytes_per_rank"])
    assert tp["comm_s"] > 0 and "bubble_per_rank" not in tp
    # pp=2: each rank keeps only its stages' weights and their moments; the tied embedding
    # matrix is on both end stages (its two copies take the same updates), so the ranks
    # together hold more than the whole model, each less
    w_pp, m_pp = pp["weight_bytes_per_rank"], pp["optimizer_bytes_per_rank"]
    assert max(w_pp) < weights < sum(w_pp)
    assert max(m_pp) < moments < sum(m_pp)
    assert all(m == pytest.approx(2 * w, rel=1e-2) for w, m in zip(w_pp, m_pp, strict=True))
    assert pp["bubble_formula"] == pytest.approx(1 / 3) and len(pp["bubble_per_rank"]) == 2
    assert all(0 <= b < 1 for b in pp["bubble_per_rank"])
    assert all(r["tokens_per_s"] > 0 and min(r["step_peak_bytes_per_rank"]) > 0
               for r in (base, tp, pp))
    table = (out / "ablation.md").read_text()
    assert "| pp=2 1f1b, M=2 | 2 |" in table and "0.333" in table
