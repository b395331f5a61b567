"""``gdnsq benchmark``: how much faster a deployed file runs than its FP32 model::

    gdnsq benchmark MODEL.gdnsq [--batch-sizes 1 16] [--threads 1 2] [--reps 20] [--warmup 3]
                    [--input-shape C H W] [--compile] [--device cpu] [--json]

The deployed model is loaded with :func:`gdnsq.deploy.load` (architecture from the file) and run
through its normal ``forward``, so it takes whatever fast path ``load`` gives it. The FP32
baseline is the same architecture in float32 (``gdnsq.models.get_model`` of the file's
architecture) holding the artifact's float layers and the dequantized weights of its quantized
layers: what the user would run without gdnsq. Its speed does not depend on the weight values;
loading them only makes the two models compute the same network. ``--compile`` adds the FP32
model under ``torch.compile`` (its compilation happens in the warm-up calls, not timed).

For every thread count (``torch.set_num_threads``) and batch size: the median latency over
``--reps`` timed calls after ``--warmup`` untimed ones, throughput = batch / median latency, and
the speed-up = FP32 median / row median at the same batch and thread count. Random normal
inputs of shape ``(batch, *input_shape)``; the default input shape comes from the architecture
(3x32x32 for the CIFAR ResNets). The result records the CPU model and flags, torch and gdnsq
versions, ``os.getloadavg()`` before and after, and the deployed model's plan report when
``gdnsq.deploy`` provides one. Timings on a loaded machine are inflated: compare the rows of one
run, not runs on different machines.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import torch

from .. import __version__
from ..train.progress import progress_bar
from ._support import CliError, add_subcommand, nonneg_int, positive_int, resolve_device, usage_errors

__all__ = ["cmd_benchmark", "add_parser", "measure_latency", "system_info", "fp32_counterpart",
           "default_input_shape", "plan_info"]

#: per-sample input shape of the architectures ``gdnsq.models`` builds (the CIFAR ResNets)
CIFAR_INPUT_SHAPE = (3, 32, 32)
# /proc/cpuinfo flags that decide which kernels run (the full list is long and mostly irrelevant)
_FLAG_PREFIXES = ("avx", "sse4", "fma", "popcnt", "amx", "f16c", "bmi2", "vnni")


def add_parser(subparsers) -> None:
    """Add ``benchmark`` to the ``gdnsq`` subparsers."""
    b = add_subcommand(subparsers, "benchmark", "latency and throughput of a deployed file vs its FP32 model")
    b.add_argument("file", metavar="MODEL", help="a deployed model file written by `gdnsq export`")
    b.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16],
                   help="batch sizes to time (default 1 16)")
    b.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2],
                   help="torch.set_num_threads values (default 1 2)")
    b.add_argument("--reps", type=positive_int, default=20, help="timed calls per point (default 20)")
    b.add_argument("--warmup", type=nonneg_int, default=3,
                   help="untimed calls before the timed ones (default 3)")
    b.add_argument("--input-shape", type=positive_int, nargs="+", default=None, metavar="DIM",
                   help="per-sample input shape, e.g. 3 32 32 (default: from the architecture)")
    b.add_argument("--compile", action="store_true", help="add an FP32 torch.compile row")
    b.set_defaults(func=cmd_benchmark)


# ---------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model, x: torch.Tensor, *, reps: int, warmup: int = 1, max_seconds: float | None = None,
                    min_reps: int = 3) -> dict:
    """Time ``model(x)``: ``warmup`` untimed calls, then up to ``reps`` timed ones.

    ``max_seconds`` stops the timed calls once they took that long in total (after at least
    ``min(min_reps, reps)`` of them), for heavy points. Returns ``{"median_ms", "min_ms",
    "reps"}`` (milliseconds per call; reps = the timed calls made).
    """
    device = x.device
    for _ in range(warmup):
        model(x)
    _sync(device)
    times = []
    spent = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if max_seconds is not None and spent >= max_seconds and len(times) >= min(min_reps, reps):
            break
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "reps": len(times)}


def _load_avg():
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def system_info() -> dict:
    """CPU model and kernel-relevant flags, core count, versions, load average, date (UTC)."""
    from gdnsq_kernels._build import cpu_flags

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = sorted(f for f in cpu_flags() if f.startswith(_FLAG_PREFIXES))
    return {"cpu": model, "cpu_flags": flags, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "gdnsq": __version__, "python": platform.python_version(), "loadavg": _load_avg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def plan_info(model) -> list | None:
    """The deployed model's plan report (``gdnsq.deploy.plan_report``: its integer segments and
    why any layer falls back), JSON-safe; None where gdnsq.deploy has no plan report."""
    from .. import deploy

    report = getattr(deploy, "plan_report", None)
    if report is None:
        return None
    return json.loads(json.dumps(report(model), default=str))


def default_input_shape(architecture: dict | None) -> tuple | None:
    """Per-sample input shape of an artifact's architecture: 3x32x32 for the ``gdnsq.models``
    CIFAR ResNets, None for anything else (then ``--input-shape`` is needed)."""
    from ..models import MODELS

    if isinstance(architecture, dict) and architecture.get("name") in MODELS:
        return CIFAR_INPUT_SHAPE
    return None


def fp32_counterpart(path) -> torch.nn.Module:
    """The FP32 model of a deployed file: its architecture (``gdnsq.models.get_model``) with the
    file's float tensors and, for each quantized layer, the dequantized weight ``min + step * k``
    as a float32 conv/linear weight. ValueError when the file is bad or its architecture unknown."""
    from ..deploy.artifact import read_artifact
    from ..deploy.layers import unpack_codes
    from ..models import get_model

    meta, tensors = read_artifact(path)
    arch = meta["architecture"]
    if arch is None:
        raise ValueError(f"{path}: the artifact names no architecture")
    model = get_model(arch["name"], **arch.get("kwargs", {}))
    deployed = {e["name"]: e["config"] for e in meta["layers"]}
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in deployed}
    for name, c in deployed.items():
        k = unpack_codes(tensors[f"{name}.weight_packed"], c["weight_bits"], c["weight_shape"]).float()
        view = (-1,) + (1,) * (k.dim() - 1)
        state[f"{name}.weight"] = k * tensors[f"{name}.weight_step"].view(view) + tensors[f"{name}.weight_min"].view(view)
        if c["bias"]:
            state[f"{name}.bias"] = tensors[f"{name}.bias"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: its tensors do not fit the FP32 {arch['name']}: {str(e).splitlines()[0]}") from e
    return model.eval()


# ---------------------------------------------------------------------------- the command

def _check_args(args) -> pathlib.Path:
    path = pathlib.Path(args.file)
    if path.is_dir():
        raise CliError(f"MODEL: {path} is a folder; expected a deployed model file (gdnsq export)")
    if not path.is_file():
        raise CliError(f"MODEL: file not found: {path}")
    cores = os.cpu_count() or 1
    too_many = [t for t in args.threads if t > cores]
    if too_many:
        raise CliError(f"--threads: {too_many[0]} is more than the {cores} CPUs of this machine")
    return path


def format_table(rows: list) -> str:
    """Markdown table of the benchmark rows (model x batch x threads)."""
    lines = ["| model | batch | threads | latency (ms) | inputs/s | vs FP32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['median_ms']:.3f} | "
                     f"{r['throughput_per_s']:.1f} | {r['speedup_vs_fp32']:.2f}x |")
    return "\n".join(lines)


@torch.no_grad()
def _probe(models: dict, x: torch.Tensor, shape) -> None:
    """One call of the eager models on one input: an input shape they cannot take is a usage
    error naming --input-shape (before anything is timed), not a traceback."""
    for name, model in models.items():
        if name.endswith("-compile"):
            continue
        try:
            model(x)
        except (RuntimeError, ValueError) as e:
            raise CliError(f"--input-shape: {' '.join(map(str, shape))} does not fit the {name} model: "
                           f"{(str(e).splitlines() or [type(e).__name__])[0]}") from e


def cmd_benchmark(args) -> dict:
    """``gdnsq benchmark``: time the deployed file and its FP32 model; returns result + human text."""
    from ..deploy.artifact import load

    path = _check_args(args)
    device = resolve_device(args.device or "cpu")
    with usage_errors("MODEL"):  # not a deployed model, corrupt, unknown architecture
        deployed = load(path, map_location=device)
        fp32 = fp32_counterpart(path).to(device)
    arch = deployed.gdnsq_architecture
    shape = tuple(args.input_shape) if args.input_shape else default_input_shape(arch)
    if shape is None:
        raise CliError(f"--input-shape: the architecture {arch} has no default input shape; name one")
    models = {"fp32": fp32}
    if args.compile:
        models["fp32-compile"] = torch.compile(fp32)
    models["deployed"] = deployed
    before = system_info()
    torch.manual_seed(0 if args.seed is None else args.seed)
    inputs = {b: torch.randn(b, *shape, device=device) for b in args.batch_sizes}
    _probe(models, inputs[min(args.batch_sizes)][:1], shape)
    points = [(t, b, name) for t in args.threads for b in args.batch_sizes for name in models]
    bar = progress_bar(len(points), desc="benchmark", enabled=not args.json)
    saved_threads = torch.get_num_threads()
    rows = []
    try:
        for threads, batch, name in points:
            torch.set_num_threads(threads)
            # torch.compile compiles on its first call at each shape: at least one warm-up
            warmup = max(args.warmup, 1) if name == "fp32-compile" else args.warmup
            m = measure_latency(models[name], inputs[batch], reps=args.reps, warmup=warmup)
            rows.append({"model": name, "batch": batch, "threads": threads, **m,
                         "throughput_per_s": batch / (m["median_ms"] / 1e3)})
            bar.set_postfix(model=name, batch=batch, threads=threads, refresh=False)
            bar.update(1)
    finally:
        torch.set_num_threads(saved_threads)
        bar.close()
    base = {(r["batch"], r["threads"]): r["median_ms"] for r in rows if r["model"] == "fp32"}
    for r in rows:
        r["speedup_vs_fp32"] = base[(r["batch"], r["threads"])] / r["median_ms"]
    system = dict(before, loadavg_after=_load_avg())
    plan = plan_info(deployed)
    result = {"file": str(path), "architecture": arch, "input_shape": list(shape), "device": str(device),
              "fp32_baseline": "same architecture in float32 with the dequantized weights",
              "reps": args.reps, "warmup": args.warmup, "rows": rows, "system": system, "plan": plan}
    name = (arch or {}).get("name", "?")
    head = (f"{path} ({name}, input {'x'.join(map(str, shape))}) on {system['cpu']}, torch {system['torch']}, "
            f"load average {system['loadavg']}")
    human = [head, "", format_table(rows)]
    if plan is not None:
        human += ["", f"plan: {len(plan)} segment(s)"]
    return {"result": result, "human": "\n".join(human)}
