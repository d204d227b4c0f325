"""`python -m train.bench`: tokens/s and MFU of a training step, beside transformers' Llama.

Three measurements of one model shape (a preset at `--batch` x `--seq-len` tokens):
- **tokenclock, bare step**: forward + backward + optimizer step of `model.transformer` on a
  fixed batch of random tokens, fused AdamW where torch has it, bf16 autocast or fp32;
- **transformers Llama, bare step**: the same on `LlamaForCausalLM` built from
  `model.hf.llama_config` of the same shape (the peer anyone can pip install). Both compute the
  loss the same way, `F.cross_entropy` over float32 logits of the same targets;
- **tokenclock, real loop** (with `--data DIR`): `python -m train` on that prepared dataset
  (`contracts.run.launch_training`), evaluation only after the last step so no timed step
  pays for it; tokens/s is the summary's median over the steps after warm-up.

The bare steps are timed in windows of `--steps` steps after `--warmup` untimed ones (compile,
lazy optimizer state), synchronising the GPU only at the window's ends; the candidates take
turns, A, B (, C), A, B (, C), ... for `--repeats` rounds, so a drift of the machine (clocks,
neighbours) falls on all of them, and the table gives medians over rounds. Same shape, same
FLOPs: MFU is tokens/s x `model.flops.model_flops_per_token` over one peak for all three (the
catalog figure on a GPU, the machine peak of `train.clock` on a CPU).

Writes OUT/bench.json and OUT/bench.md (headed by `contracts.measured.header`), and with
`--publish` docs/measured/bench-DATE.md. `--ceiling-only` measures the bf16 matmul ceiling
(median FLOP/s of n^3 matmuls) and writes OUT/ceiling.json instead. A benchmark prints
figures; no test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from contracts.measured import DOCS, header
from contracts.measured import publish as publish_table
from model.config import ModelConfig, get_preset, preset_fields
from model.flops import model_flops_per_token
from model.precision import precision

PRESETS = ("gpt2-124m", "llama-1b", "tiny", "small")
DEFAULT_VOCAB = 4096  # for presets without a vocabulary (tiny, small): the demo data's
OURS, HF, LOOP = "tokenclock bare step", "transformers Llama bare step", "tokenclock real loop"
NANOGPT = "nanoGPT bare step"
TITLE = "Training step benchmark: tokenclock vs transformers Llama"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "demo.yaml"


@dataclass(frozen=True)
class Setup:
    """What is measured: the model shape, the batch, the precision and the device."""

    preset: str
    batch: int
    seq_len: int
    vocab_size: int
    steps: int
    warmup: int
    repeats: int
    compile: bool
    precision: str  # fp32 | bf16
    device: str
    overrides: tuple = ()  # (field, value) pairs applied to the preset (`--model n_layer=12`)
    nanogpt: str | None = None  # path of nanoGPT's model.py: also time and count nanoGPT's GPT

    def model(self) -> ModelConfig:
        return get_preset(self.preset, **{"vocab_size": self.vocab_size, **dict(self.overrides),
                          "seq_len": max(self.seq_len, preset_fields(self.preset)["seq_len"])})

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


# --- the two models ----------------------------------------------------------------------------

def build_ours(cfg: ModelConfig, device: torch.device):
    """tokenclock's Transformer and its loss per token (mean cross-entropy)."""
    from model.transformer import Transformer

    with device:
        model = Transformer(cfg)

    def loss(x, y):
        _, loss_sum = model(x, y)
        return loss_sum / y.numel()

    return model, loss


def build_hf(cfg: ModelConfig, device: torch.device):
    """transformers' LlamaForCausalLM of the same shape (`model.hf.llama_config`), SDPA attention,
    and the same loss: cross-entropy over its float32 logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.hf import llama_config

    config = LlamaConfig(**llama_config(cfg, eos_id=0))
    config._attn_implementation = "sdpa"
    config.use_cache = False
    with device:
        model = LlamaForCausalLM(config)

    def loss(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    return model, loss


def build_nanogpt(path: str):
    """nanoGPT's `GPT` (karpathy/nanoGPT model.py, loaded at run time from the file the user
    gives; nothing of it is copied here) of the same depth, width, heads and vocabulary, no
    biases, no dropout, and its own loss (cross-entropy over its float32 logits). Its MLP is
    GPT-2's 4d GELU and its norms LayerNorm: the peer is the same size, not the same model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    if spec is None or not Path(path).is_file():
        raise ValueError(f"--nanogpt {path}: no such file (nanoGPT's model.py)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def build(cfg: ModelConfig, device: torch.device):
        config = module.GPTConfig(block_size=cfg.seq_len, vocab_size=cfg.vocab_size,
                                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model,
                                  dropout=0.0, bias=False)
        with device:
            model = module.GPT(config)

        def loss(x, y):
            return model(x, y)[1]

        return model, loss

    return build


def peers(setup: Setup) -> list[tuple[str, Callable]]:
    """(name, build) of every model the bench times and counts: tokenclock first."""
    out = [(OURS, build_ours), (HF, build_hf)]
    if setup.nanogpt:
        out.append((NANOGPT, build_nanogpt(setup.nanogpt)))
    return out


def adamw(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """AdamW as training builds it (decay on matrices only), fused where torch has the kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True), "foreach"


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights, gradients and optimizer state (what lives across steps)."""
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


class BareStep:
    """One model's training step on a fixed random batch, timed in windows of steps."""

    def __init__(self, name: str, build: Callable, setup: Setup):
        self.name, self.setup = name, setup
        self.device = torch.device(setup.device)
        self.model, self.loss = build(setup.model(), self.device)
        if setup.compile:
            self.model.compile()  # in place, as train.techniques does
        self.optimizer, self.kernel = adamw(self.model)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, setup.vocab_size, (setup.batch, setup.seq_len + 1), generator=g)
        # contiguous: nanoGPT's loss views the targets
        self.x = tokens[:, :-1].contiguous().to(self.device)
        self.y = tokens[:, 1:].contiguous().to(self.device)
        self.dtype = getattr(torch, precision(setup.precision).torch_dtype)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def autocast(self) -> dict:
        return {"device_type": self.device.type, "dtype": self.dtype,
                "enabled": self.dtype != torch.float32}

    def step(self) -> None:
        with torch.autocast(**self.autocast()):
            loss = self.loss(self.x, self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def warm_up(self) -> float:
        """The untimed first steps (compilation, optimizer state); returns their seconds."""
        start = time.perf_counter()
        for _ in range(self.setup.warmup):
            self.step()
        self.sync()
        return time.perf_counter() - start

    def window(self) -> dict:
        """`steps` steps timed together: tokens/s, and on a GPU the peak memory of a step."""
        cuda = self.device.type == "cuda"
        if cuda:
            self.sync()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        start = time.perf_counter()
        for _ in range(self.setup.steps):
            self.step()
        self.sync()
        seconds = time.perf_counter() - start
        out = {"tokens_per_s": self.setup.tokens_per_step * self.setup.steps / seconds,
               "step_s": seconds / self.setup.steps}
        if cuda:
            step_peak = torch.cuda.max_memory_allocated(self.device) - before
            out["peak_mem_bytes"] = state_bytes(self.model, self.optimizer) + step_peak
        return out

    def release(self) -> None:
        del self.model, self.optimizer, self.loss
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --- the real loop -----------------------------------------------------------------------------

def loop_overrides(setup: Setup, data: Path) -> list[str]:
    """`python -m train` settings for the same shape: warm-up steps left out of the summary, one
    evaluation after the last timed step, nothing written but the run's own files."""
    total = setup.warmup + setup.steps
    return [f"data_dir={data}", f"model.preset={setup.preset}",
            f"model.vocab_size={setup.vocab_size}", f"model.seq_len={setup.model().seq_len}",
            f"seq_len={setup.seq_len}", f"batch_size={setup.batch}",
            f"micro_batch_size={setup.batch}", f"steps={total}",
            f"warmup_steps_excluded={setup.warmup}", f"eval_every={total}", "eval_batches=1",
            f"log_every={total}", f"mixed_precision={precision(setup.precision).switch}",
            f"compile={str(setup.compile).lower()}", "tracker=none", "checkpoint_every=0",
            "sample_tokens=8", "peak_samples=1"]


def launch_loop(setup: Setup, data: Path, run_dir: Path) -> dict:
    """One real training run; its summary's tokens/s and MFU."""
    from contracts.run import launch_training

    env = {"CUDA_VISIBLE_DEVICES": ""} if setup.device == "cpu" else {}
    summary = launch_training(CONFIG, loop_overrides(setup, data), run_dir, env=env)
    return {"tokens_per_s": summary.tokens_per_s_median,
            "step_s": float(summary.step_s["median"]),
            "mfu_from_summary": summary.mfu_median,
            "peak_source_of_summary": summary.peak_source,
            "peak_mem_bytes": summary.peak_mem_bytes or None}


# --- the peak and the ceiling ------------------------------------------------------------------

def machine_peak(device: str, precision_name: str) -> tuple[float, str]:
    """The peak every MFU here divides by: the catalog figure of the GPU (measured when it is
    not in the catalog), or the CPU machine peak (`train.clock`)."""
    from train.clock import PeakSampler

    sampler = PeakSampler(torch.device(device), precision(precision_name), world=1,
                          processes_on_host=1)
    m = sampler.machine
    other = m.measured if m.method == "theoretical" else m.theoretical
    if m.method != "catalog" and other:  # the figure not used, beside the one used
        name = "measured" if m.method == "theoretical" else "theoretical"
        return sampler.median(), (f"{m.method}: {sampler.source}; not used, the {name} "
                                  f"{other['flops'] / 1e12:.4g} TFLOP/s ({other['source']})")
    return sampler.median(), sampler.source


def ceiling(device: str, n: int, dtype: str = "bf16", seconds: float = 2.0) -> dict:
    """The matmul ceiling: median FLOP/s of n x n x n matmuls repeated for `seconds`."""
    from train.clock import matmul_rates

    torch_dtype = getattr(torch, precision(dtype).torch_dtype)
    rates = matmul_rates(torch_dtype, device, n=n, seconds=seconds)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"device": name, "n": n, "dtype": precision(dtype).catalog, "calls": len(rates),
            "flops_median": statistics.median(rates), "flops_max": max(rates),
            "torch": torch.__version__}


# --- the rounds --------------------------------------------------------------------------------

def run_bench(setup: Setup, data: Path | None = None, out: Path = Path("runs/bench"),
              peak: tuple[float, str] | None = None, log=print) -> dict:
    """Warm up both bare steps, then `repeats` rounds of A, B (and C, the real loop); medians."""
    flops_token = model_flops_per_token(setup.model(), setup.seq_len)
    peak_flops, peak_source = peak or machine_peak(setup.device, setup.precision)
    steps = [BareStep(name, build, setup) for name, build in peers(setup)]
    warmup_s = {s.name: s.warm_up() for s in steps}
    names = [s.name for s in steps] + ([LOOP] if data is not None else [])
    samples: dict[str, list[dict]] = {n: [] for n in names}
    order = []
    for r in range(setup.repeats):
        for name in names:
            if name == LOOP:
                result = launch_loop(setup, data, out.resolve() / "runs" / f"loop-{r}")
            else:
                result = next(s for s in steps if s.name == name).window()
            samples[name].append(result)
            order.append([r, name])
            log(f"[round {r + 1}/{setup.repeats}] {name}: {result['tokens_per_s']:,.0f} tokens/s")
    rows = []
    for s in steps:
        rows.append(row(s.name, samples[s.name], flops_token, peak_flops) | {
            "params": s.params, "optimizer": s.kernel, "warmup_s": warmup_s[s.name]})
        s.release()
    if data is not None:
        rows.append(row(LOOP, samples[LOOP], flops_token, peak_flops) | {
            "mfu_from_summary": statistics.median(x["mfu_from_summary"] for x in samples[LOOP]),
            "peak_source_of_summary": samples[LOOP][0]["peak_source_of_summary"]})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_tokenclock_bare"] = r["tokens_per_s"] / base
    if NANOGPT in samples:  # per round, so both sides of each ratio saw the same machine
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(samples[OURS], samples[NANOGPT],
                                                             strict=True)]
        rows[0]["step_vs_nanogpt_median_of_rounds"] = statistics.median(ratios)
    return {"format": 1, "setup": asdict(setup), "device_name": device_label(setup.device),
            "torch": torch.__version__, "transformers": _version("transformers"),
            "model_flops_per_token": flops_token, "peak_flops": peak_flops,
            "peak_source": peak_source, "order": order, "rows": rows}


def row(name: str, results: list[dict], flops_token: float, peak_flops: float) -> dict:
    tok_s = statistics.median(r["tokens_per_s"] for r in results)
    mem = [r["peak_mem_bytes"] for r in results if r.get("peak_mem_bytes")]
    return {"name": name, "tokens_per_s": tok_s,
            "tokens_per_s_samples": [r["tokens_per_s"] for r in results],
            "step_s": statistics.median(r["step_s"] for r in results),
            "mfu": tok_s * flops_token / peak_flops,
            "peak_mem_bytes": max(mem) if mem else None, "repeats": len(results)}


def environment() -> dict:
    """Versions and the GPU, for a measured table's reader."""
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda (torch built with)": torch.version.cuda or "none",
           "cuda available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env |= {"gpu": torch.cuda.get_device_name(),
                "compute capability": ".".join(map(str, torch.cuda.get_device_capability())),
                "gpus visible": torch.cuda.device_count()}
    for name in ("accelerate", "transformers", "torchao", "omegaconf", "safetensors", "tokenizers"):
        env[name] = _version(name)
    return env


def device_label(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def _version(name: str) -> str:
    from contracts.measured import package_version

    return package_version(name)


def markdown(result: dict, command: str) -> str:
    """The table, headed by the date, machine, torch version and command."""
    s = result["setup"]
    lines = [header(TITLE, command, device=result["device_name"]),
             f"`{s['preset']}` dims, batch {s['batch']} x {s['seq_len']} tokens, "
             f"{s['precision']}, {'torch.compile' if s['compile'] else 'eager'}, "
             f"{s['steps']} timed steps after {s['warmup']} warm-up, median of {s['repeats']} "
             f"interleaved rounds; transformers {result['transformers']}. MFU: "
             f"{result['model_flops_per_token'] / 1e6:,.1f} MFLOP/token over "
             f"{result['peak_flops'] / 1e12:,.4g} TFLOP/s ({result['peak_source']}).", "",
             "| what | tokens/s | vs tokenclock bare | MFU | step (ms) | peak memory (GiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        mem = f"{r['peak_mem_bytes'] / 2**30:.1f}" if r.get("peak_mem_bytes") else "—"
        mfu = f"{r['mfu']:.1%}" + (" (above 100%: the peak is wrong)" if r["mfu"] > 1 else "")
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['vs_tokenclock_bare']:.3f}x "
                     f"| {mfu} | {r['step_s'] * 1e3:,.1f} | {mem} |")
    ratio = result["rows"][0].get("step_vs_nanogpt_median_of_rounds")
    if ratio is not None:
        lines += ["", f"tokenclock step / nanoGPT step: {ratio:.3f}x (median of the rounds' "
                  "ratios)"]
    return "\n".join(lines) + "\n"


# --- the dispatched operations -----------------------------------------------------------------

def count_ops(setup: Setup, log=print) -> dict:
    """Dispatched operations per forward, backward and optimizer step of every peer
    (`train.opcount`), counted on the second step (the first builds the optimizer state)."""
    from train.opcount import count_step, summarize

    out = {}
    for name, build in peers(setup):
        bare = BareStep(name, build, setup)
        bare.step()
        out[name] = summarize(count_step(lambda b=bare: b.loss(b.x, b.y), bare.optimizer,
                                         bare.autocast()))
        out[name]["optimizer_kind"] = bare.kernel
        bare.release()
        log(f"counted {name}: {out[name]['fwd_bwd']} ops per forward + backward")
    return out


def ops_markdown(counts: dict, setup: Setup, command: str) -> str:
    """The op table: per phase, vs nanoGPT when it was counted, and the top ops of each model."""
    cfg = setup.model()
    ref = counts.get(NANOGPT, {}).get("fwd_bwd")
    lines = [header("Dispatched operations per training step", command, device=setup.device),
             f"{cfg.n_layer} layers, d {cfg.d_model}, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
             f"batch {setup.batch} x {setup.seq_len}, {setup.precision}"
             f"{' autocast' if setup.precision != 'fp32' else ''} on {setup.device}; aten ops "
             "through a TorchDispatchMode, views and metadata-only ops not counted "
             "(train/opcount.py).", "",
             "| model | forward | backward | fwd + bwd | vs nanoGPT | optimizer step |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, c in counts.items():
        vs = f"{c['fwd_bwd'] / ref:.2f}x" if ref else "—"
        lines.append(f"| {name.removesuffix(' bare step')} | {c['forward']:,} | "
                     f"{c['backward']:,} | {c['fwd_bwd']:,} | {vs} | {c['optimizer']:,} "
                     f"({c['optimizer_kind']}) |")
    lines += ["", "Top ops, forward + backward:", ""]
    for name, c in counts.items():
        top = ", ".join(f"{op} {n}" for op, n in c["top_fwd_bwd"])
        lines.append(f"- {name.removesuffix(' bare step')}: {top}")
    return "\n".join(lines) + "\n"


# --- launch/gpu_check.sh's closing report ---------------------------------------------------

LOOP_STAGES = ("loop-eager", "loop-compiled", "loop-recompute", "loop-fp8", "loop-cudagraphs",
               "loop-compiled-optim")
GPU_TABLE = ("| date | GPU | torch | matmul ceiling bf16 | bench eager: tokenclock / Llama "
             "| bench compiled: tokenclock / Llama | real loop eager | real loop compiled "
             "| recompute | fp8 | CUDA graphs | compiled optimizer |")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def loop_figures(work: Path) -> list[dict]:
    """The summaries of the loop stages' runs (WORK/runs/NAME), as one dict per run."""
    from contracts.run import read_summary

    rows = []
    for stage in LOOP_STAGES:
        run = work / "runs" / stage.removeprefix("loop-")
        try:
            s = read_summary(run)
        except (OSError, ValueError, KeyError):
            continue
        rows.append({"stage": stage, "tokens_per_s": s.tokens_per_s_median, "mfu": s.mfu_median,
                     "step_s": float(s.step_s["median"]), "peak_mem_bytes": s.peak_mem_bytes,
                     "device": s.device, "mixed_precision": s.mixed_precision,
                     "compile": s.raw.get("compile"),
                     "activation_checkpointing": s.raw.get("activation_checkpointing"),
                     "final_train_loss": s.raw.get("final_train_loss"),
                     "peak_source": s.peak_source, "run_dir": str(run)})
    return rows


def write_report(out: Path, work: Path) -> Path:
    """OUT/summary.md (and OUT/loops.jsonl) from the files the stages left in OUT and WORK: the
    stage table, the ceiling, both bench tables, the real loops against the bare step, the
    generation and export tails, and the README's GPU table row filled in."""
    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()
              if line.strip()] if (out / "stages.tsv").is_file() else []
    lines = [header("GPU check (launch/gpu_check.sh)", "launch/gpu_check.sh",
                    device=device_label("cuda") if torch.cuda.is_available() else "cpu"),
             "| stage | status | seconds | timeout (s) | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {' | '.join((st + [''] * 5)[:5])} |" for st in stages]
    ceil = _read_json(out / "ceiling.json")
    if ceil:
        lines += ["", f"Matmul ceiling: {ceil['flops_median'] / 1e12:,.4g} TFLOP/s ({ceil['dtype']}"
                  f" {ceil['n']}^3, median of {ceil['calls']}) on {ceil['device']}."]
    benches = {}
    for mode in ("eager", "compiled"):
        b = _read_json(out / f"bench-{mode}.json")
        if b:
            benches[mode] = b
            table = markdown(b, b.get("command", "python -m train.bench"))
            lines += ["", f"## Bench, {mode}", "", table.split("\n\n", 1)[1].strip()]
    loops = loop_figures(work)
    (out / "loops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in loops))
    if loops:
        lines += ["", "## The real loop (MODE=single launch/gpu.sh)", "",
                  "| stage | tokens/s | MFU | vs bare step | step (ms) | peak memory (GiB) "
                  "| final loss |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in loops:
            bare = benches.get("compiled" if r["compile"] else "eager")
            ratio = (f"{r['tokens_per_s'] / bare['rows'][0]['tokens_per_s']:.3f}x"
                     if bare else "—")
            lines.append(f"| {r['stage']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {ratio} "
                         f"| {r['step_s'] * 1e3:,.1f} | {r['peak_mem_bytes'] / 2**30:.1f} "
                         f"| {r['final_train_loss']} |")
    for name in ("generate", "export"):
        path = work / f"{name}.out"
        if path.is_file():
            tail = path.read_text().strip().splitlines()[-8:]
            lines += ["", f"## {name} (last lines)", "", "```", *tail, "```"]
    lines += ["", "## README GPU table row", "", GPU_TABLE, "|---" * GPU_TABLE.count(" | ") + "|---|",
              gpu_row(ceil, benches, {r["stage"]: r for r in loops})]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def gpu_row(ceil: dict | None, benches: dict, loops: dict) -> str:
    """The README's GPU table row from what was measured ("—" where a stage did not run)."""
    import datetime as dt

    def tok(x):
        return f"{x / 1e3:,.1f}k" if x else "—"

    def pair(mode):
        b = benches.get(mode)
        return f"{tok(b['rows'][0]['tokens_per_s'])} / {tok(b['rows'][1]['tokens_per_s'])}" \
            if b else "—"

    def loop(stage):
        r = loops.get(stage)
        return f"{tok(r['tokens_per_s'])} ({r['mfu']:.1%} MFU)" if r else "—"

    gpu = next((b["device_name"] for b in benches.values()), ceil["device"] if ceil else "—")
    cells = [dt.date.today().isoformat(), gpu, torch.__version__,
             f"{ceil['flops_median'] / 1e12:,.4g} TFLOP/s" if ceil else "—", pair("eager"),
             pair("compiled"), *(loop(s) for s in LOOP_STAGES)]
    return "| " + " | ".join(cells) + " |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-124m", choices=PRESETS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the preset's")
    p.add_argument("--vocab-size", type=int, default=0,
                   help=f"0 = the preset's, else the data's, else {DEFAULT_VOCAB}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per window")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data", type=Path, help="a prepared dataset: also time the real loop")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--publish", action="store_true", help="also write docs/measured/bench-DATE.md")
    p.add_argument("--ceiling-only", action="store_true",
                   help="measure the matmul ceiling only (OUT/ceiling.json)")
    p.add_argument("--ceiling-n", type=int, default=8192)
    p.add_argument("--ceiling-seconds", type=float, default=2.0)
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the preset (repeatable): --model n_layer=12")
    p.add_argument("--nanogpt", metavar="MODEL_PY",
                   help="nanoGPT's model.py (karpathy/nanoGPT): also time and count its GPT")
    p.add_argument("--count-ops", action="store_true",
                   help="count dispatched ops per forward/backward/optimizer step (OUT/ops.json)")
    p.add_argument("--env", action="store_true", help="print the environment (versions, GPU)")
    p.add_argument("--gpu-check-report", type=Path, metavar="WORK",
                   help="write OUT/summary.md from launch/gpu_check.sh's files (OUT, WORK)")
    return p.parse_args(argv)


def setup_from(args: argparse.Namespace) -> Setup:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = preset_fields(args.preset)
    vocab = args.vocab_size or fields.get("vocab_size", 0)
    if not vocab and args.data is not None:
        from contracts.dataset import read_dataset_meta

        vocab = read_dataset_meta(args.data).vocab_size
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    overrides = []
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep or key not in ModelConfig.__dataclass_fields__:
            raise ValueError(f"--model {item!r}: expected FIELD=VALUE with a ModelConfig field")
        overrides.append((key, _number(value)))
    return Setup(preset=args.preset, batch=args.batch, overrides=tuple(overrides),
                 nanogpt=args.nanogpt,
                 seq_len=args.seq_len or fields["seq_len"], vocab_size=vocab or DEFAULT_VOCAB,
                 steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                 compile=args.compile, precision=args.precision, device=device)


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "train.bench", *(sys.argv[1:] if argv is None else argv)])
    if args.env:
        print("\n".join(f"{k}: {v}" for k, v in environment().items()))
        return environment()
    if args.gpu_check_report is not None:
        return {"summary": str(write_report(args.out, args.gpu_check_report))}
    if args.ceiling_only:
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        device = "cpu" if device == "auto" else device
        result = ceiling(device, args.ceiling_n, args.precision, args.ceiling_seconds)
        result |= {"command": command}
        (args.out / "ceiling.json").write_text(json.dumps(result, indent=2))
        print(f"matmul ceiling {result['dtype']} {result['n']}^3 on {result['device']}: "
              f"{result['flops_median'] / 1e12:,.4g} TFLOP/s (median of {result['calls']})")
        return result
    if args.count_ops:
        setup = setup_from(args)
        counts = count_ops(setup)
        table = ops_markdown(counts, setup, command)
        (args.out / "ops.json").write_text(json.dumps({"format": 1, "setup": asdict(setup),
                                                       "command": command, "counts": counts},
                                                      indent=2))
        print("\n" + table + f"\nwrote {args.out / 'ops.json'}")
        return counts
    result = run_bench(setup_from(args), args.data, args.out) | {"command": command}
    table = markdown(result, command)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    (args.out / "bench.md").write_text(table)
    print("\n" + table + f"\nwrote {args.out / 'bench.json'}, {args.out / 'bench.md'}")
    if args.publish:
        print(f"published {publish_table('bench', table, DOCS)}")
    return result


if __name__ == "__main__":
    main()
