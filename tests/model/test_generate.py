"""Generation: KV cache equals recomputation, seeded sampling is reproducible, eos stops."""

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer, sample

CFG = ModelConfig(vocab_size=61, seq_len=24, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
MOE = CFG.replace(n_experts=4, n_experts_active=2, n_shared_experts=1, moe_ffn_hidden=16)


def build(cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    # sharpen the random model a little so that greedy choices are not near-ties
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model


def prompts(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(
        0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(3)
    )


@pytest.mark.parametrize("cfg", [CFG, MOE], ids=["dense", "moe"])
def test_greedy_cache_equals_no_cache(cfg):
    """Also past seq_len: 5 + 30 tokens > 24, so the cropped window is re-encoded."""
    model = build(cfg)
    idx = prompts()
    cached = model.generate(idx, 30, temperature=0.0, use_cache=True)
    plain = model.generate(idx, 30, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, plain)


def test_greedy_is_argmax_of_forward():
    model = build()
    idx = prompts(1)
    out = model.generate(idx, 1, temperature=0.0)
    logits, _ = model(idx)
    assert out[0, -1] == logits[0, -1].argmax()


def test_long_prompt_is_cropped():
    model = build()
    idx = torch.randint(0, CFG.vocab_size, (1, 40))  # longer than seq_len=24
    a = model.generate(idx, 3, temperature=0.0)
    b = model.generate(idx[:, -24:], 3, temperature=0.0)
    assert torch.equal(a[:, 40:], b[:, 24:])


def test_seeded_sampling_is_reproducible():
    model = build()
    idx = prompts()
    kwargs = dict(temperature=0.8, top_k=20, top_p=0.9)
    a = model.generate(idx, 10, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.generate(idx, 10, generator=torch.Generator().manual_seed(7), **kwargs)
    c = model.generate(idx, 10, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the cache changes nothing in sampling either
    d = model.generate(
        idx, 10, generator=torch.Generator().manual_seed(7), use_cache=False, **kwargs
    )
    assert torch.equal(a, d)


def test_top_k_one_is_greedy():
    model = build()
    idx = prompts()
    greedy = model.generate(idx, 8, temperature=0.0)
    sampled = model.generate(idx, 8, temperature=1.5, top_k=1, generator=torch.Generator())
    assert torch.equal(greedy, sampled)


def test_sample_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # probs ~ [.64, .24, .09, .03, .01]: top_p=0.7 keeps the first two (0.64 < 0.7 <= 0.88)
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    # low temperature concentrates, high temperature flattens
    cold = sample(logits, 0.2, generator=g).eq(0).float().mean()
    hot = sample(logits, 5.0, generator=g).eq(0).float().mean()
    assert cold > 0.95 and hot < 0.4
    with pytest.raises(ValueError, match="temperature"):
        build().generate(prompts(), 1, temperature=-1.0)


def test_eos_stops_and_pads():
    model = build()
    idx = prompts()
    ref = model.generate(idx, 12, temperature=0.0)
    eos = int(ref[0, 5 + 3])  # row 0 produces it at its 4th new token
    out = model.generate(idx, 12, temperature=0.0, eos_id=eos)
    firsts = []
    for row in range(2):
        new = ref[row, 5:].tolist()
        first = new.index(eos) if eos in new else None
        firsts.append(first)
        got = out[row, 5:].tolist()
        if first is None:
            assert got == new[: len(got)]
        else:
            assert got[: first + 1] == new[: first + 1]
            assert all(t == eos for t in got[first:])  # padded with eos after finishing
    want_len = 12 if None in firsts else max(firsts) + 1
    assert out.shape[1] == 5 + want_len

    one = model.generate(idx[:1], 12, temperature=0.0, eos_id=eos)
    assert one.shape[1] == 5 + firsts[0] + 1 and one[0, -1] == eos
