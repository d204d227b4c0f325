"""Runs saved before q/k/v and gate/up were fused (separate wq, wk, wv, w_gate, w_up weights):
generate and export load them with the weights stacked as they load; a resume is refused in
one line naming the change."""

import pytest
import torch
from safetensors.torch import save_file

from model.hf import fuse_separate, split_fused
from tests.train.test_generate import CFG, make_run_dir, random_model
from train.load import load_run, refuse_unfused


def save_as_before(run_dir, model):
    """model.safetensors as the model before the fusion wrote it: separate projections, the
    tied embedding stored once."""
    state = split_fused(model.state_dict(), model.cfg)
    del state["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(run_dir / "model.safetensors"))


def test_split_then_fuse_is_the_identity():
    state = random_model().state_dict()
    separate = split_fused(state, CFG)
    assert "blocks.0.attn.wk.weight" in separate and "blocks.1.mlp.w_up.weight" in separate
    assert not any(k.endswith(("wqkv.weight", "w_gate_up.weight")) for k in separate)
    fused = fuse_separate(separate)
    assert fused.keys() == state.keys()
    assert all(torch.equal(fused[k], state[k]) for k in state)


def test_a_run_saved_before_the_fusion_loads_and_generates_the_same(tmp_path, tiny_data):
    model = random_model()
    run_dir = make_run_dir(tmp_path / "old", model, tiny_data / "tokenizer.json")
    save_as_before(run_dir, model)
    loaded = load_run(run_dir).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.generate(idx, 8, temperature=0.0),
                       model.generate(idx, 8, temperature=0.0))


def test_resuming_a_run_saved_before_the_fusion_is_refused_in_one_line(tmp_path, tiny_data):
    model = random_model()
    run_dir = make_run_dir(tmp_path / "old", model, tiny_data / "tokenizer.json")
    refuse_unfused(run_dir / "model.safetensors")  # today's files pass
    save_as_before(run_dir, model)
    with pytest.raises(ValueError, match="saved before q/k/v and gate/up were fused") as e:
        refuse_unfused(run_dir / "model.safetensors")
    assert "\n" not in str(e.value)
