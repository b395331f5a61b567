"""What a run writes for people and programs: ``metrics.jsonl`` (one record per line),
``report.json`` (every figure, machine-readable) and ``report.md`` (a summary table, then one
row per quantized layer), and the bit-width summaries they hold.

Both JSON files are strict JSON: a value that is not a finite number (an activation quantizer
not observed yet, a mean over no layers, a diverged loss) is written as ``null``, never as the
``NaN`` / ``Infinity`` tokens that strict readers refuse.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from torch import nn

from .. import stats as gstats
from .._atomic import atomic_write_text

__all__ = ["report_markdown", "write_report", "build_report", "json_safe", "MetricsLog"]


# --------------------------------------------------------------------------- strict JSON

def json_safe(value):
    """``value`` with every non-finite float (nested in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _dumps(value, **kwargs) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


class MetricsLog:
    """``metrics.jsonl``: appended by rank 0 only (``enabled``), one JSON object per line."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_dumps(record) + "\n")

    def size(self) -> int:
        """Bytes written so far (0 on the ranks that do not write)."""
        return os.path.getsize(self.path) if self.enabled and os.path.exists(self.path) else 0

    def truncate(self, size: int) -> None:
        """Drop the records written after byte ``size`` (the part of an interrupted epoch)."""
        if self.enabled and os.path.exists(self.path) and os.path.getsize(self.path) > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)


# --------------------------------------------------------------------------- bit summaries

def per_layer_bits(student: nn.Module) -> dict:
    """{layer: {"weight": mean continuous weight bits over channels, "act": continuous
    activation bits or None}} (what bits.png draws)."""
    return {n: {"weight": v["weight"], "act": v["act"]} for n, v in gstats.continuous_bits(student).items()}


def realised_bits(student: nn.Module, act_bits_max: Optional[dict] = None) -> dict:
    """{layer: {"weight": realised bits from the codes, "act": max observed activation bits over
    an evaluated pass (``act_bits_max``) or of the last eval batch}}."""
    realised = {n: dict(v) for n, v in gstats.realised_bits(student).items()}
    for n, v in (act_bits_max or {}).items():
        if n in realised and math.isfinite(v):
            realised[n]["act"] = v
    return realised


def target_bits(student: nn.Module) -> dict:
    """{"weight": ..., "act": ...}: one number when every layer has the same target, else
    {layer: bits}; None without such layers."""
    tw, ta = {}, {}
    for name, layer in gstats.quantized_layers(student):
        wq = getattr(layer, "weight_quantizer", None)
        if wq is not None:
            tw[name] = float(wq.target_bits)
        aq = getattr(layer, "act_quantizer", None)
        if aq is not None and aq.enabled:
            ta[name] = float(aq.target_bits)

    def collapse(d):
        vals = set(d.values())
        return None if not d else (vals.pop() if len(vals) == 1 else d)

    return {"weight": collapse(tw), "act": collapse(ta)}


def _mean(values):
    return sum(values) / len(values) if values else None


def build_report(student: nn.Module, selected, *, realised: dict, run: dict, test: Optional[dict] = None) -> dict:
    """The report dict of a run.

    Args:
        selected: the :class:`~gdnsq.train.selection.Selected` checkpoint.
        realised: {layer: {"weight", "act"}} realised bits to report (of the selected weights).
        run: the run's own figures: first_converged_epoch, epochs_run, global_steps,
            stop_reason, wall_seconds, world_size, precision ({"requested", "used", "reason"}),
            config, command.
        test: the test evaluation (``Trainer.evaluate``) or None before ``test()``.
    Non-finite values are None (as report.json writes them).
    """
    targets = target_bits(student)
    rw = {n: v.get("weight") for n, v in realised.items() if v.get("weight") is not None}
    ra = {n: v.get("act") for n, v in realised.items() if v.get("act") is not None and math.isfinite(v.get("act"))}
    per_layer = per_layer_bits(student)
    return json_safe({
        "test_top1": test["top1"] if test else None,
        "test_n": test["n"] if test else None,
        "val_top1": selected.val_top1,
        "selected_epoch": selected.epoch,
        "selected_checkpoint": selected.file,
        "converged": selected.converged,
        "first_converged_epoch": run["first_converged_epoch"],
        "target_weight_bits": targets["weight"],
        "target_act_bits": targets["act"],
        "realised_weight_bits": rw,
        "realised_act_bits": ra,
        "realised_weight_bits_max": max(rw.values()) if rw else None,
        "realised_act_bits_max": max(ra.values()) if ra else None,
        "mean_realised_weight_bits": _mean(list(rw.values())),
        "mean_realised_act_bits": _mean(list(ra.values())),
        "mean_weight_bits": _mean([v["weight"] for v in per_layer.values() if v["weight"] is not None]),
        "mean_act_bits": _mean([v["act"] for v in per_layer.values() if v["act"] is not None]),
        "continuous_bits": per_layer,
        "epochs_run": run["epochs_run"],
        "global_steps": run["global_steps"],
        "stop_reason": run["stop_reason"],
        "wall_seconds": round(run["wall_seconds"], 3),
        "world_size": run["world_size"],
        "precision": run["precision"],
        "config": run["config"],
        "command": run["command"],
    })


# --------------------------------------------------------------------------- files

def write_report(out_dir: str, report: dict) -> None:
    """Write ``out_dir/report.json`` and ``out_dir/report.md`` (each atomically)."""
    atomic_write_text(os.path.join(out_dir, "report.json"), _dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(out_dir, "report.md"), report_markdown(json_safe(report)))


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
