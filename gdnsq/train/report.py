"""The training report: ``report.json`` (every figure, machine-readable) and ``report.md``
(a summary table, then one row per quantized layer). The dict is built by
:meth:`gdnsq.train.trainer.Trainer.report`; this module only formats and writes it."""
from __future__ import annotations

import json
import os

from .._atomic import atomic_write_text

__all__ = ["report_markdown", "write_report"]


def write_report(out_dir: str, report: dict) -> None:
    """Write ``out_dir/report.json`` and ``out_dir/report.md`` (each atomically)."""
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2, allow_nan=True) + "\n")
    atomic_write_text(os.path.join(out_dir, "report.md"), report_markdown(report))


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, dict):
        return "per layer"
    return str(v)


def report_markdown(report: dict) -> str:
    """The report as markdown: a summary table, then one row per quantized layer."""
    rows = [
        ("test top-1 (%)", _fmt(report["test_top1"])),
        ("val top-1 of the selected checkpoint (%)", _fmt(report["val_top1"])),
        ("selected epoch", _fmt(report["selected_epoch"])),
        ("converged (realised bits <= targets)", _fmt(report["converged"])),
        ("first converged epoch", _fmt(report["first_converged_epoch"])),
        ("target weight / act bits", f"{_fmt(report['target_weight_bits'], 3)} / {_fmt(report['target_act_bits'], 3)}"),
        ("realised weight / act bits (max over layers)",
         f"{_fmt(report['realised_weight_bits_max'], 3)} / {_fmt(report['realised_act_bits_max'], 3)}"),
        ("mean realised weight / act bits",
         f"{_fmt(report['mean_realised_weight_bits'], 3)} / {_fmt(report['mean_realised_act_bits'], 3)}"),
        ("mean continuous weight / act bits",
         f"{_fmt(report['mean_weight_bits'], 3)} / {_fmt(report['mean_act_bits'], 3)}"),
        ("epochs run", _fmt(report["epochs_run"])),
        ("stop reason", _fmt(report["stop_reason"])),
        ("wall time (s)", _fmt(report["wall_seconds"], 1)),
        ("processes", _fmt(report["world_size"])),
    ]
    lines = ["# GDNSQ training report", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Bits per quantized layer", "",
              "| layer | realised W | realised A | continuous W (mean) | continuous A |", "|---|---|---|---|---|"]
    for name, cont in report["continuous_bits"].items():
        lines.append(f"| {name} | {_fmt(report['realised_weight_bits'].get(name), 3)} | "
                     f"{_fmt(report['realised_act_bits'].get(name), 3)} | {_fmt(cont['weight'], 3)} | "
                     f"{_fmt(cont['act'], 3)} |")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)
