"""Export to the transformers Llama format: transformers loads the files, computes the same
logits within float32 tolerance, generates the same greedy tokens, and tokenizes the same."""

import json
import sys

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.config import ModelConfig
from model.hf import llama_state_dict
from tests.train.test_generate import CFG, make_run_dir, random_model
from tests.utils import run_cmd
from train.export import export_model

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"
VARIANTS = {
    "tied-gqa": CFG,
    "untied-mha": CFG.replace(n_kv_head=4, tie_embeddings=False, rope_theta=500000.0,
                              norm_eps=1e-6, ffn_hidden=160),
}


def distinctive_model(cfg: ModelConfig):
    """A random model in which every weight matters to the logits: large query/key weights make
    attention sharp (so a wrong RoPE or head layout shows), and RMSNorm weights are not all 1
    (so swapped norms show)."""
    model = random_model(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wq.weight", "wk.weight")):
                p.mul_(10.0)
            elif name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tiny_data, tmp_path_factory):
    model = distinctive_model(VARIANTS[request.param])
    out = export_model(model, tiny_data / "tokenizer.json", tmp_path_factory.mktemp("hf") / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, hf, out


def test_logits_match(exported, tiny_data):
    model, hf, _ = exported
    ids = torch.tensor([Tokenizer.from_file(str(tiny_data / "tokenizer.json")).encode(TEXT).ids])
    assert 20 < ids.size(1) <= model.cfg.seq_len
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max |logit difference| ours vs transformers: {diff:.3g} (logits std {ours.std():.3g})")
    assert diff < 1e-4, diff


def test_greedy_generation_matches(exported):
    model, hf, _ = exported
    prompt = torch.randint(1, model.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    ours = model.generate(prompt, 40, temperature=0.0, eos_id=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                         do_sample=False)
    assert ours.size(1) > 8 + 1  # the comparison covers many tokens, not just one
    assert torch.equal(ours, theirs)


def test_config_and_weights(exported):
    model, hf, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == model.cfg.n_kv_head
    assert cfg["tie_word_embeddings"] == model.cfg.tie_embeddings
    assert hf.config.rms_norm_eps == model.cfg.norm_eps
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == model.cfg.tie_embeddings
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()


def test_tokenizer_round_trip(exported, tiny_data):
    _, _, out = exported
    ours = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == 0
    ids = theirs(TEXT)["input_ids"]
    assert ids == ours.encode(TEXT).ids
    assert theirs.decode(ids) == TEXT


def test_moe_is_refused(tmp_path, tiny_data):
    moe = ModelConfig(vocab_size=512, seq_len=16, n_layer=2, d_model=32, n_head=4,
                      n_experts=4, n_experts_active=2)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        export_model(random_model(moe), tiny_data / "tokenizer.json", tmp_path / "hf")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        llama_state_dict(random_model(moe))


def test_export_cli_from_run_dir(tmp_path, tiny_data):
    run = make_run_dir(tmp_path / "run", random_model(), tiny_data / "tokenizer.json")
    run_cmd([sys.executable, "-m", "train.export", str(run), str(tmp_path / "hf")])
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.model.embed_tokens.weight, random_model().tok_emb.weight)
