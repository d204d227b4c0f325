"""A model shape from a parameter count: what `--params` (and `--active-params`, `--experts`)
become, so that a target given by size goes through the performance model like any other.

The rule follows published shapes (config.json of each model on its card):

| model          | params | d_model | layers | heads x dim | kv heads | ffn    | vocab   | tied |
|----------------|--------|---------|--------|-------------|----------|--------|---------|------|
| Llama 3.2 1B   | 1.24B  | 2048    | 16     | 32 x 64     | 8        | 8192   | 128,256 | yes  |
| Llama 3.2 3B   | 3.21B  | 3072    | 28     | 24 x 128    | 8        | 8192   | 128,256 | yes  |
| Llama 3.1 8B   | 8.03B  | 4096    | 32     | 32 x 128    | 8        | 14,336 | 128,256 | no   |
| Llama 3.1 70B  | 70.6B  | 8192    | 80     | 64 x 128    | 8        | 28,672 | 128,256 | no   |
| Llama 3.1 405B | 406B   | 16,384  | 126    | 128 x 128   | 8        | 53,248 | 128,256 | no   |

and below 1B (SMALL_BELOW), where no Llama 3 model is, MobileLLM's (Liu et al. 2024,
arXiv:2402.14905, Table 9; a study of shapes below 1B, none of its runs in published_runs.yaml):

| model          | params | d_model | layers | heads x dim | kv heads | ffn    | vocab   | tied |
|----------------|--------|---------|--------|-------------|----------|--------|---------|------|
| MobileLLM 125M | 125M   | 576     | 30     | 9 x 64      | 3        | 1536   | 32,000  | yes  |
| MobileLLM 350M | 345M   | 960     | 32     | 15 x 64     | 5        | 2560   | 32,000  | yes  |
| MobileLLM 600M | 603M   | 1152    | 40     | 18 x 64     | 6        | 3072   | 32,000  | yes  |

- width: d_model interpolated log-log in the parameter count between those models (beyond
  them, the nearest segment's slope extended; below 1B through the MobileLLM widths and on to
  Llama 3.2 1B), rounded to 8 heads (so that 8 key/value heads and tensor parallelism up to 8
  divide it: 7B gives 4096, 175B 12,288 as GPT-3); below 1B to one head of 64 (576 = 9 heads,
  960 = 15 as SmolLM and MobileLLM: rounded to 512, 135M became 1024 wide);
- heads of 128 channels (64 below d_model 2560, as Llama 3.2 1B and every published shape
  below 1B but Gemma 3's and Qwen3's), 8 key/value heads (grouped-query attention, every Llama 3
  size; Qwen2.5 7B-72B also use 4-8), or the largest number up to 8 that divides the heads
  (9 heads: 3, 15: 5, 18: 6, as MobileLLM; a prime number of heads gets 1, multi-query);
- SwiGLU width 3.0 x d_model rounded to 256 (Qwen3 0.6B and 8B use 3.0), fitted on shapes alone,
  never on hours (`python -m estimate probe`, "The size rule against published shapes"): over 61
  published dense shapes (2026-12-07: the 46 dense runs of published_runs.yaml then, and 15
  configs of other models in estimate.probe.PUBLISHED_CONFIGS: Qwen2.5, Qwen3, Mistral, Gemma,
  OLMo, OLMo 2; 74 since 2026-12-08, with 50 runs and 9 configs below 1.6B), 3.0 is the
  ratio at which the rule's depth is unbiased (median ln(rule / published layers) +0.02 on the
  runs, 0.00 on the configs) and the one of 2.7 (the median published ratio, mostly LLaMA's
  8d/3 and GELU 4d), 3.0 and 3.5 (Llama 3's, before 2026-12-07: the rule 9-13% too shallow)
  that lowers the summed mean |ln| errors of width, depth and MLP ratio on both sets;
- vocabulary 128,256 (Llama 3); below 1B 49,152, the median of the 12 published dense shapes
  there (three of 32,000 (MobileLLM), three of 49,152 (SmolLM), two each of 50,304 (Pythia),
  151,936 (Qwen) and 262,144 (Gemma 3): the lower of the two middle ones). Llama 3's 128,256
  below 1B made the 128K embedding most of a small model (135M: one block of width 1024).
  Embeddings tied below 4B parameters (Llama 3.2 1B and 3B, Qwen2.5 up to 3B tie them, and 10
  of the 12 below 1B; the larger ones do not);
- below 1B, fitted on shapes alone (`python -m estimate probe`, the shape table; 2026-12-08):
  over the 12 published dense shapes below 1B the rule's summed mean |ln| errors of width,
  depth and MLP ratio went 1.96 -> 0.53 (width 0.37 -> 0.10, depth 1.40 -> 0.23, its median
  -0.74 -> +0.01), every shape's parameter count within 2.3% (MobileLLM 125M was 15% over);
  at and above 1B the rule is unchanged (SMALL_BELOW: at 1B the shape jumps from 1728 x 28
  blocks, vocabulary 49,152 to 2048 x 15, 128,256, as published 1B models range from Gemma 3's
  1152 x 26 to Llama 3.2's 2048 x 16). SmolLM2 135M / 360M as anchors (the same widths) gave
  0.54, MobileLLM's vocabulary of 32,000 0.53, rounding the MLP to 64 0.52: not taken, within
  the noise of 12 shapes;
- depth: the number of blocks that brings the parameter count to the one given;
- mixture of experts (`active_params` < `params`): width and depth of the dense model of the
  active size, every block a mixture; fine-grained experts after DeepSeek-V3 (DeepSeek-AI 2024,
  sec. 2.1.2 and 4.2: 1 shared and 256 routed experts, 8 active, expert width 2048 for
  d_model 7168): 8 routed experts active and 1 shared, each expert 3.0 x d_model / 9 wide, so
  the active MLP width equals the dense one; the routed experts' number follows from the
  total. `experts` fixes their number instead (up to 16: no shared expert, as Mixtral), and
  the active ones follow from the active size.
- context: DEFAULT_SEQ_LEN unless given.
"""

from __future__ import annotations

import math

from model.config import ModelConfig

# (parameters, d_model) of the models in the table above
ANCHORS = ((1.24e9, 2048), (3.21e9, 3072), (8.03e9, 4096), (70.6e9, 8192), (406e9, 16384))
VOCAB = 128256
SMALL_BELOW = 1e9  # below it the rule for small models (docstring); at and above it as before
SMALL_ANCHORS = ((124.6e6, 576), (345.3e6, 960), (603.1e6, 1152))  # MobileLLM 125M, 350M, 600M
SMALL_VOCAB = 49152  # the median vocabulary of the published dense shapes below 1B
SMALL_ROUND = 64  # below 1B d_model is a whole number of heads of 64, any number of them
TIE_BELOW = 4e9
FFN_RATIO = 3.0  # fitted on published shapes (docstring); 3.5 (Llama 3) before 2026-12-07
KV_HEADS = 8
ROUTED_ACTIVE = 8
DEFAULT_SEQ_LEN = 4096  # Llama 2's context (Touvron et al. 2023b, sec. 2.2); --seq-len changes it


def width(params: float) -> float:
    """d_model for a dense model of `params` parameters, before rounding."""
    x = math.log(params)
    anchors = ANCHORS if params >= SMALL_BELOW else SMALL_ANCHORS + ANCHORS
    pts = [(math.log(p), math.log(d)) for p, d in anchors]
    i = 0
    while i < len(pts) - 2 and x > pts[i + 1][0]:
        i += 1
    (x0, y0), (x1, y1) = pts[i], pts[i + 1]
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def _attention(d: int, head: int) -> tuple[int, int, int]:
    """(n_head, n_kv_head, parameters of the attention projections)."""
    n_head = d // head
    kv = min(KV_HEADS, n_head)
    while n_head % kv:
        kv -= 1
    return n_head, kv, 2 * d * d + 2 * d * kv * head


def shape_from_size(params: float, active_params: float | None = None, *,
                    seq_len: int | None = None, experts: int | None = None) -> ModelConfig:
    """The shape the rule above gives for `params` total (and `active_params` per token)."""
    if not params or params <= 0:
        raise ValueError(f"--params must be > 0, got {params}")
    active = float(active_params or params)
    if active > params:
        raise ValueError(f"--active-params {active:.4g} exceeds --params {params:.4g}")
    moe = active < params * 0.999 or experts is not None
    small = active < SMALL_BELOW
    head = 128 if width(active) >= 2560 else 64
    # heads a multiple of 8 (tensor parallel up to 8); below 1B any number of heads of 64
    d = _round(width(active), SMALL_ROUND if small else 8 * head)
    n_head, kv, attn = _attention(d, head)
    ffn = _round(FFN_RATIO * d, 256)
    tie = params < TIE_BELOW
    vocab = SMALL_VOCAB if small else VOCAB
    emb = vocab * d * (1 if tie else 2)
    norms = 2 * d
    T = int(seq_len or DEFAULT_SEQ_LEN)
    dense_block = attn + 3 * d * ffn + norms
    layers = max(1, round((active - emb - d) / dense_block))
    after = "MobileLLM" if small else "Llama 3 / 3.2"
    how = (f"shape from size (estimate/shapes.py rule after {after} shapes): d_model {d}, "
           f"{layers} layers, {n_head} heads of {head}, {kv} kv heads, vocab {vocab}")
    if not moe:
        return ModelConfig(vocab_size=vocab, seq_len=T, n_layer=layers, d_model=d, n_head=n_head,
                           n_kv_head=kv, ffn_hidden=ffn, tie_embeddings=tie,
                           notes=f"{how}, ffn {ffn}, embeddings {'tied' if tie else 'untied'}")
    budget_total = (params - emb - d) / layers - attn - norms - d  # MLP weights per block (router ~)
    budget_active = (active - emb - d) / layers - attn - norms
    if experts is None:
        shared, k = 1, ROUTED_ACTIVE
        f = _round(budget_active / (3 * d * (k + shared)), 64)
        n_exp = max(k, round(budget_total / (3 * d * f) - shared))
    else:
        n_exp = int(experts)
        if n_exp < 2:
            raise ValueError(f"--experts must be >= 2, got {experts}")
        shared = 0 if n_exp <= 16 else 1
        f = _round(budget_total / (3 * d * (n_exp + shared)), 64)
        k = min(n_exp, max(1, round(budget_active / (3 * d * f) - shared)))
    return ModelConfig(vocab_size=vocab, seq_len=T, n_layer=layers, d_model=d, n_head=n_head,
                       n_kv_head=kv, ffn_hidden=ffn, tie_embeddings=tie, n_experts=n_exp,
                       n_experts_active=k, n_shared_experts=shared, moe_ffn_hidden=f,
                       notes=f"{how}; {n_exp} routed experts ({k} active) and {shared} shared, "
                             f"each {f} wide")
