"""`python -m estimate calibrate`: measure how training throughput depends on the model and the
techniques on *this* machine, check the projection's assumptions against it, and test the
throughput model on a run it has not seen.

A sweep of short real training runs (`python -m train` for one process, `launch/cpu.sh` for
N, both through `contracts.run.launch_training`; never an import of `train`), described by a
YAML file (`configs/estimate/calibrate.yaml`):

- **fit**: model sizes at a fixed sequence length and tokens per step, fp32, one process;
  `estimate.throughput_fit` fits step time = a + b x FLOPs per step to them;
- **checks** on one reference shape, each a pair of runs that differ in one thing:
  full recomputation, bf16, a longer sequence at the same tokens per step, N processes of one
  thread (and optionally 1 process of N threads);
- **held out**: a larger shape than any in the fit, predicted from the fit, then run.

Every figure comes from `summary.json` step-time medians (the steps after warm-up), not from
MFU, whose CPU peak is itself a noisy measurement. See the README, "Calibrating on your
hardware".

The package: `sweep` (the YAML, the plan, running it), `checks` (the assumption checks),
`report` (text, Markdown, JSON, plots); the fit is `estimate.throughput_fit`. This module is
the command that strings them together.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from contracts.dataset import META, read_dataset_meta
from estimate.calibrate.checks import assumption_checks
from estimate.calibrate.report import Calibration, publish, write_plots
from estimate.calibrate.sweep import (
    DEFAULT_SWEEP,
    QUICK_SWEEP,
    Runner,
    Sweep,
    cpu_info,
    load_sweep,
    plan,
    run_calibration,
)
from estimate.throughput_fit import fit_step_time

__all__ = ["DEFAULT_SWEEP", "QUICK_SWEEP", "calibrate", "load_sweep", "run_cli"]


def _load_avg() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else [float("nan")] * 3


def calibrate(sweep: Sweep, data_dir: str | Path, runs_dir: str | Path,
              log: Callable[[str], None] = print) -> Calibration:
    """Run the sweep, fit, check, predict the held-out run, run it; return everything."""
    data_dir = Path(data_dir).resolve()
    if not (data_dir / META).is_file():
        raise ValueError(
            f"no prepared dataset at {data_dir} (no {META}); prepare one first, e.g.\n"
            f"  {sys.executable} -m data_prep configs/prep/demo.yaml out_dir={data_dir}")
    vocab = read_dataset_meta(data_dir).vocab_size
    machine = cpu_info()
    load_start = _load_avg()
    if load_start[0] > (machine["logical_cores"] or 1):
        log(f"note: load average {load_start[0]:.1f} on {machine['logical_cores']} cores: other "
            "jobs share this machine, timings will be noisy")
    runs, held_spec = plan(sweep)
    started = time.monotonic()
    runner = Runner(sweep, data_dir, Path(runs_dir).resolve(), vocab,
                    total=len(runs) * sweep.repeats + sweep.repeats, log=log)
    for r in range(sweep.repeats):
        for spec in runs if r % 2 == 0 else runs[::-1]:
            runner.run(spec, r)
    fit_runs = [x for x in runner.measured.values() if x.spec.role == "fit"]
    fit = fit_step_time([x.hardware_flops_per_step for x in fit_runs], [x.step_s for x in fit_runs])
    predicted = fit.predict(held_spec.hardware_flops_per_step(sweep, vocab))
    log(f"fit: step_s = {fit.a_s * 1e3:.1f} ms + F / {fit.asymptotic_flops_per_s / 1e9:.1f} GFLOP/s; "
        f"predicting {held_spec.label}: {held_spec.tokens_per_step() / predicted:,.0f} tokens/s "
        f"({predicted * 1e3:,.0f} ms/step), now running it")
    for r in range(sweep.repeats):
        held = runner.run(held_spec, r)
    checks = assumption_checks(runner.measured, sweep, machine)
    order = [s.name for s in runs] + [held_spec.name]
    return Calibration(sweep, machine, [runner.measured[k] for k in order], fit, checks, held,
                       predicted, time.monotonic() - started, (load_start, _load_avg()),
                       runner.reruns)


def run_cli(sweep_path: str | Path, data: str, out: str | None, steps: int | None,
            nproc: int | None, repeats: int | None, publish_table: bool = False,
            command: str | None = None) -> int:
    """The `calibrate` subcommand: run, print, and with `out` write the report files; with
    `publish_table` also docs/measured/calibration-DATE.md."""
    from estimate.report import write_outputs

    sweep = load_sweep(sweep_path, steps=steps, nproc=nproc, repeats=repeats)

    def write(cal: Calibration, out_dir: Path) -> str:
        plots = write_plots(cal, out_dir)
        md, js = write_outputs(out_dir, cal.markdown(plots, command), cal.record())
        return ", ".join(str(p) for p in (md, js, *(out_dir / p for p in plots.values())))

    return run_calibration(lambda runs_dir: calibrate(sweep, data, runs_dir), out, "calibrate-",
                           write, (lambda cal: publish(cal, command)) if publish_table else None)
