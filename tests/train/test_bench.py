"""`python -m train.bench` on CPU with the tiny preset: the JSON keys, the Markdown rows and the
interleaving order. A benchmark prints figures; nothing here asserts on speed."""

import json

import pytest

from train import bench

ARGS = ["--preset", "tiny", "--batch", "2", "--steps", "2", "--repeats", "2", "--warmup", "1",
        "--precision", "fp32", "--device", "cpu"]
PEAK = (1e12, "a fixed test peak")


@pytest.fixture
def fixed_peak(monkeypatch):
    """No CPU peak measurement in a unit test: one fixed figure."""
    monkeypatch.setattr(bench, "machine_peak", lambda device, name: PEAK)


def test_bench_writes_json_and_markdown(tmp_path, fixed_peak):
    result = bench.main([*ARGS, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    for key in ("format", "setup", "device_name", "torch", "transformers", "model_flops_per_token",
                "peak_flops", "peak_source", "order", "rows", "command"):
        assert key in saved, key
    assert saved["setup"]["preset"] == "tiny" and saved["setup"]["vocab_size"] == bench.DEFAULT_VOCAB
    assert saved["peak_flops"] == PEAK[0]
    # interleaved: A, B, A, B
    assert saved["order"] == [[0, bench.OURS], [0, bench.HF], [1, bench.OURS], [1, bench.HF]]
    names = [r["name"] for r in saved["rows"]]
    assert names == [bench.OURS, bench.HF]
    for r in saved["rows"]:
        assert len(r["tokens_per_s_samples"]) == 2 and r["repeats"] == 2
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        # same dims -> same FLOPs -> MFU proportional to tokens/s against one peak
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * saved["model_flops_per_token"] / PEAK[0])
        assert r["optimizer"] in ("fused", "foreach")
    ours, hf = saved["rows"]
    assert ours["params"] == hf["params"]  # the same model shape in both libraries
    assert ours["vs_tokenclock_bare"] == 1.0
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith(f"# {bench.TITLE}\n")
    assert "- command: `python -m train.bench --preset tiny" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| what | tokens/s |")
    assert [line.split(" | ")[0][2:] for line in table[1:]] == names


def test_real_loop_is_the_third_in_each_round(tmp_path, monkeypatch):
    calls = []

    def fake_loop(setup, data, run_dir):
        calls.append(run_dir.name)
        return {"tokens_per_s": 100.0, "step_s": setup.tokens_per_step / 100.0,
                "mfu_from_summary": 0.5, "peak_source_of_summary": "summary peak",
                "peak_mem_bytes": None}

    monkeypatch.setattr(bench, "launch_loop", fake_loop)
    args = bench.parse_args([*ARGS, "--vocab-size", "512"])
    result = bench.run_bench(bench.setup_from(args), tmp_path / "data", tmp_path, peak=PEAK,
                             log=lambda _: None)
    assert [name for _, name in result["order"]] == [bench.OURS, bench.HF, bench.LOOP] * 2
    assert calls == ["loop-0", "loop-1"]
    loop = result["rows"][2]
    assert loop["name"] == bench.LOOP and loop["mfu_from_summary"] == 0.5
    assert loop["mfu"] == pytest.approx(100.0 * result["model_flops_per_token"] / PEAK[0])
    md = bench.markdown(result, "python -m train.bench")
    assert f"| {bench.LOOP} | 100 |" in md


def test_loop_overrides_keep_evaluation_out_of_timed_steps(tmp_path):
    setup = bench.setup_from(bench.parse_args([*ARGS, "--vocab-size", "512", "--warmup", "3"]))
    over = dict(o.split("=", 1) for o in bench.loop_overrides(setup, tmp_path))
    total = setup.warmup + setup.steps
    assert over["steps"] == str(total) and over["eval_every"] == str(total)  # after the last step
    assert over["warmup_steps_excluded"] == str(setup.warmup)
    assert over["batch_size"] == over["micro_batch_size"] == "2"
    assert over["mixed_precision"] == "no" and over["compile"] == "false"
    assert over["model.vocab_size"] == "512" and over["tracker"] == "none"
    assert over["checkpoint_every"] == "0"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--steps must be > 0"):
        bench.setup_from(bench.parse_args([*ARGS, "--steps", "0"]))


def test_ceiling_only(tmp_path):
    result = bench.main(["--ceiling-only", "--ceiling-n", "64", "--precision", "fp32",
                         "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "ceiling.json").read_text())
    assert saved["n"] == 64 and saved["dtype"] == "fp32" and saved["flops_median"] > 0
    assert saved["calls"] == result["calls"] >= 3


@pytest.mark.slow
def test_real_loop_end_to_end(tmp_path, tiny_data, fixed_peak):
    result = bench.main([*ARGS, "--repeats", "1", "--data", str(tiny_data), "--out", str(tmp_path)])
    loop = result["rows"][2]
    assert loop["name"] == bench.LOOP and loop["tokens_per_s"] > 0 and loop["mfu_from_summary"] > 0


def test_count_ops_writes_the_table_for_every_peer(tmp_path):
    """`--count-ops`: per-phase counts for tokenclock and transformers' Llama (nanoGPT only with
    --nanogpt), the top ops, and OUT/ops.json."""
    counts = bench.main(["--count-ops", "--preset", "tiny", "--batch", "1", "--seq-len", "16",
                         "--vocab-size", "128", "--model", "n_layer=1", "--device", "cpu",
                         "--out", str(tmp_path)])
    assert list(counts) == [bench.OURS, bench.HF]
    for c in counts.values():
        assert c["fwd_bwd"] == c["forward"] + c["backward"] > 0 and c["top_fwd_bwd"]
    saved = json.loads((tmp_path / "ops.json").read_text())
    assert saved["setup"]["overrides"] == [["n_layer", 1]]
    assert saved["counts"][bench.OURS]["fwd_bwd"] == counts[bench.OURS]["fwd_bwd"]


def test_bad_model_override_and_missing_nanogpt_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="expected FIELD=VALUE with a ModelConfig field"):
        bench.setup_from(bench.parse_args([*ARGS, "--model", "layers=3"]))
    with pytest.raises(ValueError, match="no such file"):
        bench.build_nanogpt(str(tmp_path / "model.py"))
