"""What calibrate measured, fitted, checked and predicted (`Calibration`), as text for the
terminal, Markdown with plots for report.md, and a JSON record for calibration.json."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from contracts.measured import DOCS, header
from contracts.measured import publish as publish_table
from estimate.calibrate.checks import Check
from estimate.calibrate.sweep import RERUN_OTHERS_CORES, Measured, Sweep
from estimate.report import md_table
from estimate.throughput_fit import StepTimeFit

FORMAT = 2  # 2: adds "device" (and each run's "devices"); estimate.calibrate.prior reads 1 and 2
TITLE = "Throughput calibration"


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.0f}" if s >= 0.01 else f"{s * 1e3:.1f}"


def runs_table(measured: list[Measured], fit: StepTimeFit) -> str:
    rows = []
    for x in measured:
        if x.spec.fp32_single_core:
            pred = fit.predict(x.hardware_flops_per_step)
            pred_s, err = f"{x.spec.tokens_per_step() / pred:,.0f}", f"{x.step_s / pred - 1:+.1%}"
        else:
            pred_s, err = "—", "—"
        role = {"fit": "fit", "held_out": "**held out**"}.get(x.spec.role, f"check: {x.spec.role}")
        others = f"{max(x.others_cores_rounds):.2f}" if x.others_cores_rounds else "?"
        rows.append([x.spec.label, role, f"{x.params / 1e6:.2f}M", _fmt_ms(x.step_s),
                     f"{x.tokens_per_s:,.0f}",
                     f"{x.hardware_flops_per_step / x.step_s / 1e9:.1f}",
                     f"{statistics.median(x.mfu_rounds):.0%}", pred_s, err, others])
    return md_table(["run", "role", "params", "step ms (median)", "tokens/s",
                     "achieved GFLOP/s per process", "MFU", "fit: tokens/s", "fit error",
                     "others' CPU (cores, max)"], rows)


def interference_note(measured: list[Measured], threshold: float = 0.25) -> str:
    """A line naming the runs that shared the machine with other work, if any did."""
    busy = [x for x in measured if x.others_cores_rounds and max(x.others_cores_rounds) >= threshold]
    if not busy:
        return ""
    worst = max(max(x.others_cores_rounds) for x in busy)
    return (f"{len(busy)} of {len(measured)} configurations ran while other work used "
            f">= {threshold:.2f} cores (up to {worst:.2f}): their times, and the checks built on "
            "them, are less reliable; rerun on a quieter machine or with more --repeats")


def checks_table(checks: list[Check]) -> str:
    return md_table(["assumption", "published expectation", "measured", "verdict (tolerance)"],
                    [[c.assumption, c.expectation, c.measured, c.verdict] for c in checks])


@dataclass
class Calibration:
    """What calibrate measured, fitted, checked and predicted."""

    sweep: Sweep
    machine: dict
    measured: list[Measured]
    fit: StepTimeFit
    checks: list[Check]
    held_out: Measured
    held_out_predicted_step_s: float
    wall_s: float
    load_avg: tuple[list[float], list[float]]
    reruns: list[str] = field(default_factory=list)  # runs repeated because others were busy

    @property
    def device(self) -> str:
        """The device the fit runs trained on ('cpu', 'cuda', ...; 'unknown' when their
        summaries did not say, 'mixed: ...' when they differ)."""
        seen = sorted({d.split(":")[0] for x in self.measured if x.spec.role == "fit"
                       for d in x.devices})
        return seen[0] if len(seen) == 1 else ("mixed: " + ", ".join(seen) if seen else "unknown")

    @property
    def held_out_error(self) -> float:
        """(predicted - measured) / measured tokens/s of the held-out run."""
        return self.held_out.step_s / self.held_out_predicted_step_s - 1

    @property
    def held_out_predicted_tokens_per_s(self) -> float:
        return self.held_out.spec.tokens_per_step() / self.held_out_predicted_step_s

    def fit_text(self) -> str:
        f = self.fit
        res = ", ".join(f"{r:+.1%}" for r in f.residuals)
        return (f"step_s = {f.a_s * 1e3:.1f} ms + F / ({f.asymptotic_flops_per_s / 1e9:.1f} GFLOP/s)"
                f" over {len(f.flops)} fp32 sizes; residuals {res} (rms {f.rms_residual:.1%})")

    def held_out_text(self) -> str:
        h = self.held_out
        worst = max(abs(r) for r in self.fit.residuals)
        return (f"held out {h.spec.label} ({h.params / 1e6:.1f}M params, "
                f"{h.hardware_flops_per_step / max(self.fit.flops):.1f}x the FLOPs of the largest fit run): "
                f"predicted {self.held_out_predicted_tokens_per_s:,.0f} tokens/s "
                f"({self.held_out_predicted_step_s * 1e3:,.0f} ms/step; fit residuals up to "
                f"{worst:.0%}), measured {h.tokens_per_s:,.0f} tokens/s "
                f"({h.step_s * 1e3:,.0f} ms/step): error {self.held_out_error:+.1%}")

    def record(self) -> dict:
        return {
            "kind": "calibration", "format": FORMAT, "device": self.device,
            "machine": self.machine,
            "sweep": dataclasses.asdict(self.sweep), "wall_s": self.wall_s,
            "load_avg_start_end": self.load_avg, "reruns": self.reruns,
            "fit": {"model": "step_s = a_s + b_s_per_flop * hardware_flops_per_step (fp32, "
                             "1 process), least squares on relative error", **self.fit.to_dict()},
            "checks": [{"assumption": c.assumption, "expectation": c.expectation,
                        "measured": c.measured, "holds": c.holds, "tolerance": c.tolerance,
                        "note": c.note, **c.values} for c in self.checks],
            "held_out": {"run": self.held_out.to_dict(),
                         "predicted_step_s": self.held_out_predicted_step_s,
                         "predicted_tokens_per_s": self.held_out_predicted_tokens_per_s,
                         "measured_tokens_per_s": self.held_out.tokens_per_s,
                         "error": self.held_out_error},
            "runs": [x.to_dict() for x in self.measured],
        }

    def text(self) -> str:
        m = self.machine
        return "\n".join([
            f"calibration on {m['cpu']} ({m['logical_cores']} logical cores, torch {m['torch']}), "
            f"{len(self.measured)} configurations x {self.sweep.repeats} round(s), "
            f"{self.sweep.steps} steps each, {self.wall_s / 60:.1f} min"
            + (f"; {len(self.reruns)} run(s) repeated because other work used >= "
               f"{RERUN_OTHERS_CORES} cores during them" if self.reruns else ""),
            "", runs_table(self.measured, self.fit), "",
            *([interference_note(self.measured), ""] if interference_note(self.measured) else []),
            "fit: " + self.fit_text(), "", checks_table(self.checks), "",
            *[f"- {c.assumption}: {c.note}" for c in self.checks if c.note], "",
            self.held_out_text(),
        ])

    def markdown(self, plots: dict[str, str], command: str | None = None) -> str:
        """report.md, headed by the date, machine, torch version and `command`
        (contracts.measured.header); `plots` names the PNGs beside it, {} for none."""
        m, s = self.machine, self.sweep
        load = f"{self.load_avg[0][0]:.1f} at the start, {self.load_avg[1][0]:.1f} at the end"
        parts = [
            header(TITLE, command),
            f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']}; "
            f"bf16 units: {', '.join(m['bf16_units']) or 'none'}; 1-minute load average {load}. "
            f"{len(self.measured)} configurations x {s.repeats} round(s) of {s.steps} steps "
            f"(median step time over the last {s.steps - s.warmup_steps_excluded}), "
            f"{self.wall_s / 60:.1f} min in all"
            + (f" ({len(self.reruns)} run(s) repeated because other work used >= "
               f"{RERUN_OTHERS_CORES} cores during them)" if self.reruns else "")
            + f". Model preset `{s.model['preset']}`, "
            f"{s.micro_batch_size} x {s.seq_len} tokens per step and process, {s.threads} "
            "thread(s) per process unless the run says otherwise.", "",
            "## Throughput model", "",
            "Time per step = a + b x F, F the FLOPs one process executes per step (model FLOPs "
            "6N + 12LdT per token, plus recomputation; `model/flops.py`), fitted to the fp32 "
            "single-process runs of different sizes (least squares on relative error, "
            "`estimate/throughput_fit.py`). 1/b is the FLOP/s large matmuls reach, a the part "
            "of a step that does not grow with FLOPs.", "",
            "**Fit:** " + self.fit_text() + ".", "",
            "**Held-out run:** " + self.held_out_text() + ".", "",
        ]
        if "size" in plots:
            parts += [f"![throughput vs size]({plots['size']})", ""]
        if "pred" in plots:
            parts += [f"![measured vs predicted]({plots['pred']})", ""]
        parts += ["## Runs", "",
                  "Fit error = (predicted - measured) / measured tokens/s; runs outside the fit "
                  "are predicted from their own FLOPs (recomputation and longer sequences "
                  "included), which is how the projection treats them. bf16 and multi-process "
                  "runs are checks, not predictions.", "",
                  runs_table(self.measured, self.fit), "",
                  "Others' CPU: busy CPU time of the whole machine during the run (hypervisor "
                  "steal included) minus the run's own, per second of the run. "
                  + interference_note(self.measured), "",
                  "## Assumptions, as measured", "",
                  checks_table(self.checks), ""]
        parts += [f"- **{c.assumption}**: {c.note}" for c in self.checks if c.note]
        return "\n".join(parts) + "\n"



def write_plots(cal: Calibration, out: Path) -> dict[str, str]:
    """throughput_vs_size.png (fit sizes and the held-out run, measured and fitted) and
    measured_vs_predicted.png (every run the FLOPs model describes)."""
    from estimate.plots import Point, predicted_vs_reported, series_vs_size

    sized = sorted([x for x in cal.measured if x.spec.role in ("fit", "held_out")],
                   key=lambda x: x.params)
    size_png = series_vs_size(
        [x.params / 1e6 for x in sized],
        {"measured": [x.tokens_per_s for x in sized],
         "fit: tokens / (a + b F)": [x.spec.tokens_per_step() / cal.fit.predict(x.hardware_flops_per_step)
                                     for x in sized]},
        out / "throughput_vs_size.png", xlabel="parameters (millions); largest = held out",
        ylabel="tokens/s (one process, fp32)",
        title=f"Throughput vs model size ({cal.machine['cpu']})")
    points = []
    for x in cal.measured:
        if not x.spec.fp32_single_core:
            continue
        tag = {"fit": "", "held_out": " (held out)"}.get(x.spec.role, " (not fitted)")
        points.append(Point(x.spec.label + tag, x.tokens_per_s,
                            x.spec.tokens_per_step() / cal.fit.predict(x.hardware_flops_per_step)))
    pred_png = predicted_vs_reported(
        points, out / "measured_vs_predicted.png", xlabel="measured tokens/s",
        ylabel="predicted tokens/s (a + b F fit)", band=1.25,
        title="Throughput: fit prediction vs measurement")
    return {"size": size_png.name, "pred": pred_png.name}




def publish(cal: Calibration, command: str | None = None, directory: Path = DOCS) -> Path:
    """Write the report, without its plots, as docs/measured/calibration-DATE.md."""
    return publish_table("calibration", cal.markdown({}, command), directory)
