"""`python -m train.generate` and `train.load`: loading run directories and checkpoints, the KV
cache, sampling options and stopping at end of text."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from contracts.checkpoint import write_manifest
from model.config import ModelConfig
from model.transformer import Transformer
from tests.utils import run_cmd
from train.config import TrainConfig, to_yaml
from train.generate import generate_text
from train.load import load_run

CFG = ModelConfig(vocab_size=512, seq_len=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2)


def random_model(cfg: ModelConfig = CFG, seed: int = 0) -> Transformer:
    """A random model with a sharpened head, so that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model.eval()


def make_run_dir(path: Path, model: Transformer, tokenizer: Path) -> Path:
    """A run directory as train/loop.py writes it: resolved config.yaml, model.safetensors
    (save_model, tied embeddings stored once) and tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(model=model.cfg, data_dir=str(tokenizer.parent), out_dir=str(path))
    (path / "config.yaml").write_text(to_yaml(cfg))
    save_model(model, str(path / "model.safetensors"))
    shutil.copy(tokenizer, path / "tokenizer.json")
    return path


def generate_cli(path: Path, *args: str) -> str:
    result = run_cmd([sys.executable, "-m", "train.generate", str(path), "--threads", "1", *args])
    return result.stdout


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("gen") / "run", random_model(),
                        tiny_data / "tokenizer.json")


def test_load_run_restores_weights(run_dir):
    run = load_run(run_dir)
    expected = random_model().state_dict()
    assert run.cfg == CFG
    assert run.tokenizer_path == run_dir / "tokenizer.json"
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert run.model.lm_head.weight is run.model.tok_emb.weight  # still tied


def test_load_checkpoint_dir(run_dir, tmp_path):
    """A checkpoint holds its config in trainer.json; the tokenizer is the run directory's."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    model = random_model(seed=1)
    save_model(model, str(ckpt / "model.safetensors"))
    config = dataclasses.asdict(TrainConfig(model=CFG, data_dir="/nonexistent"))
    (ckpt / "trainer.json").write_text(json.dumps({"format": 1, "step": 10, "config": config}))
    write_manifest(ckpt, 10, {})  # a checkpoint loads only when its files match their manifest
    shutil.copy(run_dir / "tokenizer.json", run / "tokenizer.json")
    loaded = load_run(ckpt)
    assert torch.equal(loaded.model.tok_emb.weight, model.tok_emb.weight)
    assert loaded.tokenizer_path == run / "tokenizer.json"


@pytest.mark.slow  # two generate CLI runs: 6 s: the default tier stays under 3 minutes
def test_cli_greedy_same_with_and_without_cache(run_dir):
    """50 new tokens after an 18-token prompt pass seq_len=64, so the cropped window is
    re-encoded too."""
    args = ["--prompt", "def main(argv):\n    return", "--temperature", "0",
            "--max-new-tokens", "50", "--no-stop"]
    cached = generate_cli(run_dir, *args)
    plain = generate_cli(run_dir, *args, "--no-cache")
    assert cached.startswith("def main(argv):\n    return")
    assert len(cached) > len("def main(argv):\n    return") + 20
    assert cached == plain


def test_sampling_is_seeded(run_dir):
    run = load_run(run_dir)
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, num_samples=2,
                  stop_at_eos=False)
    a, stats = generate_text(run, "import os", seed=1, **kwargs)
    assert len(a) == 2 and stats["new_tokens"] == 40
    assert a == generate_text(run, "import os", seed=1, **kwargs)[0]
    assert a != generate_text(run, "import os", seed=2, **kwargs)[0]


def test_stops_at_end_of_text(tiny_data, tmp_path):
    """With a zero head every logit ties and greedy picks id 0, <|endoftext|>: generation stops
    after it, or runs to the token budget with stop_at_eos=False."""
    model = random_model(CFG.replace(tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    run = load_run(make_run_dir(tmp_path / "run", model, tiny_data / "tokenizer.json"))
    texts, stats = generate_text(run, "x = 1", max_new_tokens=10, temperature=0.0)
    assert texts == ["x = 1<|endoftext|>"] and stats["new_tokens"] == 1
    texts, stats = generate_text(run, "x = 1", max_new_tokens=10, temperature=0.0, stop_at_eos=False)
    assert stats["new_tokens"] == 10 and texts[0] == "x = 1" + "<|endoftext|>" * 10


def test_cli_errors(tmp_path):
    result = run_cmd([sys.executable, "-m", "train.generate", str(tmp_path)], check=False)
    assert result.returncode != 0
    assert "neither a run directory" in result.stderr
