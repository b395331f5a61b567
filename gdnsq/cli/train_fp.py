"""``gdnsq train-fp``: train the full-precision teacher from scratch (SGD, cosine LR)."""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Optional

import torch

from .. import data as gdata
from .._atomic import atomic_write_text
from ..models import fit_state_dict, get_model, load_fp_checkpoint, read_checkpoint, save_fp_checkpoint
from ..train.loop import train_epoch
from ..train.progress import progress_bar
from ._support import (CliError, add_subcommand, check_run_folder, evaluate_model, log as _log, nonneg_int,
                       positive_float, positive_int, resolve_device)

__all__ = ["train_fp", "cmd_train_fp", "add_parser"]


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

    The batches run through :func:`gdnsq.train.loop.train_epoch`, the loop the GDNSQ trainer uses;
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
                   normalization=args.normalization, seed=0 if args.seed is None else args.seed, device=device,
                   data_dir=args.data_dir, max_minutes=args.max_minutes, nesterov=args.nesterov,
                   progress=not args.json)
    if rep.get("test_top1") is not None:
        human = (f"FP {args.model}: test top-1 {rep['test_top1']:.2f} % (best val "
                 f"{rep['best_val_top1']}), checkpoint {rep['checkpoint']}, report {rep['report']}")
    else:
        human = (f"FP {args.model}: {rep['epochs_done']}/{rep['epochs']} epochs done; rerun the "
                 f"same command to continue ({args.out})")
    return {"result": rep, "human": human}


def add_parser(subparsers) -> None:
    """Add ``train-fp`` to the ``gdnsq`` subparsers."""
    t = add_subcommand(subparsers, "train-fp", "train the full-precision teacher from scratch")
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
