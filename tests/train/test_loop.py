"""The loop's step without host waits (issue 13 item 2), against the step it replaced.

`reference_train_step` is the loop's step before the change, kept here verbatim (it read loss,
grad norm and the non-finite flag on the host every step). The new step must give bit-identical
losses, grad norms, skip flags and weights (tolerance: none, torch.equal / ==).
"""

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.utils import ROOT
from train.clock import PhaseTimer, StepTimes
from train.config import load_config
from train.data import BatchLoader, DeviceBatches
from train.distributed import build_accelerator, global_sum
from train.loop import train_step
from train.metrics import MetricsLog, RunInfo, StepResult, resolve_steps, step_line
from train.optim import set_lr, skip_update
from train.techniques import build_model


def reference_train_step(model, optimizer, batches, accelerator, timer, grad_clip, poison=False):
    """train.loop.train_step as it was before issue 13 (host reads every step)."""
    device, world = accelerator.device, accelerator.num_processes
    step_tokens = global_sum(sum(y.numel() for _, y in batches), accelerator)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            _, loss = model(x.to(device), y.to(device))
            if poison:
                loss = loss * float("nan")
            accelerator.backward(loss * world / step_tokens)
        loss_sum += loss.detach()
    timer.lap("fwd_bwd_s")
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    train_loss = global_sum(loss_sum, accelerator) / step_tokens
    fp16 = accelerator.scaler is not None
    finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
    if finite or fp16:
        optimizer.step()
    skipped = not finite or accelerator.optimizer_step_was_skipped
    optimizer.zero_grad(set_to_none=True)
    timer.lap("optim_s")
    bad = not math.isfinite(train_loss) or (not finite and not fp16)
    return StepResult(train_loss, grad_norm, step_tokens, skipped, bad)


class NoHostReads:
    """Makes every host read of a tensor's value an error (what a step must not do)."""

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in ("item", "tolist", "__bool__",
                                                           "__float__", "__int__")}

        def refuse(*args, **kwargs):
            raise AssertionError("a host read of a tensor's value inside the step")

        for name in self.saved:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def setup(overrides):
    cfg = load_config(ROOT / "configs/train/tiny.yaml", ["data_dir=unused", "model.vocab_size=96", *overrides])
    accelerator = build_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    model, optimizer = build_model(cfg, accelerator)
    return cfg, accelerator, model, optimizer


@pytest.mark.parametrize("fused", [True, False])
def test_step_is_bit_identical_to_the_reference_with_a_nan_step(fused):
    """Six steps of two micro-batches, step 3 poisoned: the same losses, grad norms, flags,
    weights and optimizer state as the old step (exactly); the fused step reads nothing."""
    overrides = [f"optim.fused={str(fused).lower()}", "optim.grad_clip=0.5"]
    cfg, accelerator, new_model, new_opt = setup(overrides)
    _, _, old_model, old_opt = setup(overrides)
    for a, b in zip(new_model.parameters(), old_model.parameters(), strict=True):
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(1)
    vocab, seq = cfg.model.vocab_size, cfg.model.seq_len
    timer = PhaseTimer(torch.device("cpu"))
    new, old = [], []
    for step in range(1, 7):
        batches = []
        for _ in range(2):
            w = torch.randint(0, vocab, (cfg.micro_batch_size, seq + 1), generator=gen)
            batches.append((w[:, :-1], w[:, 1:]))
        for group in (*new_opt.param_groups, *old_opt.param_groups):
            group["lr"] = 1e-3 * step
        timer.start()
        with NoHostReads() if fused else contextlib.nullcontext():
            result = train_step(new_model, new_opt, batches, accelerator, timer,
                                cfg.optim.grad_clip, poison=step == 3)
        assert isinstance(result.loss, torch.Tensor)  # still on the device
        new.append(result)
        old.append(reference_train_step(old_model, old_opt, batches, accelerator, timer,
                                        cfg.optim.grad_clip, poison=step == 3))
    new = resolve_steps(new)
    for step, (n, o) in enumerate(zip(new, old, strict=True), start=1):
        assert (n.skipped, n.bad) == (o.skipped, o.bad) == ((True, True) if step == 3
                                                            else (False, False))
        assert n.tokens == o.tokens
        if step != 3:
            assert n.loss == o.loss and n.grad_norm == o.grad_norm, step
        else:
            assert math.isnan(n.loss) and math.isnan(o.loss)
    for a, b in zip(new_model.parameters(), old_model.parameters(), strict=True):
        assert torch.equal(a, b)
    new_state, old_state = new_opt.state_dict()["state"], old_opt.state_dict()["state"]
    assert new_state.keys() == old_state.keys()
    for key, slots in new_state.items():
        for name, value in slots.items():
            assert torch.equal(value, old_state[key][name]), (key, name)


def test_skip_update_leaves_weights_moments_and_step_count():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(4)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((4,), float("nan"))
    with NoHostReads():
        skip_update(opt, torch.tensor(True))
    assert torch.equal(p.detach(), before[0]) and not hasattr(opt, "found_inf")
    for k, v in opt.state[p].items():
        assert torch.equal(v, before[1][k]), k
    p.grad = torch.ones(4)
    skip_update(opt, torch.tensor(False))
    assert not torch.equal(p.detach(), before[0]) and float(opt.state[p]["step"]) == 2


@pytest.mark.slow  # about 25 s on 2 shared cores: inductor compiles the AdamW step on CPU
def test_compiled_optimizer_gives_the_eager_weights_through_a_nan_step():
    """compile_optimizer=true against the same (foreach) AdamW in eager, six steps of the
    loop's step with a schedule that changes the learning rate every step and a poisoned step
    3: the same skips, and weights and moments within rtol 1e-5, atol 1e-6 (inductor reorders
    the float arithmetic); compiled once, not once per learning rate."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = ["optim.fused=false", "optim.grad_clip=0.5"]
    cfg, accelerator, model, opt = setup([*base, "compile_optimizer=true"])
    _, _, eager_model, eager_opt = setup(base)
    assert opt.optimizer.param_groups[0]["foreach"] and torch.is_tensor(opt.param_groups[0]["lr"])
    gen = torch.Generator().manual_seed(1)
    timer = PhaseTimer(torch.device("cpu"))
    graphs = []
    for step in range(1, 7):
        batches = []
        for _ in range(2):
            shape = (cfg.micro_batch_size, cfg.model.seq_len + 1)
            w = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
            batches.append((w[:, :-1], w[:, 1:]))
        results = []
        for m, o in ((model, opt), (eager_model, eager_opt)):
            set_lr(o, 1e-3 * step)
            timer.start()
            results.append(train_step(m, o, batches, accelerator, timer, cfg.optim.grad_clip,
                                      poison=step == 3))
        new, old = resolve_steps(results[:1])[0], resolve_steps(results[1:])[0]
        assert new.skipped == old.skipped == (step == 3)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0]  # no recompilation for a new lr
    for a, b in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    state, eager_state = opt.state_dict()["state"], eager_opt.state_dict()["state"]
    for key, slots in eager_state.items():
        for name, value in slots.items():
            torch.testing.assert_close(state[key][name].cpu().to(value.dtype), value,
                                       rtol=1e-5, atol=1e-6)


def test_resolve_steps_reads_device_figures_and_keeps_plain_ones():
    steps = [StepResult(torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.75), 8.0,
                        torch.tensor(False), torch.tensor(False)),
             StepResult(1.0, 2.0, 8.0, True, torch.tensor(True))]
    first, second = resolve_steps(steps)
    assert (first.loss, first.grad_norm, first.skipped, first.bad) == (2.5, 0.75, False, False)
    assert (second.loss, second.skipped, second.bad) == (1.0, True, True)
    assert type(first.skipped) is bool and type(first.loss) is float
    assert isinstance(steps[0].loss, torch.Tensor)  # the inputs are left as they were


class FakeEvent:
    """A CUDA event stand-in: stamped by a fake device clock on record()."""

    clock = 0.0
    synchronized = 0

    def record(self):
        self.at = FakeEvent.clock

    def synchronize(self):
        FakeEvent.synchronized += 1

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3  # milliseconds, as CUDA's


def test_phase_timer_on_gpu_records_events_and_reads_them_later():
    timer = PhaseTimer(torch.device("cpu"), event=FakeEvent)
    FakeEvent.clock, FakeEvent.synchronized = 10.0, 0
    timer.start()
    FakeEvent.clock = 10.5
    timer.lap("data_wait_s")
    FakeEvent.clock = 12.5
    timer.lap("fwd_bwd_s")
    FakeEvent.clock = 13.0
    timer.lap("optim_s")
    times = timer.snapshot()
    timer.start()  # the next step may begin before the last one is read
    assert FakeEvent.synchronized == 0
    times.resolve()
    assert FakeEvent.synchronized == 1
    assert times.phases == pytest.approx({"data_wait_s": 0.5, "fwd_bwd_s": 2.0, "optim_s": 0.5})
    assert times.total() == pytest.approx(3.0)


def test_phase_timer_on_cpu_uses_the_wall_clock():
    timer = PhaseTimer(torch.device("cpu"))
    timer.start()
    timer.lap("data_wait_s")
    timer.lap("fwd_bwd_s")
    times = timer.snapshot().resolve()
    assert set(times.phases) == {"data_wait_s", "fwd_bwd_s"}
    assert times.total() == pytest.approx(sum(times.phases.values()))
    assert timer.wall() >= 0 and StepTimes([]).resolve().total() == 0.0


class Windows:
    """A split of n windows of seq_len + 1 tokens; window i holds i, i+1, ..."""

    def __init__(self, n, seq_len):
        self.n, self.seq_len = n, seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.arange(i, i + self.seq_len + 1, dtype=np.int64)


class FakeStreams:
    """The side-stream calls of DeviceBatches on GPU, recorded on CPU."""

    def __init__(self):
        self.handed = 0

    def side(self):
        return contextlib.nullcontext()

    def hand_over(self, *tensors):
        assert len(tensors) == 2 and all(t.is_contiguous() for t in tensors)
        self.handed += 1


def test_device_batches_ahead_give_the_loader_batches_and_resume_exactly():
    plain = BatchLoader(Windows(20, 6), 3, 0, 1, seed=4)
    streams = FakeStreams()
    ahead = DeviceBatches(BatchLoader(Windows(20, 6), 3, 0, 1, seed=4), torch.device("cpu"),
                          streams)
    for _ in range(9):  # past an epoch's end (6 micro-batches of 3 of 20 windows)
        state = plain.state_dict()
        assert ahead.state_dict() == state  # the position of the next batch, not the one ahead
        x, y = plain.next()
        ax, ay = ahead.next()
        assert torch.equal(x, ax) and torch.equal(y, ay)
    assert streams.handed == 9
    resumed = DeviceBatches(BatchLoader(Windows(20, 6), 3, 0, 1, seed=4), torch.device("cpu"),
                            FakeStreams())
    resumed.load_state_dict(ahead.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.next(), plain.next(), strict=True))


def test_device_batches_on_cpu_pass_the_loader_through():
    loader = BatchLoader(Windows(20, 6), 3, 0, 1, seed=4)
    batches = DeviceBatches(loader, torch.device("cpu"))
    assert batches.streams is None
    batches.next()
    assert batches.state_dict() == loader.state_dict() == {"epoch": 0, "cursor": 3}


class OnePeak:
    device = torch.device("cpu")
    source = "test"

    def median(self):
        return 1e12


def test_eta_leaves_out_the_warm_up_steps(tmp_path):
    """Step 1 pays for compilation: its time must not become the ETA."""
    info = RunInfo(steps=10, world_size=1, device="cpu", params=1, seq_len=8,
                   model_flops_per_token=1.0, hardware_flops_per_token=1.0, techniques={"compile": False},
                   threads_per_process=1, warmup_steps_excluded=2)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", True, info, OnePeak())
    etas = []
    for step, step_s in enumerate([600.0, 3.0, 1.0, 2.0, 1.0], start=1):
        timer = SimpleNamespace(total=lambda s=step_s: s,
                                phases={"data_wait_s": 0.0, "fwd_bwd_s": step_s, "optim_s": 0.0})
        record = metrics.step_record(step, 1e-3, StepResult(1.0, 1.0, 8.0, False, False),
                                     8 * step, timer)
        metrics.write(record)
        etas.append(record["eta_s"])
    assert etas == [None, None, 1.0 * 7, 1.5 * 6, 1.0 * 5]  # medians of 1; 1, 2; 1, 2, 1
    assert "ETA after warm-up" in step_line(metrics.records[0], 10)
    assert "ETA 5 s" in step_line(metrics.records[-1], 10)
    again = MetricsLog(tmp_path / "metrics.jsonl", True, info, OnePeak())
    again.resume(4)  # a resumed run's ETA starts from the steps it keeps
    assert again.steady_step_s == [1.0, 2.0]
