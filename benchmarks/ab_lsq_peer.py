"""GDNSQ against a plain LSQ-style fine-tune (Brevitas) at an equal budget, side by side.

Both arms start from the same FP ResNet-20 checkpoint and see the same CIFAR-10 split (the last
5,000 training images held out for selection), the same augmentation and shuffling (gdnsq's
loaders, seed 0), batch 128 and the same number of epochs; each selects its best validation
epoch (gdnsq: among converged epochs) and reads the test set once.

* ``--arm gdnsq``: ``gdnsq quantize`` with the recipe flags given after ``--`` (default: the
  ``cpu-fast`` preset); Jeffreys distillation from the FP model.
* ``--arm brevitas``: the peer a CNN user would pick. Brevitas ``QuantConv2d`` for the same
  layers gdnsq quantizes (every conv but the first; the classifier stays FP), weights per output
  channel and input activations per tensor (unsigned) at the target bits, scales learned
  (LSQ-style ``PARAMETER_FROM_STATS``) from an MSE initialisation, activation scales calibrated
  on 8 batches; cross-entropy on the labels, Adam, per-batch cosine LR to 0, quantized from the
  first step. Brevitas is installed for this benchmark only (it pins its own torch: use a
  separate venv with ``pip install --no-deps brevitas dependencies unfoldNd``).

Run the two arms in parallel, one core each, then summarise::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/ab_lsq_peer.py --arm brevitas --out runs/peer_w2a2
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/ab_lsq_peer.py --arm gdnsq --out runs/gdnsq_w2a2 \\
        -- --preset cpu-fast --estimator aewgs
    python benchmarks/ab_lsq_peer.py --summarize runs/peer_w2a2 runs/gdnsq_w2a2

Each arm writes ``OUT/ab_result.json``; ``--summarize`` appends one record per arm (with the
machine, its CPU flags and load) to ``benchmarks/results/ab_lsq_peer.jsonl`` and rewrites
``benchmarks/results/ab_lsq_peer.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gdnsq import data as gdata  # noqa: E402
from gdnsq._atomic import atomic_append_text, atomic_write_text  # noqa: E402
from gdnsq.models import get_model, load_fp_checkpoint  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CHECKPOINT = REPO.parent / "shared" / "models" / "resnet20_cifar10_akamaster.th"
RESULT_FILE = "ab_result.json"


def machine() -> dict:
    """CPU model, the flags that decide the kernels, threads and the 1-minute load."""
    flags = set()
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="ignore"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    keep = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    return {"cpu": model, "flags": keep, "threads": torch.get_num_threads(),
            "load_1min": os.getloadavg()[0], "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------
# the Brevitas arm
# ----------------------------------------------------------------------------------------------

def brevitas_student(fp_model: nn.Module, bits: int) -> nn.Module:
    """A copy of ``fp_model`` whose convolutions, except the first, are Brevitas QuantConv2d with
    ``bits``-bit per-channel weights and ``bits``-bit unsigned per-tensor inputs (LSQ-style
    learned scales, MSE-initialised); the FP weights are copied in."""
    import copy

    if not hasattr(torch.Tensor, "rename"):
        # Brevitas 0.13 strips tensor names with Tensor.rename(None); torch 2.13 dropped named
        # tensors, and no tensor here has names, so the call is an identity.
        torch.Tensor.rename = lambda self, *names, **rename_map: self
    from brevitas.nn import QuantConv2d
    from brevitas.quant import Int8WeightPerChannelFloatMSE, Uint8ActPerTensorFloatMSE

    class WeightQuant(Int8WeightPerChannelFloatMSE):
        bit_width = bits

    class InputQuant(Uint8ActPerTensorFloatMSE):
        bit_width = bits

    student = copy.deepcopy(fp_model)
    convs = [(n, m) for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs[1:]:
        q = QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                        padding=conv.padding, bias=conv.bias is not None,
                        weight_quant=WeightQuant, input_quant=InputQuant, return_quant_tensor=False)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        parent = student.get_submodule(name.rpartition(".")[0]) if "." in name else student
        setattr(parent, name.rpartition(".")[2], q)
    return student


def evaluate(model: nn.Module, loader) -> float:
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            n += y.numel()
    return 100.0 * correct / n


def run_brevitas(args) -> dict:
    from brevitas.graph.calibrate import calibration_mode

    torch.manual_seed(args.seed)
    fp = get_model("resnet20")
    norm = load_fp_checkpoint(fp, args.checkpoint)["normalization"]
    loaders = gdata.build_loaders("cifar10", batch_size=args.batch_size, val_size=5000,
                                  normalization=norm, seed=args.seed)
    student = brevitas_student(fp, args.bits)
    student.eval()
    with torch.no_grad(), calibration_mode(student):
        for i, (x, _) in enumerate(loaders["train"]):
            if i == 8:
                break
            student(x)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    steps = args.epochs * len(loaders["train"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    best_val, best_epoch, history = -1.0, None, []
    t0 = time.monotonic()
    step_seconds = []
    for epoch in range(1, args.epochs + 1):
        loaders["train"].set_epoch(epoch - 1)
        student.train()
        for x, y in loaders["train"]:
            ts = time.monotonic()
            loss = F.cross_entropy(student(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_seconds.append(time.monotonic() - ts)
        val = evaluate(student, loaders["val"])
        history.append({"epoch": epoch, "val_top1": val, "train_loss_last": float(loss)})
        print(f"brevitas epoch {epoch}: val {val:.2f}", flush=True)
        if val > best_val:
            best_val, best_epoch = val, epoch
            torch.save(student.state_dict(), out / "best.pt")
    wall = time.monotonic() - t0
    student.load_state_dict(torch.load(out / "best.pt", weights_only=True))
    test = evaluate(student, loaders["test"])
    step_seconds.sort()
    return {"arm": "brevitas", "test_top1": test, "val_top1": best_val, "selected_epoch": best_epoch,
            "epochs": args.epochs, "wall_seconds": wall, "median_step_seconds": step_seconds[len(step_seconds) // 2],
            "history": history, "recipe": f"Brevitas LSQ-style W{args.bits}A{args.bits}, CE, Adam lr {args.lr}, "
                                          "cosine, MSE init, 8 calibration batches"}


# ----------------------------------------------------------------------------------------------
# the gdnsq arm
# ----------------------------------------------------------------------------------------------

def run_gdnsq(args, recipe_flags) -> dict:
    from gdnsq import cli

    argv = ["quantize", "--checkpoint", str(args.checkpoint), "--weight-bits", str(args.bits),
            "--act-bits", str(args.bits), "--epochs", str(args.epochs), "--batch-size",
            str(args.batch_size), "--seed", str(args.seed), "--out", str(args.out), "--json",
            *(recipe_flags or ["--preset", "cpu-fast"])]
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"gdnsq quantize failed with exit code {code}")
    rep = json.loads((pathlib.Path(args.out) / "report.json").read_text())
    epochs = [json.loads(line) for line in open(pathlib.Path(args.out) / "metrics.jsonl")
              if '"kind": "epoch"' in line]
    return {"arm": "gdnsq", "test_top1": rep["test_top1"], "val_top1": rep["val_top1"],
            "selected_epoch": rep["selected_epoch"], "epochs": rep["epochs_run"],
            "wall_seconds": rep["wall_seconds"], "converged": rep["converged"],
            "first_converged_epoch": rep["first_converged_epoch"],
            "history": [{"epoch": r["epoch"], "val_top1": r["val_top1"], "mean_weight_bits": r["mean_weight_bits"]}
                        for r in epochs],
            "recipe": "gdnsq quantize " + " ".join(recipe_flags or ["--preset", "cpu-fast"])}


# ----------------------------------------------------------------------------------------------

def summarize(run_dirs) -> None:
    records = [json.loads((pathlib.Path(d) / RESULT_FILE).read_text()) for d in run_dirs]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_append_text(RESULTS / "ab_lsq_peer.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    print(write_table())


def write_table() -> str:
    """Rewrite ``ab_lsq_peer.md`` from every record of ``ab_lsq_peer.jsonl``; return the table."""
    every = [json.loads(line) for line in open(RESULTS / "ab_lsq_peer.jsonl", encoding="utf-8")]
    lines = ["# gdnsq vs a plain LSQ-style fine-tune (Brevitas), equal epochs",
             "", "Written by `python benchmarks/ab_lsq_peer.py --summarize ...` (see its docstring).", "",
             "| date | arm | recipe | seed | epochs | test top-1 | val top-1 (selected epoch) | wall time | CPU, load |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    for r in every:
        # records written before the seed was recorded all ran with the default seed 0
        lines.append(f"| {r['date']} | {r['arm']} | {r['recipe']} | {r.get('seed', 0)} | {r['epochs']} | {r['test_top1']:.2f} | "
                     f"{r['val_top1']:.2f} ({r['selected_epoch']}) | {r['wall_seconds'] / 60:.0f} min | "
                     f"{r['machine']['cpu']}, {r['machine']['threads']} thread(s), load {r['machine']['load_1min']:.1f} |")
    atomic_write_text(RESULTS / "ab_lsq_peer.md", "\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=["gdnsq", "brevitas"])
    p.add_argument("--out", help="run folder of this arm")
    p.add_argument("--summarize", nargs="+", metavar="RUN_DIR", help="record the arms' results")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Brevitas arm: Adam LR")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(own)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if not args.arm or not args.out:
        p.error("--arm and --out are required (or --summarize)")
    result = run_brevitas(args) if args.arm == "brevitas" else run_gdnsq(args, recipe)
    result.update(date=time.strftime("%Y-%m-%d"), seed=args.seed, machine=machine())
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(pathlib.Path(args.out) / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
