"""Where a GDNSQ training epoch goes, and epochs per hour at one and two threads.

Runs the real :class:`gdnsq.Trainer` training step (ResNet-20 from the FP checkpoint, CIFAR-10
loaders with their augmentation, the chosen preset and precision) for ``--steps`` batches and
splits each step's wall time into phases by timing the modules the step calls:

* ``data``: producing the batch (shuffle, random crop + flip, normalisation, layout);
* ``teacher``: the FP teacher's forward (no_grad);
* ``student``: the student's forward (quantizers included);
* ``loss``: Jeffreys divergence + penalty (the objective);
* ``backward``: ``loss.backward()``;
* ``optimizer``: RAdam step + schedule step;
* ``other``: the rest of the step (LR writes, bookkeeping, metrics).

It then times one validation pass (the 5,000 held-out images) and derives the epoch time
(``batches_per_epoch`` steps + one validation every ``val_every`` epochs) and epochs per hour.
Each ``--threads`` value runs in its own process (torch's thread pool is fixed per process).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/profile_epoch.py --threads 1
    taskset -c 0,1 python benchmarks/profile_epoch.py --threads 2

Results: appended to ``benchmarks/results/epoch_profile.jsonl`` (with the CPU flags and the
1-minute load: a load above the thread count means another job shared the cores) and the latest
run written to ``benchmarks/results/epoch_profile.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gdnsq import data as gdata  # noqa: E402
from gdnsq._atomic import atomic_append_text, atomic_write_text  # noqa: E402
from gdnsq.calibrate import calibrate  # noqa: E402
from gdnsq.convert import quantize_model, teacher_of  # noqa: E402
from gdnsq.models import get_model, load_fp_checkpoint  # noqa: E402
from gdnsq.train.presets import get_preset  # noqa: E402
from gdnsq.train.trainer import Trainer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CHECKPOINT = REPO.parent / "shared" / "models" / "resnet20_cifar10_akamaster.th"
PHASES = ("data", "teacher", "student", "loss", "backward", "optimizer", "other")


class PhaseClock:
    """Accumulates seconds per phase; ``wrap(obj, name, phase)`` times calls of ``obj.name``."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, obj, name: str, phase: str) -> None:
        """Replace attribute ``name`` of ``obj`` (a method, or a callable object such as the
        trainer's objective) with a timed call of it."""
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        setattr(obj, name, timed)

    @contextmanager
    def timing_backward(self):
        original = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.seconds["backward"] += time.perf_counter() - t0

        torch.Tensor.backward = backward
        try:
            yield
        finally:
            torch.Tensor.backward = original


class FirstBatches:
    """The first ``n`` batches of ``loader``, with the time spent producing them recorded."""

    def __init__(self, loader, n: int, clock: PhaseClock):
        self.loader, self.n, self.clock = loader, n, clock

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.n):
            t0 = time.perf_counter()
            batch = next(it)
            self.clock.seconds["data"] += time.perf_counter() - t0
            yield batch


def cpu_info() -> dict:
    flags, model = set(), ""
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="ignore"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))}


def profile(args) -> dict:
    torch.set_num_threads(args.threads)
    fp = get_model("resnet20")
    norm = load_fp_checkpoint(fp, args.checkpoint)["normalization"]
    cfg = get_preset(args.preset, precision=args.precision, channels_last=args.channels_last,
                     estimator=args.estimator, progress=False, device="cpu", max_epochs=1)
    loaders = gdata.build_loaders("cifar10", batch_size=cfg.batch_size, val_size=5000,
                                  normalization=norm, seed=0, with_test=False, progress=None)
    student = quantize_model(fp, args.bits, args.bits)
    if args.teacher:
        from gdnsq.models import extract_state_dict, infer_model_name, read_checkpoint

        teacher = get_model(infer_model_name(extract_state_dict(read_checkpoint(args.teacher))))
        load_fp_checkpoint(teacher, args.teacher)
        teacher.eval().requires_grad_(False)
    else:
        teacher = teacher_of(student)
    calibrate(student, loaders["val"])
    clock = PhaseClock()
    warm = FirstBatches(loaders["train"], args.warmup, PhaseClock())
    timed = FirstBatches(loaders["train"], args.steps, clock)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(student, teacher, warm, loaders["val"], config=cfg, out_dir=out)
        trainer._train_epoch(1)  # warm-up: oneDNN kernel choice, extension loading
        t0 = time.perf_counter()
        trainer.evaluate(loaders["val"])  # before the wrappers: eval forwards are not steps
        val_seconds = time.perf_counter() - t0
        trainer.train_loader = timed
        clock.wrap(trainer.teacher, "forward", "teacher")
        clock.wrap(trainer.train_module, "forward", "student")
        clock.wrap(trainer, "objective", "loss")
        clock.wrap(trainer.optimizer, "step", "optimizer")
        clock.wrap(trainer.schedule, "step", "optimizer")
        with clock.timing_backward():
            t0 = time.perf_counter()
            trainer._train_epoch(2)
            total = time.perf_counter() - t0
    clock.seconds["other"] = max(total - sum(v for k, v in clock.seconds.items() if k != "other"), 0.0)
    step = total / args.steps
    batches = len(loaders["train"])
    epoch = batches * step + val_seconds / cfg.val_every
    return {"date": time.strftime("%Y-%m-%d %H:%M"), **cpu_info(), "threads": args.threads,
            "load_1min": os.getloadavg()[0], "torch": torch.__version__, "preset": args.preset,
            "precision": trainer.precision, "channels_last": args.channels_last, "bits": args.bits,
            "estimator": args.estimator, "teacher": args.teacher or "own FP copy", "batch_size": cfg.batch_size, "steps": args.steps,
            "step_ms": 1000 * step, "phase_ms": {k: 1000 * v / args.steps for k, v in clock.seconds.items()},
            "validation_s": val_seconds, "val_every": cfg.val_every, "batches_per_epoch": batches,
            "epoch_s": epoch, "epochs_per_hour": 3600.0 / epoch}


def markdown(rows) -> str:
    lines = ["# Where a GDNSQ training epoch goes (ResNet-20, CIFAR-10)", "",
             "Written by `python benchmarks/profile_epoch.py` (see its docstring). Per training step, "
             "milliseconds; epoch = batches x step + validation / val_every.", "",
             "| date | threads | load | precision, layout | step ms | " + " | ".join(PHASES)
             + " | validation s | epoch s | epochs / hour |",
             "|---|---:|---:|---|---:|" + "---:|" * len(PHASES) + "---:|---:|---:|"]
    for r in rows:
        layout = "channels_last" if r["channels_last"] else "NCHW"
        lines.append(f"| {r['date']} | {r['threads']} | {r['load_1min']:.1f} | {r['precision']}, {layout} | "
                     f"{r['step_ms']:.0f} | " + " | ".join(f"{r['phase_ms'][p]:.0f}" for p in PHASES)
                     + f" | {r['validation_s']:.1f} | {r['epoch_s']:.0f} | {r['epochs_per_hour']:.1f} |")
    rows and lines.append(f"\nCPU: {rows[-1]['cpu']}; flags {', '.join(rows[-1]['flags'])}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=30, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--preset", default="cpu-long")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--estimator", default="aewgs", choices=["ste", "aewgs"])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="distil from this FP checkpoint (e.g. the ResNet-56) instead of the student's "
                        "own FP copy, as `gdnsq quantize --teacher`")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child or len(args.threads) == 1:
        args.threads = args.threads[0]
        rows = [profile(args)]
    else:
        import subprocess
        rows = []
        for n in args.threads:
            # one process per thread count: torch's intra-op pool is sized once per process
            cmd = [sys.executable, __file__, "--child", "--no-save", "--threads", str(n),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--preset", args.preset,
                   "--precision", args.precision, "--estimator", args.estimator, "--bits", str(args.bits),
                   "--checkpoint", args.checkpoint] + (["--channels-last"] if args.channels_last else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(n)))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(json.dumps(r))
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_append_text(RESULTS / "epoch_profile.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(RESULTS / "epoch_profile.md", markdown(rows))
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
