"""A pipeline rank's part of a Transformer, built without a whole fp32 copy of the model, and
initialised exactly as one process initialises it.

One process builds `Transformer(cfg)` from the seed: every module's constructor draws its
default init from torch's CPU generator, then `init_weights` draws again, module after
module, so a parameter's value depends on every draw before it. `build_part` builds the
model on the meta device (no memory) while `_Draws` runs each in-place initialisation a meta
parameter receives on a scratch tensor of its shape, freed at once: the generator moves
exactly as in a whole build, and the generator's state before each of those calls is kept.
Then only the parameters this rank keeps are made real, each by running its own calls again
from the kept states. Their values are the whole build's bit for bit, the generator ends
where a whole build leaves it, and the peak is this rank's weights plus the largest single
tensor (the embedding), not the whole model.

A parameter that gets no in-place initialisation, or one whose initialisation reads another
meta tensor, cannot be rebuilt this way: refused, naming it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from model.config import ModelConfig
from model.transformer import Transformer, rope_tables


class _Draws(TorchFunctionMode):
    """Record every in-place call (`normal_`, `uniform_`, `kaiming_uniform_`, `ones_`, ...) on
    a meta tensor, with the CPU generator's state before it, and run it on a scratch tensor."""

    def __init__(self) -> None:
        super().__init__()
        # (meta tensor, the call with that tensor as an argument, generator state before it)
        self.calls: list[tuple[torch.Tensor, Callable[[torch.Tensor], object], torch.Tensor]] = []
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # the tensor a call changes: `t.normal_(...)`'s self, `nn.init.normal_(tensor=t)`'s
        target = args[0] if args else kwargs.get("tensor")
        if not (isinstance(target, torch.Tensor) and target.is_meta and name.endswith("_")
                and not name.startswith("__")):
            return func(*args, **kwargs)
        rest = [a for a in (*args, *kwargs.values()) if a is not target]
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in rest):
            raise ValueError(f"cannot build pipeline stages on the meta device: {name} reads "
                             "another meta tensor; build the model whole")

        def call(tensor: torch.Tensor):
            if args:
                return func(tensor, *args[1:], **kwargs)
            return func(**{**kwargs, "tensor": tensor})

        state = torch.get_rng_state()
        call(self._scratch(target))
        self.calls.append((target, call, state))
        return target

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor shaped like `like`, a view of one buffer kept for all the
        calls (grown to the largest), so that the allocator holds one tensor's worth at a time
        (fresh tensors, freed one by one, left freed heap the process kept)."""
        n, buffer = like.numel(), self.buffers.get(like.dtype)
        if buffer is None or buffer.numel() < n:
            self.buffers.pop(like.dtype, None)  # freed before the larger one is taken
            self.buffers[like.dtype] = buffer = torch.empty(n, dtype=like.dtype, device="cpu")
        return buffer[:n].view(like.shape)


def build_part(cfg: ModelConfig, cut: Callable[[Transformer], Transformer]) -> Transformer:
    """`cut(Transformer(cfg))`, the model built on the meta device and cut down by `cut` (to a
    rank's stages: `pipeline.keep_stages`), its remaining parameters then made real (CPU) and
    bit for bit those of a whole build from the same generator state, which it leaves where a
    whole build does. The RoPE tables are computed whole (small, derived)."""
    with torch.device("meta"), _Draws() as draws:
        whole = Transformer(cfg)
    draws.buffers.clear()
    end = torch.get_rng_state()
    model = cut(whole)
    by_target: dict[int, list] = {}
    for target, call, state in draws.calls:
        by_target.setdefault(id(target), []).append((call, state))
    real: dict[int, nn.Parameter] = {}  # meta Parameter -> its real one (a tied matrix: one)
    for name, p in model.named_parameters():
        calls = by_target.get(id(p))
        if not calls:
            raise ValueError(f"cannot build pipeline stages on the meta device: {name} is not "
                             "initialised in place; build the model whole")
        tensor = torch.empty(p.shape, dtype=p.dtype, device="cpu")
        with torch.no_grad():
            for call, state in calls:
                torch.set_rng_state(state)
                call(tensor)
        real[id(p)] = nn.Parameter(tensor, requires_grad=p.requires_grad)
    torch.set_rng_state(end)
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) in real:
                module._parameters[key] = real[id(p)]
    model.rope_cos, model.rope_sin = rope_tables(cfg.rope_dim, cfg.seq_len, cfg.rope_theta)
    return model


def _peak_rss(preset: str, schedule: str, pp: int, rank: int, meta: bool, queue) -> None:
    """In a fresh process: peak RSS (bytes, `ru_maxrss`) before and after building pipeline
    rank `rank`'s stages, whole then cut (`meta=False`, the trainer's old way) or on meta."""
    import resource

    from model.config import preset_fields
    from train.parallel.pipeline import keep_stages

    cfg = ModelConfig(**{"vocab_size": 32000, **preset_fields(preset)})  # the preset's, if set
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    if meta:
        model = build_part(cfg, lambda m: keep_stages(m, schedule, pp, rank))
    else:
        model = keep_stages(Transformer(cfg), schedule, pp, rank)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    queue.put((before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, held))


def main(argv: list[str] | None = None) -> None:
    """Print each pipeline rank's peak RSS while its stages are built, whole then cut against
    on the meta device, each build in a fresh process."""
    import argparse
    import multiprocessing as mp

    parser = argparse.ArgumentParser(prog="python -m train.parallel.meta_build", description=main.__doc__)
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--pp", type=int, default=2)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    print(f"{args.preset}, pp={args.pp} {args.schedule} (even split), fp32, peak RSS of one "
          "process building one rank's stages (MiB; 'import' = before building)")
    print(f"{'rank':>4} {'build':>7} {'import':>7} {'peak':>7} {'peak-import':>11} {'weights held':>12}")
    mib = 1 << 20
    for rank in range(args.pp):
        for meta in (False, True):
            queue = ctx.Queue()
            proc = ctx.Process(target=_peak_rss, args=(args.preset, args.schedule, args.pp, rank,
                                                       meta, queue))
            proc.start()
            before, peak, held = queue.get()
            proc.join()
            print(f"{rank:>4} {'meta' if meta else 'whole':>7} {before / mib:>7.0f} {peak / mib:>7.0f} "
                  f"{(peak - before) / mib:>11.0f} {held / mib:>12.0f}")


if __name__ == "__main__":
    main()
