"""Each efficiency switch changes how a step is computed, never what it computes."""

import sys

import pytest
import torch
from accelerate import Accelerator
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.flops import model_flops_per_token
from model.transformer import Transformer
from tests.utils import run_cmd
from train.ablate import TECHNIQUES, markdown, peak_step_bytes
from train.config import load_config
from train.optim import build_optimizer
from train.techniques import (
    apply_techniques,
    build_model,
    executed_flops_per_token,
    resolve_compile,
    techniques_in_use,
)

TINY = ["model.vocab_size=512", "model.seq_len=64", "model.n_layer=4", "model.d_model=64",
        "model.n_head=4", "model.n_kv_head=2"]


def grads_and_memory(*overrides: str):
    """Gradients of two forward/backward passes of a seeded tiny model, and the second one's
    peak memory (the first allocates the .grad tensors)."""
    cfg = load_config(None, [*TINY, "model.seq_len=128", *overrides])
    torch.manual_seed(0)
    model = apply_techniques(Transformer(cfg.model), cfg)
    idx = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(1))

    def step():
        _, loss = model(idx, idx)
        loss.backward()

    step()
    memory = peak_step_bytes(step, torch.device("cpu"))
    return {n: p.grad for n, p in model.named_parameters()}, memory


@pytest.mark.slow  # default tier under ~3 min on 2 busy cores
def test_recomputation_gives_the_same_gradients_and_saves_memory():
    base, base_mem = grads_and_memory()
    memory = {}
    for mode in ("full", "every_k", "attention"):
        grads, memory[mode] = grads_and_memory(f"activation_checkpointing={mode}")
        assert grads.keys() == base.keys()  # parameter names unchanged
        for name in base:
            torch.testing.assert_close(grads[name], base[name], rtol=1e-5, atol=1e-7)
    # activations dominate at this shape: full < every 2nd block < attention only < none
    assert memory["full"] < memory["every_k"] < memory["attention"] < base_mem
    assert memory["full"] < 0.5 * base_mem


def test_attention_recompute_flops_match_flop_counter():
    cfg = load_config(None, [*TINY, "model.d_model=128", "activation_checkpointing=attention"])
    torch.manual_seed(0)
    model = apply_techniques(Transformer(cfg.model), cfg)
    idx = torch.randint(0, 512, (2, 64))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss = model(idx, idx)
        loss.backward()
    counted = counter.get_total_flops() / idx.numel()
    assert executed_flops_per_token(cfg, 64) == pytest.approx(counted, rel=1e-6)
    assert counted > model_flops_per_token(cfg.model, 64)
    every_2 = load_config(None, [*TINY, "activation_checkpointing=every_k", "checkpoint_every_k=2"])
    full = load_config(None, [*TINY, "activation_checkpointing=full"])
    plain = model_flops_per_token(full.model, 64)
    assert executed_flops_per_token(every_2, 64) - plain == pytest.approx(
        (executed_flops_per_token(full, 64) - plain) / 2)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_keeps_parameter_names(scope):
    cfg = load_config(None, [*TINY, "compile=true", f"compile_scope={scope}"])
    plain = Transformer(cfg.model).state_dict().keys()
    assert apply_techniques(Transformer(cfg.model), cfg).state_dict().keys() == plain


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_model_gives_the_same_gradients(scope):
    base, _ = grads_and_memory()
    grads, _ = grads_and_memory("compile=true", f"compile_scope={scope}",
                                "activation_checkpointing=every_k")
    for name in base:
        torch.testing.assert_close(grads[name], base[name], rtol=1e-3, atol=1e-5)  # fused kernels round differently


def test_fused_and_foreach_adamw_take_the_same_step():
    weights = {}
    for fused in (True, False):
        cfg = load_config(None, [*TINY, f"optim.fused={str(fused).lower()}"])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
        assert optimizer.defaults["fused"] is (True if fused else None)
        for step in range(3):
            idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(step))
            _, loss = model(idx, idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[fused] = model.state_dict()
    for name in weights[True]:
        torch.testing.assert_close(weights[True][name], weights[False][name])


def test_bad_switches_are_refused():
    with pytest.raises(ValueError, match="compile_scope must be one of model, blocks, got 'layer'"):
        load_config(None, ["compile_scope=layer"])
    with pytest.raises(ValueError, match="attention"):
        load_config(None, ["activation_checkpointing=selective"])
    cfg = load_config(None, [*TINY, "fsdp=true"])
    with pytest.raises(ValueError, match="2 or more"):
        build_model(cfg, Accelerator(cpu=True))


def test_techniques_in_use_name_every_switch():
    cfg = load_config(None, [*TINY, "compile=true", "compile_scope=blocks", "fsdp=true",
                             "activation_checkpointing=every_k", "checkpoint_every_k=3",
                             "mixed_precision=bf16", "optim.fused=false"])
    model = Transformer(cfg.model)
    assert techniques_in_use(cfg, build_optimizer(model, cfg.optim, torch.device("cpu"))) == {
        "compile": True, "compile_scope": "blocks", "compile_mode": "default",
        "compile_optimizer": False, "fsdp": True,
        "activation_checkpointing": "every_k", "checkpoint_every_k": 3, "checkpointed_layers": [0, 3],
        "mixed_precision": "bf16", "fused_optimizer": False}
    plain = load_config(None, [*TINY, "activation_checkpointing=attention"])
    used = techniques_in_use(plain, build_optimizer(model, plain.optim, torch.device("cpu")))
    assert used["compile"] is False and used["compile_mode"] is None  # compile=auto, unsettled
    assert used["compile_scope"] is None and used["checkpoint_every_k"] is None
    assert used["checkpointed_layers"] == [0, 1, 2, 3] and used["fused_optimizer"] is True


def test_ablation_table_lists_every_technique_with_a_source():
    rows = [{"technique": t.name, "tokens_per_s": 100.0 / (i + 1), "tokens_per_s_vs_baseline": 1 / (i + 1),
             "step_peak_bytes": 2**20 * (i + 1), "step_memory_vs_baseline": i + 1.0,
             "peak_rss_bytes": 2**30, "flops_ratio": 1.2, "expectation": t.expectation}
            for i, t in enumerate(TECHNIQUES)]
    table = markdown(rows, "a test machine", "python -m train.ablate")
    assert table.count("\n| ") == len(TECHNIQUES) + 1  # header + one row each
    cited = [t for t in TECHNIQUES[1:] if not any(ch.isdigit() for ch in t.expectation)]
    assert not cited, f"expectations without a source year or figure: {cited}"


@pytest.mark.slow  # default tier under ~3 min on 2 busy cores
def test_fsdp_sharded_checkpoint_round_trip(tmp_path):
    result = run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      "launch/accelerate/cpu_ddp.yaml", "--main_process_port", "29631",
                      "tests/train/fsdp_worker.py", str(tmp_path / "ckpt")],
                     env={"ACCELERATE_USE_CPU": "1", "PYTHONPATH": "."})
    assert "sharded checkpoint round trip: OK" in result.stdout
    assert len(list((tmp_path / "ckpt").glob("*.distcp"))) == 2  # one file of slices per rank


def test_compile_auto_compiles_on_cuda_only():
    for device, expected in (("cpu", "false"), ("mps", "false"), ("cuda", "true")):
        cfg = load_config(None, TINY)
        resolve_compile(cfg, torch.device(device))
        assert cfg.compile == expected, device
    cfg = load_config(None, [*TINY, "compile=false"])
    resolve_compile(cfg, torch.device("cuda"))
    assert cfg.compile == "false"  # an explicit choice stays


@pytest.mark.parametrize("overrides, device, message", [
    ([], "cpu", r"captures CUDA graphs and needs a CUDA GPU \(this run is on cpu\)"),
    (["compile=false"], "cuda", "needs compile=true"),
    (["model.n_experts=4", "model.n_experts_active=2"], "cuda", "MoE routing"),
    (["fsdp=true"], "cuda", "FSDP's per-layer all-gathers"),
])
def test_cuda_graphs_are_refused_where_shapes_or_device_do_not_allow_them(overrides, device,
                                                                          message):
    cfg = load_config(None, [*TINY, "compile_mode=reduce-overhead", *overrides])
    with pytest.raises(ValueError, match=message):
        resolve_compile(cfg, torch.device(device))


def test_cuda_graphs_accepted_for_the_dense_loop_on_cuda():
    cfg = load_config(None, [*TINY, "compile_mode=reduce-overhead"])
    resolve_compile(cfg, torch.device("cuda"))
    assert cfg.compile == "true"


def test_cuda_graphs_refused_on_cpu_by_the_trainer(tmp_path):
    result = run_cmd([sys.executable, "-m", "train", "configs/train/tiny.yaml", "data_dir=unused",
                      "compile_mode=reduce-overhead"], check=False)
    assert result.returncode == 2 and "error: compile_mode=reduce-overhead" in result.stderr


@pytest.mark.parametrize("mode, scope", [("max-autotune", "model"), ("reduce-overhead", "blocks")])
def test_compile_mode_reaches_torch_compile(monkeypatch, mode, scope):
    """The mode is handed to nn.Module.compile for each compiled module (a spy on the call:
    compiling in these modes on CPU would take minutes, and CUDA graphs need a GPU)."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    cfg = load_config(None, [*TINY, "compile=true", f"compile_scope={scope}",
                             f"compile_mode={mode}"])
    model = apply_techniques(Transformer(cfg.model), cfg)
    expected = list(model.blocks) if scope == "blocks" else [model]
    assert [m for m, _ in calls] == expected and all(kw == {"mode": mode} for _, kw in calls)
    calls.clear()
    apply_techniques(Transformer(cfg.model), load_config(None, [*TINY, "compile=true"]))
    assert [kw for _, kw in calls] == [{"mode": None}]  # compile_mode=default: torch's default


def test_compile_step_settles_groups_loaded_from_a_fused_run():
    """A resume loads the saved groups' settings (fused, a float lr); compile_step, which the
    loop calls after loading, makes them those of the compiled foreach step again."""
    from train.config import OptimConfig
    from train.optim import compile_step, set_lr

    model = torch.nn.Linear(4, 4)
    fused = build_optimizer(model, OptimConfig(lr=0.1), torch.device("cpu"))
    model(torch.ones(4)).sum().backward()
    fused.step()
    compiled = build_optimizer(model, OptimConfig(lr=0.1), torch.device("cpu"), compiled=True)
    compiled.load_state_dict(fused.state_dict())
    assert compiled.param_groups[0]["fused"] and not torch.is_tensor(compiled.param_groups[0]["lr"])
    compile_step(compiled)
    for group in compiled.param_groups:
        assert group["foreach"] and not group["fused"] and group["capturable"]
        assert torch.is_tensor(group["lr"]) and float(group["lr"]) == pytest.approx(0.1)
    set_lr(compiled, 0.05)
    assert all(float(g["lr"]) == pytest.approx(0.05) for g in compiled.param_groups)
    assert compiled.step is not compiled.eager_step  # compiled once, not wrapped twice
    assert compiled.eager_step.__func__ is torch.optim.AdamW.step
