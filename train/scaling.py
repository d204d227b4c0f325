"""`python -m train.scaling CONFIG [key=value ...] --nproc N`: data-parallel scaling efficiency.

Three short real runs, each process with `threads_per_process` threads (1 by default: one core
per process, so that N processes use N times the hardware of one):
- 1 process, micro-batch B (the config's micro_batch_size, no accumulation): tokens/s T1;
- N processes, micro-batch B each (fixed per-process batch, "weak scaling"): global batch N·B;
- N processes, micro-batch B/N each (fixed global batch B, "strong scaling").
Scaling efficiency = T_N / (N · T1): 100% when N processes are N times as fast as one. The
loss of efficiency is the gradient all-reduce that backward does not hide, the ranks waiting
for the slowest, and (strong scaling) smaller matmuls that use each core less well.

Runs start through `contracts.run.launch_training` (`launch/cpu.sh` for N processes), on the
CPU. Writes `OUT/scaling.md` (headed by the date, machine, torch version and command:
`contracts.measured.header`) and `OUT/scaling.json`; with `--publish` also
`docs/measured/scaling-DATE.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from contracts.measured import DOCS, header
from contracts.measured import publish as publish_table
from contracts.run import launch_training
from train.config import load_config

TITLE = "Data-parallel scaling"


def run(config: str, overrides: list[str], out: Path, nproc: int, micro: int, batch: int,
        steps: int, threads: int, port: int, extra: tuple[str, ...] = ()) -> dict:
    """One training run on the CPU; its summary's throughput figures."""
    summary = launch_training(
        Path(config).resolve(),
        [*overrides, f"steps={steps}", f"eval_every={steps}", f"micro_batch_size={micro}",
         f"batch_size={batch}", f"threads_per_process={threads}", "eval_batches=2",
         "tracker=none", "sample_tokens=8", "peak_samples=2", "checkpoint_every=0", *extra],
        out.resolve(), nproc=nproc, env={"ACCELERATE_USE_CPU": "1", "MASTER_PORT": str(port)})
    return {"tokens_per_s": summary.tokens_per_s_median,
            "step_s": summary.step_s["median"],
            "grad_allreduce_s": summary.raw["grad_allreduce_s"]["median"]}


def markdown(rows: list[dict], command: str, setup: str) -> str:
    """The table, headed by the date, machine, torch version and command."""
    lines = [header(TITLE, command), setup, "",
             "| case | processes | micro-batch | global batch | tokens/s | speed-up | scaling efficiency "
             "| step (ms) | all-reduce alone (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ar = f"{r['grad_allreduce_s'] * 1e3:.1f}" if r["grad_allreduce_s"] else "—"
        lines.append(f"| {r['case']} | {r['processes']} | {r['micro_batch_size']} | {r['batch_size']} "
                     f"| {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['scaling_efficiency']:.0%} "
                     f"| {r['step_s'] * 1e3:.0f} | {ar} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict], command: str, setup: str, threads: int,
                 publish: Path | None = None) -> str:
    """OUT/scaling.{md,json}, and with `publish` (a directory) PUBLISH/scaling-DATE.md."""
    table = markdown(rows, command, setup)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(table)
    (out / "scaling.json").write_text(json.dumps({"format": 1, "command": command, "rows": rows,
                                                  "threads_per_process": threads}, indent=2))
    print("\n" + table)
    print(f"wrote {out / 'scaling.md'}, {out / 'scaling.json'}")
    if publish is not None:
        print(f"published {publish_table('scaling', table, publish)}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.scaling",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/train/ablate.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true", help="also the N-process runs with fsdp=true")
    parser.add_argument("--out", default="runs/scaling")
    parser.add_argument("--publish", action="store_true",
                        help="also write the table as docs/measured/scaling-DATE.md")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    B, N = cfg.micro_batch_size, args.nproc
    if B % N:
        raise SystemExit(f"micro_batch_size={B} must be a multiple of --nproc {N} for the "
                         "fixed-global-batch runs")
    out = Path(args.out)
    cases = [("1 process", 1, B, B, ()),
             (f"{N} processes, fixed per-process batch", N, B, N * B, ()),
             (f"{N} processes, fixed global batch", N, B // N, B, ())]
    if args.fsdp:
        cases += [(f"{N} processes FSDP2, fixed per-process batch", N, B, N * B, ("fsdp=true",)),
                  (f"{N} processes FSDP2, fixed global batch", N, B // N, B, ("fsdp=true",))]
    measured: dict[str, list[dict]] = {name: [] for name, *_ in cases}
    port = 29700 + os.getpid() % 200
    for r in range(args.repeats):
        for i, (name, nproc, micro, batch, extra) in enumerate(cases if r % 2 == 0 else cases[::-1]):
            print(f"[round {r + 1}/{args.repeats}] {name} ...", flush=True)
            port += 1
            res = run(args.config, args.overrides, out / f"r{r}_{i}", nproc, micro, batch,
                      args.steps, args.threads, port, extra)
            measured[name].append(res)
            print(f"    {res['tokens_per_s']:,.0f} tokens/s", flush=True)
    rows = []
    t1 = statistics.median(m["tokens_per_s"] for m in measured["1 process"])
    for name, nproc, micro, batch, _ in cases:
        tok = statistics.median(m["tokens_per_s"] for m in measured[name])
        allreduce = [m["grad_allreduce_s"] for m in measured[name] if m["grad_allreduce_s"]]
        rows.append({"case": name, "processes": nproc, "micro_batch_size": micro,
                     "batch_size": batch, "tokens_per_s": tok,
                     "step_s": statistics.median(m["step_s"] for m in measured[name]),
                     "grad_allreduce_s": statistics.median(allreduce) if allreduce else None,
                     "speedup": tok / t1, "scaling_efficiency": tok / (nproc * t1)})
    command = "python -m train.scaling " + " ".join(
        [args.config, *args.overrides, f"--nproc {N}", f"--steps {args.steps}",
         f"--threads {args.threads}", f"--repeats {args.repeats}"] + (["--fsdp"] if args.fsdp else [])
        + (["--publish"] if args.publish else []))
    setup = (f"{cfg.model.n_layer} layers, d_model {cfg.model.d_model}, "
             f"seq_len {cfg.seq_len or cfg.model.seq_len}; {args.threads} thread(s) per process, "
             f"{os.cpu_count()} cores, median of {args.repeats} round(s).")
    write_tables(out, rows, command, setup, args.threads, DOCS if args.publish else None)


if __name__ == "__main__":
    main()
