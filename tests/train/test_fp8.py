"""mixed_precision=fp8 (train/fp8.py): refused with one line where it cannot run, the layers it
converts, and the conversion itself on CPU. Its speed and loss parity need an sm_89+ GPU
(launch/gpu_check.sh, stage loop-fp8)."""

import importlib.util
import logging
import sys

import pytest
import torch
from torch import nn

from model.config import PRESETS
from model.precision import TRAINING_SWITCHES, precision
from model.transformer import Transformer
from tests.utils import ROOT, run_cmd
from train import fp8
from train.config import load_config
from train.distributed import build_accelerator
from train.techniques import apply_techniques


@pytest.fixture
def gpu(monkeypatch):
    """Pretend this process sees a CUDA GPU of the capability the test sets (a mock of the
    environment the refusal reads, not of the conversion)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")

    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    return set_capability


def test_fp8_is_a_training_switch_of_the_precision_table():
    p = precision("fp8")
    assert "fp8" in TRAINING_SWITCHES and p.catalog == "fp8" and p.accelerate == "bf16"
    assert [precision(s).accelerate for s in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]


def test_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = fp8.refusal()
    assert "needs a CUDA GPU of compute capability 8.9" in reason and "\n" not in reason
    cfg = load_config(ROOT / "configs/train/tiny.yaml", ["mixed_precision=fp8"])
    with pytest.raises(ValueError, match="mixed_precision=fp8 needs a CUDA GPU"):
        build_accelerator(cfg)


def test_refused_below_compute_capability_8_9(gpu):
    gpu((8, 0))
    reason = fp8.refusal()
    assert reason == ("mixed_precision=fp8 needs compute capability 8.9 or newer (float8 tensor "
                      "cores); NVIDIA A100-SXM4-80GB has 8.0: use mixed_precision=bf16")


def test_refused_without_torchao(gpu, monkeypatch):
    gpu((9, 0))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    assert fp8.refusal() == ("mixed_precision=fp8 needs torchao, which is not installed: "
                             "pip install -e '.[fp8]' (or pip install torchao)")


def test_accepted_on_hopper_and_ada_with_torchao(gpu):
    pytest.importorskip("torchao")
    for cap in ((8, 9), (9, 0), (10, 0)):
        gpu(cap)
        assert fp8.refusal() is None


def test_cli_refusal_is_one_line():
    result = run_cmd([sys.executable, "-m", "train", "configs/train/tiny.yaml",
                      "mixed_precision=fp8", "data_dir=unused"], check=False,
                     env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mixed_precision=fp8 needs a CUDA GPU" in errors[0]


@pytest.mark.parametrize("shape, why", [
    ((4104, 2048), "multiples of 16"),  # in_features 4104 = 16 x 256 + 8
    ((4096, 1032), "multiples of 16"),
    ((4096, 1024), "too small to gain"),
    ((768, 768), "too small to gain"),
    ((4112, 1024), None),  # in > 4096
    ((768, 1040), None),  # out > 1024
])
def test_filter_by_shape(shape, why):
    reason = fp8.kept_in_bf16(nn.Linear(*shape, bias=False), "blocks.0.mlp.w_gate_up")
    assert (reason is None) if why is None else why in reason


def meta_model(preset: str, **fields) -> Transformer:
    cfg = PRESETS[preset]
    cfg = type(cfg)(**{**cfg.__dict__, **fields})
    with torch.device("meta"):  # the shapes only: no memory for a billion parameters
        return Transformer(cfg)


def test_filter_on_llama_1b_converts_the_big_block_matmuls():
    plan = fp8.plan(meta_model("llama-1b"))
    converted = {fqn for fqn, why in plan.items() if why is None}
    per_block = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")
    assert converted == {f"blocks.{i}.{name}" for i in range(22) for name in per_block}
    assert "output head" in plan["lm_head"]


def test_filter_on_gpt2_124m_converts_only_the_wide_projections():
    """At 768 wide only the fused 768 -> 2304 q/k/v and 768 -> 4096 gate/up projections pass
    torchao's threshold; the 768 -> 768 output and 2048 -> 768 down projections do not."""
    plan = fp8.plan(meta_model("gpt2-124m"))
    converted = {fqn for fqn, why in plan.items() if why is None}
    assert converted == {f"blocks.{i}.{n}" for i in range(12) for n in ("attn.wqkv",
                                                                          "mlp.w_gate_up")}


def test_filter_keeps_router_and_routed_experts():
    plan = fp8.plan(meta_model("deepseek-v3", n_layer=4, mtp_depth=0))
    assert "router" in plan["blocks.3.mlp.router"]
    assert "routed expert" in plan["blocks.3.mlp.experts.0.w_gate_up"]
    assert plan["blocks.3.mlp.shared.w_gate_up"] is None  # 7168 -> 2 x 2048: sees every token
    assert plan["blocks.0.mlp.w_gate_up"] is None  # a dense layer


FP8_TINY = ["model.vocab_size=512", "model.seq_len=32", "model.n_layer=2", "model.d_model=64",
            "model.n_head=4", "model.ffn_hidden=1040", "mixed_precision=fp8"]


def test_conversion_on_cpu_keeps_names_and_the_loss(caplog):
    """torchao converts on CPU (its float8 matmul also runs there in this torch): the chosen
    linears become Float8Linear, parameter names stay, and under bf16 autocast the loss is
    that of the same model in bf16 within 0.02 (fp8 rounding of three matmul operands)."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    cfg = load_config(None, FP8_TINY)
    torch.manual_seed(0)
    reference = Transformer(cfg.model)
    model = Transformer(cfg.model)
    model.load_state_dict(reference.state_dict())
    with caplog.at_level(logging.INFO, logger="train"):
        apply_techniques(model, cfg)
    float8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert float8 == {f"blocks.{i}.mlp.w_gate_up" for i in range(2)}
    assert "fp8: 2 of 9 linears in float8: blocks.{0..1}.mlp.w_gate_up" in caplog.text
    assert "kept in bf16: blocks.{0..1}.attn.wqkv" in caplog.text
    assert model.state_dict().keys() == reference.state_dict().keys()
    idx = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, m in (("fp8", model), ("bf16", reference)):
        with torch.autocast("cpu", torch.bfloat16):
            _, loss = m(idx, idx)
        loss.backward()
        losses[name] = loss.item() / idx.numel()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert losses["fp8"] == pytest.approx(losses["bf16"], abs=0.02)
    grad, ref = model.blocks[0].mlp.w_gate_up.weight.grad, reference.blocks[0].mlp.w_gate_up.weight.grad
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref.flatten(), dim=0) > 0.99


def test_a_model_with_nothing_to_convert_is_refused():
    pytest.importorskip("torchao")
    cfg = load_config(None, [*FP8_TINY, "model.ffn_hidden=128"])
    with pytest.raises(ValueError, match="converts no layer"):
        apply_techniques(Transformer(cfg.model), cfg)
