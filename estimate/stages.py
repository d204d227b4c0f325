"""Multi-stage projections: a training recipe as a list of stages, each predicted by the
performance model and shown beside its published figure.

A stages file (configs/estimate/*.yaml) names the accelerator, a price per accelerator-hour
and the stages. A stage is one of:

- `pretrain` (also context extension and SFT: next-token training on `tokens` tokens of
  `seq_len`): `estimate.engine.estimate_run` (the function of `project` and `validate`) at
  the stage's layout, with the factors fitted on published runs (`published.fit`): the stack
  efficiency (x the planned-layout factor where the stage gives no layout) and the factor of
  the file's `hours_basis` (default compute: hours derived from training time, as DeepSeek's
  GPU-hour tables are).
- `published`: a stage this model does not cover (e.g. generating SFT data), taken at its
  published figure and marked so.
- `rl` (GRPO-style reinforcement learning, Shao et al. 2024): each step generates
  `samples_per_prompt` responses to `prompts_per_step` prompts with the current policy, then
  updates the policy on them. A rollout may generate the responses of several steps at once
  (`outputs_per_rollout`, default one step's: R1 generates 8,192 outputs per rollout and
  trains on them in 16 mini-batches of 512), which decodes them in larger batches; its time is
  shared among its steps. One step is the sum of these terms, each printed in the stage notes:
  - decoding (`decode_seconds`): a decode step of a batch takes the slowest of reading what it
    needs from HBM (the weights of every expert the batch routes to, and every sequence's KV
    cache), its FLOPs (2 per active weight per token), and a per-token latency floor of the
    serving system (`decode_step_latency_ms` / `mtp_tokens_per_step`, default none: the
    expert-parallel all-to-all and kernel latencies of a step, which no batch size amortises);
    the batch is what the KV cache, reserved for `max_response_tokens` (the length cap, default
    the mean), leaves room for;
  - the rollout tail (`expected_longest`): a rollout lasts until its longest response ends.
    Response lengths are taken as spread exponentially around the mean (the maximum-entropy
    spread for a given mean), so the longest of n is the mean x H_n (the n-th harmonic number,
    9.6 for 8,192), at most the cap; the rollout's decoding is the longer of the bulk (the mean
    length of steps at the full batch, per wave) and the tail (the longest response's steps at a
    batch of one, where the latency floor binds);
  - moving the policy weights to the generation engine once per rollout: each of an
    instance's accelerators receives its 1/g share of the weights over its network link;
  - the update, a training step on the generated tokens at the stage's layout;
  - the log-probability passes (`logprob_passes`, default 1: the reference model of the KL
    term): forward passes over every generated and prompt token, 2 FLOPs per active weight per
    token plus the attention core (`logprob_flops`), charged at the update's achieved rate.
  Not modelled: the reward evaluation (rule checks and code execution, run asynchronously
  beside the other modules in the R1 paper's RL framework) and the reference refresh (a copy of
  the policy every 400 steps).

Inputs a paper does not publish are given as `assumed: {central, low, high, why}` and swept
over their range; published inputs carry a `source`. Stages that share one published figure
(DeepSeek-V3's two context-extension phases) name the same `published.group`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from estimate.assumptions import load_defaults
from estimate.engine import estimate_run
from estimate.hardware import Accelerator, get_accelerator
from estimate.perf import BYTES_PER_GB, load_factors, rates, step_time
from estimate.published import complete_layout, fit
from estimate.units import SECONDS_PER_HOUR, parse_count
from model.config import ModelConfig, get_preset
from model.flops import count_params, model_flops_per_token
from model.precision import precision as precision_of

CASES = ("best", "central", "worst")
KINDS = ("pretrain", "rl", "published")
STAGES_DIR = Path(__file__).resolve().parents[1] / "configs" / "estimate"


@dataclass
class StageResult:
    name: str
    kind: str
    hours: dict[str, float]  # accelerator-hours by case
    count: int
    published_hours: float | None
    published_source: str
    group: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def days(self) -> float:
        return self.hours["central"] / self.count / 24


def _value(spec, case: str, where: str) -> float:
    """A number, or an `assumed` range taken at `case` (best = the low-cost end)."""
    if isinstance(spec, dict) and "assumed" in spec:
        a = spec["assumed"]
        lo, c, hi = (float(parse_count(a[k], where)) for k in ("low", "central", "high"))
        if not lo <= c <= hi:
            raise ValueError(f"{where}: assumed needs low <= central <= high")
        return {"best": lo, "central": c, "worst": hi}[case]
    return float(parse_count(spec, where))


# Inputs whose low-cost end is their high value (a larger rollout decodes in larger batches).
_HIGH_IS_BEST = {"best": "worst", "central": "central", "worst": "best"}


def kv_bytes_per_token(cfg: ModelConfig) -> float:
    """KV-cache bytes per token in 16 bits: MLA caches its compressed latent and the shared
    rope key (DeepSeek-V2 sec. 2.1.2); other attention caches keys and values per KV head."""
    if cfg.is_mla:
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.n_kv_head * cfg.head_dim
    return 2.0 * per_layer * cfg.n_layer


def decode_seconds(cfg: ModelConfig, acc: Accelerator, g: int, batch: float, context: float,
                   precision: str, f: dict[str, float], floor_s: float = 0.0) -> float:
    """One decode step of `batch` sequences at mean `context` tokens on an instance of g
    accelerators: the slowest of reading what the step needs (weights of every expert the
    batch routes to, and the KV caches), its FLOPs (2 per active weight per token), and the
    serving system's per-token latency floor `floor_s`."""
    weight_bytes = precision_of(precision).bytes
    total, active = count_params(cfg), count_params(cfg, active=True)
    read = min(total, active * batch) * weight_bytes + batch * context * kv_bytes_per_token(cfg)
    bw = float(acc.get("memory_bw_gbs")) * BYTES_PER_GB * f["memory_efficiency"]
    rate, _, _ = rates(acc, precision, f)
    flops = batch * model_flops_per_token(cfg, int(context)) / 3  # a forward pass per token
    return max(read / (g * bw), flops / (g * rate), floor_s)


def expected_longest(mean: float, n: int, cap: float) -> float:
    """Expected longest of n response lengths spread exponentially with mean `mean` (the
    maximum-entropy spread for a given mean): mean x H_n, the n-th harmonic number (the
    expected maximum of n unit exponentials), at most the length cap."""
    return min(cap, mean * sum(1.0 / k for k in range(1, int(n) + 1)))


def logprob_flops(cfg: ModelConfig, tokens: float, seq_len: int, passes: float = 1.0) -> float:
    """FLOPs of `passes` forward-only passes over `tokens` tokens of `seq_len`: one third of
    the training FLOPs per token, i.e. 2 per active weight plus the attention core's forward."""
    return passes * tokens * model_flops_per_token(cfg, seq_len) / 3


def _rl_seconds(stage: dict, cfg: ModelConfig, acc: Accelerator, n: int, precision: str,
                factors, case: str, where: str) -> tuple[float, list[str]]:
    """Seconds of one RL step: its share of the rollout (decoding, bulk or tail, and the
    weight transfer), the policy update and the log-probability passes."""
    f = {k: v.at(case) for k, v in factors.items()}
    prompts = _value(stage["prompts_per_step"], case, where)
    samples = _value(stage["samples_per_prompt"], case, where)
    prompt_len = _value(stage["prompt_tokens"], case, where)
    response = _value(stage["response_tokens"], case, where)
    # The decoding engine must hold the KV cache of a sequence that may reach the maximum
    # length (the paper's cap), not only the mean: the batch is sized for the cap.
    cap = float(parse_count(stage.get("max_response_tokens", response), where))
    if cap < response:
        raise ValueError(f"{where}: max_response_tokens {cap:.0f} is below the mean "
                         f"response_tokens {response:.0f} of case {case}")
    g = int(stage.get("generation_instance", 32))
    instances = max(1, n // g)
    sequences = prompts * samples
    rollout = _value(stage.get("outputs_per_rollout", sequences), _HIGH_IS_BEST[case], where)
    if rollout < sequences:
        raise ValueError(f"{where}: outputs_per_rollout {rollout:.0f} is below one step's "
                         f"{sequences:.0f} responses")
    latency = (_value(stage["decode_step_latency_ms"], case, where) / 1e3
               if "decode_step_latency_ms" in stage else 0.0)
    mtp = _value(stage.get("mtp_tokens_per_step", 1), _HIGH_IS_BEST[case], where)
    passes = _value(stage.get("logprob_passes", 1), case, where)
    if mtp < 1:
        raise ValueError(f"{where}: mtp_tokens_per_step {mtp:g} is below 1")
    floor = latency / mtp
    context = prompt_len + response / 2  # mean context while decoding
    weight_bytes = count_params(cfg) * precision_of(precision).bytes
    room = float(acc.get("memory_gb")) * BYTES_PER_GB * g * 0.9 - weight_bytes
    if room <= 0:
        raise ValueError(f"{where}: the model does not fit one {g}-accelerator generation "
                         "instance; raise generation_instance")
    per_instance = math.ceil(rollout / instances)
    batch = max(1.0, min(per_instance, room / ((prompt_len + cap) * kv_bytes_per_token(cfg))))
    waves = math.ceil(per_instance / batch)
    bulk = waves * response * decode_seconds(cfg, acc, g, batch, context, precision, f, floor)
    longest = expected_longest(response, int(rollout), cap)
    tail = longest * decode_seconds(cfg, acc, g, 1, prompt_len + longest / 2, precision, f, floor)
    link = float(acc.get("network_gbs") or acc.get("interconnect_gbs")) * BYTES_PER_GB
    sync = weight_bytes / g / link  # each generation accelerator receives its share
    share = sequences / rollout  # one rollout feeds rollout / sequences steps
    gen = (max(bulk, tail) + sync) * share
    tokens = sequences * (prompt_len + response)
    seq_len = int(prompt_len + response)
    lay = complete_layout(cfg, n, acc, seq_len, tokens, stage.get("layout") or {})
    train = step_time(cfg, seq_len, acc, n, lay, precision, stage.get("recompute", "full"),
                      factors, case).total
    # forward-only passes at the update's achieved FLOP rate (the training layout)
    logprob = logprob_flops(cfg, tokens, seq_len, passes) / (
        tokens * model_flops_per_token(cfg, seq_len) / train)
    note = (f"per step: {sequences:.0f} responses of {response:.0f} tokens (mean), from rollouts "
            f"of {rollout:.0f} decoded in {waves} wave(s) of {batch:.0f} per {g}-accelerator "
            f"instance; a rollout decodes for max(bulk {bulk:.0f} s, tail {tail:.0f} s: the "
            f"longest response, {longest:.0f} tokens, at {1e3 * tail / longest:.1f} ms a token; "
            f"latency floor {1e3 * floor:.1f} ms a token) + weights to the engine {sync:.1f} s; "
            f"a step's share {gen:.0f} s, update {train:.0f} s, log-prob passes "
            f"({passes:g}) {logprob:.0f} s")
    return gen + train + logprob, [note]


def run_stages(path: str | Path) -> tuple[dict, list[StageResult]]:
    """Predict every stage of a stages file; returns the file's header and the results."""
    path = Path(path)
    with open(path) as fh:
        spec = yaml.safe_load(fh)
    for key in ("name", "accelerator", "stages"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r}")
    acc = get_accelerator(spec["accelerator"])
    fitted = fit()
    d = load_defaults()
    basis = spec.get("hours_basis", "compute")
    if basis not in fitted.basis:
        raise ValueError(f"{path}: hours_basis {basis!r}; valid: {', '.join(fitted.basis)}")
    results = []
    for i, stage in enumerate(spec["stages"]):
        where = f"{path}: stage {i + 1} ({stage.get('name', '?')})"
        kind = stage.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind {kind!r}; valid: {', '.join(KINDS)}")
        pub = stage.get("published") or {}
        published = (None if pub.get("accelerator_hours") is None
                     else float(parse_count(pub["accelerator_hours"], where)))
        if kind == "published":
            if published is None:
                raise ValueError(f"{where}: kind published needs published.accelerator_hours")
            results.append(StageResult(stage["name"], kind, dict.fromkeys(CASES, published),
                                       int(stage.get("count", 1)), published,
                                       pub.get("source", ""), pub.get("group"),
                                       ["not modelled: taken at its published figure"]))
            continue
        cfg = get_preset(stage["model"])
        n = int(stage["count"])
        planned = not any(k in (stage.get("layout") or {}) for k in ("tp", "pp", "dp", "ep"))
        factors = load_factors(d, fitted.stack_for(planned, acc))
        precision = precision_of(stage.get("precision", "bf16")).catalog
        hours, notes = {}, []
        for case in CASES:
            if kind == "pretrain":
                T = int(stage.get("seq_len", cfg.seq_len))
                cfg_t = cfg.replace(seq_len=max(cfg.seq_len, T))
                tokens = _value(stage["tokens"], case, where)
                given = dict(stage["layout"])
                given["global_batch_tokens"] = float(parse_count(given["global_batch_tokens"], where))
                e = estimate_run(cfg_t, T, tokens, acc, n, precision, factors, d, given=given,
                                 recompute=stage.get("recompute", "none"), published=True)
                seconds = e.compute_seconds(case)
            else:
                step_s, case_notes = _rl_seconds(stage, cfg, acc, n, precision, factors, case, where)
                seconds = _value(stage["steps"], case, where) * step_s
                notes = case_notes if case == "central" else notes
            hours[case] = n * seconds / SECONDS_PER_HOUR / fitted.basis[basis].at(case)
        results.append(StageResult(stage["name"], kind, hours, n, published,
                                   pub.get("source", ""), pub.get("group"), notes))
    return spec, results


def groups(results: list[StageResult]) -> list[tuple[str, list[StageResult], float | None]]:
    """Stages merged where they share a published figure: (label, stages, published hours)."""
    out: list[tuple[str, list[StageResult], float | None]] = []
    seen: dict[str, int] = {}
    for r in results:
        if r.group and r.group in seen:
            out[seen[r.group]][1].append(r)
            continue
        if r.group:
            seen[r.group] = len(out)
        out.append((r.group or r.name, [r], r.published_hours))
    return out


def stages_file(name: str) -> Path | None:
    """configs/estimate/NAME.yaml when it is a stages file (has `stages:`), else None."""
    path = STAGES_DIR / f"{name}.yaml"
    if path.is_file() and "stages" in (yaml.safe_load(path.read_text()) or {}):
        return path
    return None


def stages_markdown(spec: dict, results: list[StageResult]) -> str:
    """The stage table: predicted accelerator-hours (best-worst), days, the published figure
    and the error, dollars at the file's price; then the total and what it includes."""
    from estimate.report import md_table
    from estimate.units import human

    price = float(spec.get("price_per_hour") or 0)
    rows, totals, published_total, covered = [], dict.fromkeys(CASES, 0.0), 0.0, []
    def hours(h: dict) -> str:
        return f"{human(h['central'])} ({human(h['best'])}–{human(h['worst'])})"

    for label, rs, pub in groups(results):
        h = {c: sum(r.hours[c] for r in rs) for c in CASES}
        for c in CASES:
            totals[c] += h[c]
        kinds = {r.kind for r in rs}
        if len(rs) > 1:  # each stage, then the group beside its one published figure
            for r in rs:
                rows.append([r.name, f"{r.count}", hours(r.hours), f"{r.days:.3g}",
                             f"(in {label})", "", f"${human(r.hours['central'] * price)}"
                             if price else "n/a"])
            label = f"*{label}*"
        days = max(r.days for r in rs) if kinds != {"published"} else None
        err = "n/a" if pub is None or kinds == {"published"} else f"{math.log(h['central'] / pub):+.2f}"
        if pub is not None:
            published_total += pub
            covered.append(label.strip("*"))
        rows.append([label, f"{rs[0].count}", hours(h) if kinds != {"published"}
                     else f"{human(h['central'])} (taken as published)",
                     "n/a" if days is None or len(rs) > 1 else f"{days:.3g}",
                     "n/a" if pub is None else human(pub), err,
                     f"${human(h['central'] * price)}" if price else "n/a"])
    rows.append(["**total**", "", f"**{human(totals['central'])}** ({human(totals['best'])}–"
                 f"{human(totals['worst'])})", "", f"**{human(published_total)}**",
                 f"{math.log(totals['central'] / published_total):+.2f}" if published_total else "n/a",
                 f"**${human(totals['central'] * price)}**" if price else "n/a"])
    lines = [f"# {spec.get('question') or spec['name']}", "",
             md_table(["stage", "accelerators", "predicted accelerator-hours (best–worst)",
                       "days (central)", "published", "ln error", "cost (central)"], rows), "",
             f"The total covers every stage above ({', '.join(covered)}): "
             "it is not pre-training alone.",
             f"Cost at ${price:g} per {spec['accelerator']}-hour ({spec.get('price_source', 'given')})."
             if price else "", "", "## Stages, inputs and sources", ""]
    for r, stage in zip(results, spec["stages"], strict=True):
        source = stage.get("source", "").rstrip(".")
        lines.append(f"- **{r.name}**: {source + '. ' if source else ''}Published: "
                     f"{r.published_source.rstrip('.')}.")
        lines += [f"  - {n}" for n in r.notes]
        for key, value in stage.items():
            if isinstance(value, dict) and "assumed" in value:
                a = value["assumed"]
                lines.append(f"  - assumed {key}: {a['central']} ({a['low']}–{a['high']}): {a['why']}")
    return "\n".join(lines) + "\n"
