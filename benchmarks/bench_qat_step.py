"""One GDNSQ training step of a CIFAR ResNet-20: FP vs the authors'-style eager composite vs gdnsq.

A step is: teacher forward under no_grad, student forward, Jeffreys divergence, backward, RAdam
step (batch 128 on 3x32x32 by default). Three providers run in the same process, interleaved
round by round so that load from other processes on a shared machine hits them alike:

* ``fp``: the FP ResNet-20 as the student (the floor).
* ``eager``: the authors' construction: before every quantized conv a separate module
  fake-quantizes the input with clamp, shift, divide, a rounding autograd Function (forward
  ``round(v) - v``, backward: no gradient to ``v`` and the dithered ``G*r`` to the step), add,
  multiply, shift back; the conv quantizes its weight with the same composite. Every
  intermediate is kept by autograd.
* ``gdnsq``: ``gdnsq.quantize_model`` (QConv2d with the fused, recomputing autograd path).
* ``fp-compiled`` / ``gdnsq-compiled`` (unless ``--no-compile``): the same students wrapped in
  ``torch.compile(fullgraph=True)`` (the gdnsq:: custom ops stay opaque kernels; inductor fuses
  what lies between them: BN, ReLU, residual adds, and the backward of those). The teacher and
  the optimizer run eagerly in every row. The first (compiling) call is timed separately
  (``compile_s``); saved bytes are not measured for compiled rows (AOTAutograd decides them).

Launches per step (``launches`` in each row; one extra, untimed, profiled step per provider):
on CUDA the number of GPU kernels the step launches (``torch.profiler`` CUDA kernel events) and
how many of them are gdnsq's Triton kernels; on CPU, where there are no launches, the number of
``gdnsq::`` custom-op calls (nested calls included: ``quantize_activation`` calls
``act_forward``) and of ATen operator calls per step. ``--no-launches`` skips this.

Both quantized providers use the default placement (first conv, classifier FP) and the same
calibrated parameters. Reported: median step time, bytes saved for backward (unique storages
seen by ``torch.autograd.graph.saved_tensors_hooks`` during the forward), ratios to FP, and
the epochs per hour the median step gives (``ceil(--train-images / --batch)`` steps per epoch:
training steps only; ``benchmarks/profile_epoch.py`` times whole epochs of the real trainer).
Results are appended to ``benchmarks/results/qat_step.jsonl`` and the latest run is written to
``benchmarks/results/qat_step.md`` (``--out-dir`` names another folder: runs on a loaded machine
belong in a scratch folder, not in the committed results).

Run: ``python benchmarks/bench_qat_step.py`` (``--device cuda`` on a GPU; ``--profile`` prints
where the gdnsq step spends its time).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gdnsq  # noqa: E402
from gdnsq import calibrate, jeffreys_divergence, quantize_model  # noqa: E402
from gdnsq._atomic import atomic_append_text, atomic_write_text  # noqa: E402
from gdnsq.stats import quantized_layers  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DITHER = 1.0 / (2.0 * math.sqrt(3.0))


# ------------------------------------------------------------------ authors'-style eager composite
class _RoundNoise(torch.autograd.Function):
    """n = round(v) - v; backward: nothing to v (STE), G*r to the step, r = +-1/(2 sqrt 3)."""

    @staticmethod
    def forward(ctx, v, s):
        ctx.s_shape = s.shape
        return torch.round(v) - v

    @staticmethod
    def backward(ctx, g):
        r = (torch.randint(0, 2, g.shape, device=g.device, dtype=g.dtype) * 2 - 1) * DITHER
        gs = g * r
        dims = [i for i, n in enumerate(ctx.s_shape) if n == 1] if len(ctx.s_shape) else None
        gs = gs.sum() if dims is None else gs.sum(dim=dims, keepdim=True)
        return None, gs


class EagerActQuant(nn.Module):
    """Per-tensor activation quantizer as separate eager ops (clamp, shift, divide, N, ...)."""

    def __init__(self, log2_step, log2_range, offset, signed):
        super().__init__()
        self.log2_step = nn.Parameter(log2_step.detach().clone())
        self.log2_range = nn.Parameter(log2_range.detach().clone())
        self.offset = nn.Parameter(offset.detach().clone(), requires_grad=signed)

    def forward(self, x):
        s, q, lo = torch.exp2(self.log2_step), torch.exp2(self.log2_range), self.offset
        v = (torch.clamp(x, lo, lo + q - s) - lo) / s
        return (v + _RoundNoise.apply(v, s)) * s + lo


class EagerQConv2d(nn.Conv2d):
    """Conv whose weight goes through the eager composite (zero point = per-channel amin)."""

    def forward(self, x):
        w = self.weight
        z = w.amin(dim=(1, 2, 3), keepdim=True)
        s = torch.exp2(self.log2_step).reshape(-1, 1, 1, 1)
        v = (w - z) / s
        w_hat = (v + _RoundNoise.apply(v, s)) * s + z
        return self._conv_forward(x, w_hat, self.bias)


def eager_from_gdnsq(fp_model, student):
    """The FP model with every gdnsq-quantized conv replaced by Sequential(EagerActQuant, EagerQConv2d)."""
    model = copy.deepcopy(fp_model)
    for name, layer in quantized_layers(student):
        conv = model.get_submodule(name)
        q = EagerQConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         device=conv.weight.device)
        q.weight = conv.weight
        q.bias = conv.bias
        q.log2_step = nn.Parameter(layer.weight_quantizer.log2_step.detach().clone())
        aq = layer.act_quantizer
        mod = nn.Sequential(EagerActQuant(aq.log2_step, aq.log2_range, aq.offset, bool(aq.signed)), q)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, mod)
    return model


# ------------------------------------------------------------------ measurement
def saved_bytes(student, teacher, x):
    """Bytes of the unique storages autograd saves for backward during one forward."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(st.data_ptr(), st.device)] = st.nbytes()
        return t

    with torch.no_grad():
        teacher(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student(x)
    del out
    return sum(storages.values())


def make_step(student, teacher, optimizer, x, sync, precision="fp32"):
    """One training step as the Trainer runs it: with ``precision="bf16"`` the teacher and
    student forwards and the loss run under ``torch.autocast(bfloat16)`` opened for this step
    only (the gdnsq quantizers compute in float32 inside it); backward and optimizer outside."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                t_logits = teacher(x)
            loss = jeffreys_divergence(student(x).float(), t_logits.float())
        loss.backward()
        optimizer.step()
        sync()
    return step


GDNSQ_TRITON_KERNELS = ("_act_", "_w_", "_packed_gemm", "_bits_dot")


def count_launches(step, device):
    """What one call of ``step`` launches (see the module docstring): a dict of counts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
    events = list(prof.events())
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        return {"kind": "cuda_kernels", "kernels": len(kernels),
                "gdnsq_triton_kernels": sum(e.name.startswith(GDNSQ_TRITON_KERNELS) for e in kernels)}
    ops = [e.name for e in events]
    by_op = {}
    for name in ops:
        if name.startswith("gdnsq::"):
            by_op[name] = by_op.get(name, 0) + 1
    return {"kind": "cpu_op_calls", "gdnsq_op_calls": sum(by_op.values()), "gdnsq_ops": by_op,
            "aten_op_calls": sum(name.startswith("aten::") for name in ops)}


def build_model(num_classes):
    try:
        from gdnsq.models.resnet_cifar import resnet20
        return resnet20(num_classes), "gdnsq.models.resnet_cifar.resnet20"
    except ImportError:  # pragma: no cover - the model file is part of the package
        raise


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def launches_text(launches: dict) -> str:
    if launches["kind"] == "cuda_kernels":
        return f"{launches['kernels']} CUDA kernels ({launches['gdnsq_triton_kernels']} gdnsq Triton)"
    per_op = ", ".join(f"{k.split('::')[1]} {v}" for k, v in sorted(launches["gdnsq_ops"].items()))
    return (f"{launches['gdnsq_op_calls']} gdnsq:: op calls" + (f" ({per_op})" if per_op else "")
            + f", {launches['aten_op_calls']} ATen op calls, nested included (CPU: no kernel launches)")


# The pieces of a fused layer's forward and backward that --breakdown times: (module, function
# name, label). Wrapping the module attribute reaches every call, since fused_layers looks them
# up at call time (``_ops.act_forward_impl``) or through its own module globals.
_BREAKDOWN_PIECES = (
    ("gdnsq_kernels.quantize._ops", "act_forward_impl", "activation quantizer forward (forward + recompute)"),
    ("gdnsq_kernels.quantize._ops", "act_backward_impl", "activation quantizer backward"),
    ("gdnsq_kernels.quantize._ops", "w_forward_impl", "weight quantizer forward"),
    ("gdnsq_kernels.quantize._ops", "w_step_grad_impl", "weight step gradient"),
    ("gdnsq_kernels.quantize.fused_layers", "aewgs_grads", "aewgs weight gradient"),
    ("gdnsq_kernels.quantize.fused_layers", "layer_forward", "conv/linear forward"),
    ("gdnsq_kernels.quantize.fused_layers", "_layer_backward", "conv/linear backward"),
    ("gdnsq_kernels.quantize.fused_layers", "_fused_forward", "fused layers' forward, all"),
    ("gdnsq_kernels.quantize.fused_layers", "_fused_backward", "fused layers' backward, all"),
)


def breakdown(step, steps: int, clock) -> list:
    """Time per step (ms) of each piece in ``_BREAKDOWN_PIECES`` over ``steps`` calls of
    ``step``, by wrapping the functions with ``clock`` counters (a diagnostic: the wrappers add
    a few microseconds per call). Returns [(label, ms per step, calls per step)]."""
    import importlib
    spent, calls, saved = {}, {}, []
    for mod_name, fn_name, label in _BREAKDOWN_PIECES:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)
        spent[label], calls[label] = 0.0, 0

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = clock()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] += clock() - t0
                calls[_label] += 1
        saved.append((mod, fn_name, fn))
        setattr(mod, fn_name, timed)
    try:
        t0 = clock()
        for _ in range(steps):
            step()
        total = clock() - t0
    finally:
        for mod, fn_name, fn in saved:
            setattr(mod, fn_name, fn)
    rows = [("whole step", total / steps * 1e3, 1)]
    rows += [(label, spent[label] / steps * 1e3, calls[label] // steps) for _, _, label in _BREAKDOWN_PIECES
             if calls[label]]
    return rows


def epochs_per_hour(step_ms: float, steps_per_epoch: int) -> float:
    """Training epochs per hour at ``step_ms`` per step: the steps alone (no data loading, no
    validation; ``benchmarks/profile_epoch.py`` measures whole epochs of the real trainer)."""
    return 3600.0 / (step_ms / 1e3 * steps_per_epoch)


def _steps_per_epoch(record: dict) -> int:
    # records before the column existed: the default CIFAR split, 45,000 training images
    return record.get("steps_per_epoch") or math.ceil(45000 / record["batch"])


def markdown(record: dict, jsonl_text: str) -> str:
    """The results table of ``record`` plus one line per run recorded in ``jsonl_text``."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    md = [f"QAT step of {record['model']} (batch {record['batch']}, 3x32x32, Jeffreys vs FP teacher, RAdam), "
          f"{record['device']}, {record.get('precision', 'fp32')}"
          f"{', channels_last' if record.get('channels_last') else ''}, {record['threads']} threads, torch {record['torch']}, {record['date']}, "
          f"median of {record['rounds']} interleaved steps (load average at the end: "
          f"{', '.join(f'{v:.1f}' for v in record['loadavg'] or [])}).",
          "",
          "| provider | median step (ms) | p20-p80 (ms) | saved for backward (MiB) | time / FP | bytes / FP "
          f"| epochs per hour ({_steps_per_epoch(record)} steps, steps only) |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        md.append(f"| {r['provider']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | "
                  f"{fmt(r['saved_MiB'], '.1f')} | {r['time_vs_fp']:.2f} | {fmt(r['bytes_vs_fp'], '.3f')} | "
                  f"{epochs_per_hour(r['median_ms'], _steps_per_epoch(record)):.1f} |")
    counted = [r for r in record["results"] if r.get("launches")]
    if counted:
        md += ["", "Launches per step:", ""] + [f"* {r['provider']}: {launches_text(r['launches'])}"
                                                for r in counted]
    compiled = [r for r in record["results"] if r.get("compile_s") is not None]
    if compiled:
        md += ["", "First call (compilation) of the compiled rows: " + ", ".join(
            f"{r['provider']} {r['compile_s']:.1f} s" for r in compiled) + "."]
    if record.get("breakdown"):
        md += ["", f"The gdnsq step piece by piece (`--breakdown`, {record.get('clock', 'wall')} clock, 4 more steps; "
                   "the fused layers' totals include the pieces above them):", "",
               "| piece | ms per step | calls per step |", "|---|---:|---:|"]
        md += [f"| {b['piece']} | {b['ms_per_step']:.1f} | {b['calls_per_step']} |" for b in record["breakdown"]]
    if (record.get("loadavg") or [0])[0] > 0.5:
        md += ["", f"The machine was loaded during this run (load average {record['loadavg'][0]:.1f}); "
                   "rerun on a quiet machine for the figures that count."]
    cmd = ("python benchmarks/bench_qat_step.py " + " ".join(record.get("argv", []))).rstrip()
    md += ["", f"Command: `{cmd}`", "",
           "All recorded runs (qat_step.jsonl; time / saved bytes, as ratios to FP):", "",
           "| date (UTC) | device | precision | threads | load | fp (ms) | eager | gdnsq | gdnsq-nodither | gdnsq-compiled "
           "| epochs per hour, fp / gdnsq (steps only) |",
           "|---|---|---|---:|---:|---:|---|---|---|---|---|"]
    for line in jsonl_text.splitlines():
        rec = json.loads(line)
        by = {r["provider"]: r for r in rec["results"]}

        def cell(name):
            r = by.get(name)
            if not r:
                return "-"
            return f"{r['time_vs_fp']:.2f}x / " + (f"{r['bytes_vs_fp']:.2f}x" if r.get("bytes_vs_fp") is not None else "-")
        load = rec.get("loadavg") or [float("nan")]
        prec = rec.get("precision", "fp32") + (" CL" if rec.get("channels_last") else "")
        fp_ms = by["fp"]["median_ms"] if "fp" in by else float("nan")
        steps = _steps_per_epoch(rec)
        eph = " / ".join(f"{epochs_per_hour(by[n]['median_ms'], steps):.1f}" if n in by else "-" for n in ("fp", "gdnsq"))
        md.append(f"| {rec['date']} | {rec['device']} | {prec} | {rec['threads']} | {load[0]:.1f} | {fp_ms:.0f} | "
                  f"{cell('eager')} | {cell('gdnsq')} | {cell('gdnsq-nodither')} | {cell('gdnsq-compiled')} | {eph} |")
    return "\n".join(md) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12, help="timed steps per provider")
    ap.add_argument("--train-images", type=int, default=45000,
                    help="training images per epoch for the epochs-per-hour column (default 45000: "
                         "the CIFAR-10 split gdnsq quantize uses)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per provider")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="every row in this precision (bf16: autocast per step, as the trainer's --precision bf16)")
    ap.add_argument("--channels-last", action="store_true",
                    help="models and input in channels_last memory format (every row)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the gdnsq step")
    ap.add_argument("--breakdown", action="store_true",
                    help="after the timed rounds, time the pieces of gdnsq's fused layers (quantizer "
                         "kernels, conv forward/backward) over 4 more steps and print them")
    ap.add_argument("--no-save", action="store_true", help="do not write the results files")
    ap.add_argument("--out-dir", default=RESULTS,
                    help="folder of qat_step.jsonl / qat_step.md (default benchmarks/results; use a "
                         "scratch folder for runs on a loaded machine)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: the process's CPU time (time.process_time), "
                         "which leaves out the time other processes hold a shared core (one thread only)")
    ap.add_argument("--no-eager", action="store_true",
                    help="skip the eager-composite row (halves the run time when only fp vs gdnsq matters)")
    ap.add_argument("--nodither-row", action="store_true",
                    help="also time gdnsq with dither=False (diagnostic: cost of the dither hash)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the torch.compile(fullgraph=True) rows (fp-compiled, gdnsq-compiled)")
    ap.add_argument("--no-launches", action="store_true",
                    help="do not count kernel launches / op calls per step (one profiled step each)")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite qat_step.md from the last record of qat_step.jsonl and exit")
    args = ap.parse_args(argv)
    if args.markdown_only:
        text = open(os.path.join(args.out_dir, "qat_step.jsonl")).read()
        atomic_write_text(os.path.join(args.out_dir, "qat_step.md"), markdown(json.loads(text.splitlines()[-1]), text))
        return None
    if args.batch < 1 or args.rounds < 1 or args.warmup < 0 or args.train_images < 1:
        ap.error("--batch, --rounds and --train-images must be >= 1, --warmup >= 0")
    steps_per_epoch = math.ceil(args.train_images / args.batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    fp_model, model_name = build_model(10)
    fp_model = fp_model.to(device)
    teacher = copy.deepcopy(fp_model).eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        fp_model = fp_model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    student_g = quantize_model(fp_model, 4, 4)
    calibrate(student_g, [x])
    student_f = copy.deepcopy(fp_model)
    cases = [("fp", student_f)]
    if not args.no_eager:
        cases.append(("eager", eager_from_gdnsq(fp_model, student_g)))
    cases.append(("gdnsq", student_g))
    if args.nodither_row:
        # Diagnostic: the same gdnsq model with the step-gradient dither off (r = 0), to show
        # how much of the overhead is the dither's hash.
        student_n = copy.deepcopy(student_g)
        for m in student_n.modules():
            if isinstance(m, (gdnsq.WeightQuantizer, gdnsq.ActivationQuantizer)):
                m.dither = False
        cases.append(("gdnsq-nodither", student_n))

    if not args.no_compile:
        cases.append(("fp-compiled", copy.deepcopy(student_f)))
        cases.append(("gdnsq-compiled", copy.deepcopy(student_g)))

    providers = {}
    for name, student in cases:
        student.train()
        opt = torch.optim.RAdam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
        compiled = name.endswith("-compiled")
        run = torch.compile(student, fullgraph=True) if compiled else student
        providers[name] = {"step": make_step(run, teacher, opt, x, sync, args.precision),
                           "bytes": None if compiled else saved_bytes(student, teacher, x), "times": [],
                           "compile_s": None}
        if compiled:  # the first call compiles forward and backward
            t0 = time.perf_counter()
            providers[name]["step"]()
            providers[name]["compile_s"] = time.perf_counter() - t0
    for p in providers.values():
        for _ in range(args.warmup):
            p["step"]()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(args.rounds):  # interleaved: shared-machine noise hits every provider alike
        for p in providers.values():
            t0 = clock()
            p["step"]()
            p["times"].append(clock() - t0)

    if not args.no_launches:
        for p in providers.values():
            p["launches"] = count_launches(p["step"], device)

    fp_t = statistics.median(providers["fp"]["times"])
    fp_b = providers["fp"]["bytes"]
    rows = []
    for name, p in providers.items():
        med = statistics.median(p["times"])
        q = statistics.quantiles(p["times"], n=5) if len(p["times"]) >= 2 else [med] * 4
        b = p["bytes"]
        rows.append({"provider": name, "median_ms": med * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[-1] * 1e3,
                     "saved_MiB": None if b is None else b / 2**20, "time_vs_fp": med / fp_t,
                     "bytes_vs_fp": None if b is None else b / fp_b, "compile_s": p["compile_s"],
                     "epochs_per_hour": epochs_per_hour(med * 1e3, steps_per_epoch),
                     "launches": p.get("launches")})

    record = {
        "bench": "qat_step", "model": model_name, "batch": args.batch, "input": [3, 32, 32],
        "rounds": args.rounds, "clock": args.clock, "steps_per_epoch": steps_per_epoch, "precision": args.precision, "channels_last": bool(args.channels_last),
        "argv": argv if argv is not None else sys.argv[1:], "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "backend": os.environ.get("GDNSQ_BACKEND", "auto"),
        "torch": torch.__version__, "gdnsq": gdnsq.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
    }
    try:
        import triton
        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None

    lines = [f"{'provider':<14} {'median ms':>10} {'p20-p80 ms':>16} {'saved MiB':>10} {'time/FP':>8} {'bytes/FP':>9} "
             f"{'epochs/h':>9}"]
    for r in rows:
        saved = "-" if r["saved_MiB"] is None else f"{r['saved_MiB']:.1f}"
        ratio = "-" if r["bytes_vs_fp"] is None else f"{r['bytes_vs_fp']:.3f}"
        lines.append(f"{r['provider']:<14} {r['median_ms']:>10.1f} {r['p20_ms']:>7.1f}-{r['p80_ms']:<8.1f} "
                     f"{saved:>10} {r['time_vs_fp']:>8.2f} {ratio:>9} {r['epochs_per_hour']:>9.1f}"
                     + (f"   (compile {r['compile_s']:.1f} s)" if r["compile_s"] is not None else ""))
    for r in rows:
        if r["launches"]:
            lines.append(f"launches per step, {r['provider']}: {launches_text(r['launches'])}")
    print("\n".join(lines))

    if args.breakdown:
        rows = breakdown(providers["gdnsq"]["step"], 4, clock)
        print(f"\n--- gdnsq step, piece by piece ({args.clock} clock, 4 steps) ---")
        for label, ms, n in rows:
            print(f"{label:<52} {ms:8.1f} ms/step  ({n} calls)")
        record_breakdown = [{"piece": label, "ms_per_step": ms, "calls_per_step": n} for label, ms, n in rows]
    else:
        record_breakdown = None

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name in ("fp", "gdnsq"):
            with profile(activities=acts) as prof:
                for _ in range(3):
                    providers[name]["step"]()
            print(f"\n--- {name} (3 steps) ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    if record_breakdown is not None:
        record["breakdown"] = record_breakdown
    if not args.no_save:
        os.makedirs(args.out_dir, exist_ok=True)
        jsonl = os.path.join(args.out_dir, "qat_step.jsonl")
        atomic_append_text(jsonl, json.dumps(record) + "\n")
        with open(jsonl, encoding="utf-8") as f:
            atomic_write_text(os.path.join(args.out_dir, "qat_step.md"), markdown(record, f.read()))
    return record


if __name__ == "__main__":
    main()
