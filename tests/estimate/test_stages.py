"""Multi-stage projections: the RL rollout model by hand, grouping, and refusals."""

import pytest

from estimate.assumptions import load_defaults
from estimate.hardware import get_accelerator
from estimate.perf import Factor, load_factors
from estimate.stages import (
    StageResult,
    decode_seconds,
    expected_longest,
    groups,
    kv_bytes_per_token,
    logprob_flops,
    run_stages,
    stages_file,
)
from model.config import get_preset
from model.flops import count_params, model_flops_per_token


def test_kv_cache_bytes():
    # DeepSeek-V3 caches the 512-wide latent and the 64-wide rope key per layer, in 16 bits
    assert kv_bytes_per_token(get_preset("deepseek-v3")) == 2 * (512 + 64) * 61
    # Llama 2 70B: keys and values of 8 KV heads of 128 channels per layer
    assert kv_bytes_per_token(get_preset("llama2-70b")) == 2 * 2 * 8 * 128 * 80


def test_decode_is_bandwidth_bound_by_hand():
    """One sequence decoding: every active weight and its own cache read once per token."""
    cfg = get_preset("llama2-70b")
    acc = get_accelerator("H100-SXM5-80GB")
    f = {k: v.central for k, v in load_factors(
        load_defaults(), Factor("stack_efficiency", 1, 1, 1, "high", "t")).items()}
    s = decode_seconds(cfg, acc, 8, 1, 1000, "bf16", f)
    bytes_ = count_params(cfg) * 2 + 1000 * kv_bytes_per_token(cfg)
    assert s == pytest.approx(bytes_ / (8 * 3350e9 * f["memory_efficiency"]))
    # a large batch reads the weights once for all: far less than proportional time per token
    assert decode_seconds(cfg, acc, 8, 64, 1000, "bf16", f) < 8 * s


def test_groups_merge_stages_that_share_a_published_figure():
    a = StageResult("a", "pretrain", {}, 8, 10.0, "", "g")
    b = StageResult("b", "pretrain", {}, 8, 10.0, "", "g")
    c = StageResult("c", "rl", {}, 8, None, "", None)
    out = groups([a, b, c])
    assert [(label, [r.name for r in rs], pub) for label, rs, pub in out] == [
        ("g", ["a", "b"], 10.0), ("c", ["c"], None)]


def test_deepseek_r1_stages_cover_the_recipe():
    path = stages_file("deepseek-r1")
    spec, results = run_stages(path)
    assert spec["accelerator"] == "H800-SXM5-80GB"
    names = [r.name for r in results]
    assert any("pre-training" in n for n in names) and any("R1-Zero" in n for n in names)
    pre = results[0]
    assert pre.published_hours == pytest.approx(2.664e6)
    assert pre.hours["best"] <= pre.hours["central"] <= pre.hours["worst"]
    # the RL stage's assumed inputs are swept: its range is wide
    zero = next(r for r in results if "R1-Zero" in r.name)
    assert zero.hours["worst"] / zero.hours["best"] > 3
    assert stages_file("llama3-405b-no-such-file") is None


def test_bad_stage_is_refused(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\naccelerator: H100-SXM5-80GB\nstages:\n  - {name: s, kind: finetune}\n")
    with pytest.raises(ValueError, match="kind 'finetune'"):
        run_stages(bad)


def test_rl_batch_is_sized_for_the_maximum_response_length(tmp_path):
    """A stage's KV cache is reserved for its length cap: a cap so long that few sequences
    fit an instance makes more decode waves, hence more hours; a cap below the mean is refused."""
    def stage(cap):
        return ("name: x\naccelerator: H800-SXM5-80GB\nstages:\n"
                "  - {name: rl, kind: rl, model: deepseek-v3, count: 512, precision: fp8,\n"
                "     layout: {tp: 1, pp: 16, ep: 32},\n"
                "     prompts_per_step: 32, samples_per_prompt: 16, steps: 10, prompt_tokens: 300,\n"
                f"     response_tokens: 4000, max_response_tokens: {cap}, generation_instance: 32}}\n")

    hours = []
    for cap in (4000, 2_000_000):
        path = tmp_path / f"cap{cap}.yaml"
        path.write_text(stage(cap))
        hours.append(run_stages(path)[1][0].hours["central"])
    assert hours[1] > hours[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(stage(1000))
    with pytest.raises(ValueError, match="max_response_tokens"):
        run_stages(bad)


def test_stage_hours_use_the_shared_fit_and_the_files_hours_basis(tmp_path):
    """A pretrain stage is engine.estimate_run at the stage's layout with published.fit's stack
    efficiency (what project and validate use), divided by the fitted factor of the file's
    hours_basis; a basis the fit does not know is refused."""
    from estimate.engine import estimate_run
    from estimate.published import fit

    def spec(basis):
        return (f"name: x\naccelerator: H100-SXM5-80GB\nhours_basis: {basis}\nstages:\n"
                "  - {name: p, kind: pretrain, model: llama-1b, count: 64, tokens: 10B,\n"
                "     layout: {tp: 1, pp: 1, global_batch_tokens: 4e6}}\n")

    hours = {}
    for basis in ("compute", "wallclock"):
        path = tmp_path / f"{basis}.yaml"
        path.write_text(spec(basis))
        hours[basis] = run_stages(path)[1][0].hours["central"]
    f = fit()
    d = load_defaults()
    cfg = get_preset("llama-1b")
    acc = get_accelerator("H100-SXM5-80GB")  # fast: the stack efficiency x the fast factor
    assert f.stack_for(False, acc).central == pytest.approx(f.stack.central * f.fast.central)
    e = estimate_run(cfg, cfg.seq_len, 10e9, acc, 64, "bf16",
                     load_factors(d, f.stack_for(False, acc)), d, given={"tp": 1, "pp": 1,
                                                        "global_batch_tokens": 4e6},
                     recompute="none", published=True)
    assert hours["compute"] == pytest.approx(e.compute_hours())
    assert hours["wallclock"] == pytest.approx(e.compute_hours() / f.basis["wallclock"].central)
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec("elapsed"))
    with pytest.raises(ValueError, match="hours_basis 'elapsed'"):
        run_stages(bad)


def test_a_rollout_of_several_steps_decodes_in_larger_batches(tmp_path):
    """outputs_per_rollout: R1 decodes 8,192 outputs per rollout and trains on them in 16 steps.
    The rollout's decoding is shared among its steps, and its larger batch reads the weights
    once for more sequences, so the hours fall; the update (a training step) does not change.
    A rollout smaller than one step's responses is refused."""
    def stage(rollout):
        extra = "" if rollout is None else f", outputs_per_rollout: {rollout}"
        return ("name: x\naccelerator: H800-SXM5-80GB\nstages:\n"
                "  - {name: rl, kind: rl, model: deepseek-v3, count: 512, precision: fp8,\n"
                "     layout: {tp: 1, pp: 16, ep: 32},\n"
                "     prompts_per_step: 32, samples_per_prompt: 16, steps: 10, prompt_tokens: 300,\n"
                f"     response_tokens: 4000, max_response_tokens: 8000, generation_instance: 32{extra}}}\n")

    hours = {}
    for rollout in (None, 512, 8192):
        path = tmp_path / f"r{rollout}.yaml"
        path.write_text(stage(rollout))
        hours[rollout] = run_stages(path)[1][0].hours["central"]
    assert hours[512] == pytest.approx(hours[None])  # the default is one step's responses
    assert hours[8192] < hours[512]
    bad = tmp_path / "bad.yaml"
    bad.write_text(stage(256))
    with pytest.raises(ValueError, match="outputs_per_rollout"):
        run_stages(bad)


def _central_factors():
    return {k: v.central for k, v in load_factors(
        load_defaults(), Factor("stack_efficiency", 1, 1, 1, "high", "t")).items()}


def test_latency_floor_binds_at_batch_one_and_not_at_large_batches():
    """A decode step is never faster than the serving system's per-token latency: at batch 1 on
    32 H800 the 37B active weights read in well under 30 ms, so a 30 ms floor sets the step;
    at a batch of 8,192 long sequences the KV-cache reads take longer, and the floor changes
    nothing."""
    cfg = get_preset("deepseek-v3")
    acc = get_accelerator("H800-SXM5-80GB")
    f = _central_factors()
    assert decode_seconds(cfg, acc, 32, 1, 1000, "fp8", f) < 0.03
    assert decode_seconds(cfg, acc, 32, 1, 1000, "fp8", f, floor_s=0.03) == 0.03
    big = decode_seconds(cfg, acc, 32, 8192, 16000, "fp8", f)
    assert big > 0.03
    assert decode_seconds(cfg, acc, 32, 8192, 16000, "fp8", f, floor_s=0.03) == big


def test_expected_longest_response():
    """Lengths spread exponentially: the longest of n is the mean x H_n, capped at the maximum."""
    assert expected_longest(1000, 1, 10**6) == pytest.approx(1000)
    assert expected_longest(1000, 4, 10**6) == pytest.approx(1000 * (1 + 1 / 2 + 1 / 3 + 1 / 4))
    assert expected_longest(5000, 8192, 32768) == 32768  # 5,000 x 9.6 would pass the cap
    assert expected_longest(5000, 8192, 65536) == pytest.approx(5000 * 9.59, rel=1e-3)


def test_logprob_flops_are_a_forward_pass():
    """A log-prob pass is forward only: 2 FLOPs per active weight per token plus the attention
    core's forward, one third of the training FLOPs; linear in tokens and passes."""
    cfg = get_preset("llama2-70b")
    one = logprob_flops(cfg, 1000, 4096)
    assert one == pytest.approx(1000 * model_flops_per_token(cfg, 4096) / 3)
    # at a short sequence the attention core is small: about 2 x the (non-embedding) weights
    assert logprob_flops(cfg, 1000, 16) == pytest.approx(2 * 1000 * count_params(cfg), rel=0.05)
    assert logprob_flops(cfg, 2000, 4096, passes=2) == pytest.approx(4 * one)


def _rl_spec(**extra):
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return ("name: x\naccelerator: H800-SXM5-80GB\nstages:\n"
            "  - {name: rl, kind: rl, model: deepseek-v3, count: 512, precision: fp8,\n"
            "     layout: {tp: 1, pp: 16, ep: 32},\n"
            "     prompts_per_step: 32, samples_per_prompt: 16, steps: 10, prompt_tokens: 300,\n"
            f"     response_tokens: 4000, generation_instance: 32, outputs_per_rollout: 8192{more}}}\n")


def _central_hours(tmp_path, name, **extra):
    path = tmp_path / f"{name}.yaml"
    path.write_text(_rl_spec(**extra))
    return run_stages(path)[1][0].hours["central"]


def test_rollout_tail_grows_with_the_maximum_length(tmp_path):
    """With a latency floor the rollout lasts as long as its longest response: raising the cap
    from 16,384 to 65,536 (the mean and the rest unchanged) lengthens the tail, hence the hours;
    MTP's tokens per step divide the floor, and a value below 1 is refused."""
    floor = {"decode_step_latency_ms": 40}
    h = [_central_hours(tmp_path, f"c{cap}", max_response_tokens=cap, **floor)
         for cap in (16384, 32768, 65536)]
    assert h[0] < h[1] < h[2]
    mtp = _central_hours(tmp_path, "mtp", max_response_tokens=32768, mtp_tokens_per_step=2, **floor)
    assert mtp < h[1]
    bad = tmp_path / "bad.yaml"
    bad.write_text(_rl_spec(mtp_tokens_per_step=0.5))
    with pytest.raises(ValueError, match="mtp_tokens_per_step"):
        run_stages(bad)


def test_logprob_passes_add_forward_passes(tmp_path):
    """Each log-prob pass adds a forward pass over the step's tokens at the update's rate."""
    one = _central_hours(tmp_path, "p1", max_response_tokens=8000)
    two = _central_hours(tmp_path, "p2", max_response_tokens=8000, logprob_passes=2)
    three = _central_hours(tmp_path, "p3", max_response_tokens=8000, logprob_passes=3)
    assert one < two < three
    assert three - two == pytest.approx(two - one)
