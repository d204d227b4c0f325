"""launch/gpu_check.sh on CPU: the dry run (every stage's command and timeout, at most 8 output
files), the CPU smoke mode (env, ceiling and bench for real), the time budget, and the closing
report's loop table. The GPU stages themselves need a GPU (issue 13)."""

import json
import shlex
import sys

import pytest

from contracts.run import write_summary
from tests.utils import run_cmd
from train import bench

STAGES = ["env", "ceiling", "bench-eager", "bench-compiled", "loop-eager", "loop-compiled",
          "loop-recompute", "loop-fp8", "generate", "export", "loop-cudagraphs",
          "loop-compiled-optim"]


def dry_run(**env) -> list[str]:
    result = run_cmd(["launch/gpu_check.sh"], env={"DRY_RUN": "1", **env})
    return result.stdout.splitlines()


def test_dry_run_prints_every_stage_with_its_timeout():
    lines = dry_run(OUT="/tmp/x", PY="python3", DATA="data/demo")
    stages = [line.split()[1] for line in lines if line.startswith("stage ")]
    assert stages == STAGES  # in priority order
    commands = {}
    for line in lines[:-1]:
        head, cmd = line.split(": ", 1)
        timeout = int(head.split("(timeout ")[1].split(" s)")[0])
        assert 0 < timeout <= 150
        commands[head.split()[1]] = shlex.split(cmd)
    assert "--ceiling-only" in commands["ceiling"] and "8192" in commands["ceiling"]
    eager, compiled = commands["bench-eager"], commands["bench-compiled"]
    assert eager[eager.index("--preset") + 1] == "gpt2-124m"
    assert eager[eager.index("--batch") + 1] == "16" and eager[eager.index("--seq-len") + 1] == "1024"
    assert "--compile" in compiled and "--compile" not in eager
    for name in STAGES[4:8] + STAGES[10:]:
        cmd = commands[name]
        assert cmd[:3] == ["env", "MODE=single", "PY=python3"] and cmd[3].endswith("launch/gpu.sh")
        assert "tracker=none" in cmd and "data_dir=data/demo" in cmd
        assert cmd[-1] == f"out_dir=/tmp/tokenclock_gpu_check/runs/{name.removeprefix('loop-')}"
    # compile=auto would compile on the GPU: the eager rows say compile=false
    assert "compile=false" in commands["loop-eager"] and "compile=false" in commands["loop-recompute"]
    assert "compile=true" in commands["loop-compiled"]
    assert "activation_checkpointing=full" in commands["loop-recompute"]
    assert {"compile=true", "mixed_precision=fp8"} <= set(commands["loop-fp8"])
    assert "compile_mode=reduce-overhead" in commands["loop-cudagraphs"]
    assert "compile_optimizer=true" in commands["loop-compiled-optim"]
    assert set(bench.LOOP_STAGES) == set(STAGES[4:8] + STAGES[10:])  # all in the report
    assert commands["generate"][3].endswith("runs/compiled")
    assert commands["export"][3].endswith("runs/compiled")
    files = lines[-1].split(": ", 1)[1].split()
    assert lines[-1].startswith("output files (8, at most 8) in /tmp/x") and len(files) <= 8


def test_dry_run_with_wheels_installs_them_first():
    lines = dry_run(WHEELS="/carried", PY="python3")
    assert lines[0].startswith("stage wheels") and "--no-index --no-deps --target /tmp/site" in lines[0]


@pytest.mark.slow  # about 15-20 s on 2 shared cores
def test_cpu_smoke_runs_env_ceiling_and_bench(tmp_path):
    out = tmp_path / "out"
    run_cmd(["launch/gpu_check.sh"], env={"DEVICE": "cpu", "OUT": str(out), "WORK": str(tmp_path / "w"),
                                          "PY": sys.executable}, timeout=120)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8
    assert {"summary.md", "stages.tsv", "gpu_check.log", "env.txt", "ceiling.json",
            "bench-eager.json", "loops.jsonl"} <= set(files)
    status = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())
    assert [status[s] for s in ("env", "ceiling", "bench-eager")] == ["ok"] * 3
    assert all(status[s] == "skipped" for s in STAGES[3:])
    assert "torch:" in (out / "env.txt").read_text()
    assert json.loads((out / "ceiling.json").read_text())["flops_median"] > 0
    assert [r["name"] for r in json.loads((out / "bench-eager.json").read_text())["rows"]] == \
        [bench.OURS, bench.HF]
    summary = (out / "summary.md").read_text()
    assert "| bench-eager | ok |" in summary and "## README GPU table row" in summary


def test_out_of_budget_stages_are_skipped(tmp_path):
    out = tmp_path / "out"
    run_cmd(["launch/gpu_check.sh"], env={"DEVICE": "cpu", "OUT": str(out), "BUDGET_S": "0",
                                          "WORK": str(tmp_path / "w")})
    lines = (out / "stages.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == STAGES
    assert all(line.split("\t")[1] == "skipped" for line in lines)
    assert "out of the 0 s budget" in lines[0]


def _summary(tok_s: float, compile: bool) -> dict:
    dist = {"median": tok_s, "p10": tok_s, "p90": tok_s, "n": 3}
    return {"format": 1, "device": "NVIDIA H200", "world_size": 1, "mixed_precision": "bf16",
            "model": {"params": 1}, "tokens_per_s": dist, "step_s": {"median": 0.04},
            "mfu": {"median": 0.3}, "model_flops_per_token": 1.0, "compile": compile,
            "peak_flops_per_process": {"median": 1.0, "source": "catalog:H200"},
            "peak_mem_bytes": 2**30, "final_train_loss": 7.5}


def _bench(tok_s: float, compile: bool) -> dict:
    setup = bench.Setup("gpt2-124m", 16, 1024, 50304, 10, 3, 3, compile, "bf16", "cuda")
    rows = [{"name": name, "tokens_per_s": t, "vs_tokenclock_bare": t / tok_s, "mfu": 0.3,
             "step_s": 0.04, "peak_mem_bytes": 2**34} for name, t in ((bench.OURS, tok_s),
                                                                     (bench.HF, 1e5))]
    return {"setup": bench.asdict(setup), "device_name": "NVIDIA H200", "transformers": "5",
            "model_flops_per_token": 1e9, "peak_flops": 989e12, "peak_source": "catalog",
            "rows": rows}


def test_report_compares_the_loops_with_the_bare_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    for name, tok_s, compiled in (("eager", 200e3, False), ("compiled", 450e3, True)):
        (work / "runs" / name).mkdir(parents=True)
        write_summary(work / "runs" / name, _summary(tok_s, compiled))
        (out / f"bench-{name}.json").write_text(json.dumps(_bench(tok_s * 1.1, compiled)))
    (out / "stages.tsv").write_text("loop-eager\tok\t30\t60\t\nloop-fp8\tskipped\t5\t120\trefused\n")
    text = bench.write_report(out, work).read_text()
    assert "| loop-eager | 200,000 | 30.0% | 0.909x |" in text
    assert "| loop-compiled | 450,000 | 30.0% | 0.909x |" in text
    assert "| loop-fp8 | skipped | 5 | 120 | refused |" in text
    row = text.strip().splitlines()[-1]
    assert "| NVIDIA H200 |" in row and "220.0k / 100.0k" in row and "200.0k (30.0% MFU)" in row
    assert row.count("|") == bench.GPU_TABLE.count("|")  # a cell per column of the README table
    assert len((out / "loops.jsonl").read_text().splitlines()) == 2
