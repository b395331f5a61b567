"""``gdnsq quantize``: GDNSQ fine-tuning of an FP checkpoint to W/A bits (the main command).

Training configuration (every :class:`gdnsq.train.presets.TrainConfig` field), lowest precedence
first: the ``--preset``; the ``--config FILE`` (YAML or JSON mapping of field names to values);
each ``--set field=value``; the explicit flags (``--lr``, ``--epochs``, ``--seed``,
``--device``...). The resolved configuration and where each value came from are recorded in
``run.json`` and in ``report.json`` (``config`` and ``config["extra"]["cli"]``).
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import List

from .. import data as gdata
from .._atomic import atomic_write_text
from ..models import MODELS, get_model, load_fp_checkpoint
from ..schedule import ANNEAL_SHAPES
from ._support import (CliError, RUN_FILE, act_bits_arg, add_subcommand, bits_arg, check_run_folder,
                       checkpoint_file, log as _log, nonneg_float, nonneg_int, number_arg, positive_float,
                       positive_int, resolve_device, usage_errors)
from .train_fp import train_fp

__all__ = ["cmd_quantize", "resolve_train_config", "headline", "print_summary", "add_parser"]

_anneal_factor = number_arg(float, "a per-batch factor in (0, 1]", lambda v: 0 < v <= 1)

# quantize flags that override TrainConfig fields one to one: (flag dest, config field)
_SCHEDULE_FLAGS = (("epochs", "max_epochs"), ("max_minutes", "max_minutes"), ("batch_size", "batch_size"),
                   ("estimator", "estimator"), ("lr", "lr"), ("quantizer_lr_scale", "quantizer_lr_scale"),
                   ("t_scale", "t_scale"), ("warmup_steps", "warmup_steps"), ("anneal", "anneal"),
                   ("anneal_shape", "anneal_shape"),
                   ("hold_epochs", "hold_epochs"), ("patience", "patience"), ("val_every", "val_every"),
                   ("precision", "precision"), ("channels_last", "channels_last"), ("seed", "seed"),
                   ("start_bits", "start_bits"), ("start_grid", "start_grid"),
                   ("label_weight", "label_weight"), ("distill_temperature", "distill_temperature"))


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


def print_summary(student, example, quiet: bool) -> None:
    """The placement and bits table (``gdnsq.summary``) of ``student`` on ``example`` (one
    input, e.g. (1, 3, 32, 32)) on stderr; nothing when ``quiet`` (``--json``)."""
    if quiet:
        return
    from ..model_summary import summary

    _log(str(summary(student, example)))


def cmd_quantize(args) -> dict:
    import torch

    from .. import convert
    from ..train import distributed as gdist, presets
    from ..calibrate import calibrate
    from ..train.checkpoint import load_checkpoint
    from ..train.trainer import Trainer

    # Everything the user named is checked before any work (data, teacher, training).
    out = check_run_folder("--out", args.out)
    cfg, sources = resolve_train_config(args)
    ckpt = checkpoint_file("--checkpoint", args.checkpoint, names=("checkpoint_best.pt",),
                           what="the FP teacher checkpoint file or a `gdnsq train-fp` run folder") \
        if args.checkpoint else None
    teacher_ckpt = checkpoint_file("--teacher", args.teacher, names=("checkpoint_best.pt",),
                                   what="an FP checkpoint file or a `gdnsq train-fp` run folder") \
        if args.teacher else None
    init_from = checkpoint_file("--init-from", args.init_from,
                                what="a `gdnsq quantize` run folder or its checkpoint") \
        if args.init_from else None
    run = {"model": args.model, "dataset": args.dataset, "weight_bits": args.weight_bits,
           "act_bits": args.act_bits}
    _check_run_json(out, run)
    if args.resume_from is not None:
        _restore_snapshot(args.resume_from, out, run)
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
                "distillation_teacher": None if teacher_ckpt is None else str(teacher_ckpt),
                "command": command, "quantize_kwargs": {}})
    out.mkdir(parents=True, exist_ok=True)
    if gdist.is_main():
        atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2) + "\n")

    # with --teacher the student's own FP copy is not needed, so none is made
    student = convert.quantize_model(model, args.weight_bits, args.act_bits, teacher=teacher_ckpt is None)
    if teacher_ckpt is None:
        teacher = convert.teacher_of(student)
    else:
        teacher, teacher_name = _load_teacher(teacher_ckpt, args.teacher_model, num_classes, norm)
        cfg.extra = dict(cfg.extra, distillation_teacher={"path": str(teacher_ckpt), "model": teacher_name})
        if gdist.is_main():
            _log(f"distilling from {teacher_name} ({teacher_ckpt}); the student starts from {ckpt}")
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
    calibrate(student.to(device), calib, bits=cfg.start_bits, grid=cfg.start_grid)
    if gdist.is_main():
        # the shape of one image is all the summary needs (iterating the loader would move it)
        example = torch.zeros((1,) + tuple(calib.images.shape[1:]), device=device)
        print_summary(student, example, quiet=args.json)
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
    report = trainer.fit()
    paused = trainer.stop_reason == "max_minutes"
    if not paused:
        # The test set is read once, when the run has ended (never for a paused segment).
        report = trainer.test(loaders["test"])
    if not gdist.is_main():
        args.quiet = True
    if dist_info.world_size > 1:
        gdist.cleanup()
    report_md = out / "report.md"
    summary = {k: report[k] for k in report if not isinstance(report[k], (dict, list))}
    summary.update(report=str(out / "report.json"), report_md=str(report_md), out=str(out))
    if paused:
        human = (f"GDNSQ {args.model}: paused by --max-minutes after epoch {report.get('epochs_run')} "
                 f"({_selection_of(report)}); the test set is not read until the run ends; "
                 f"rerun the same command to continue")
        return {"result": summary, "human": human}
    return {"result": summary, "human": f"{headline(args.model, report)}; report: {report_md}"}


def _restore_snapshot(path_text: str, out: pathlib.Path, run: dict) -> None:
    """``--resume-from FILE``: restore a ``gdnsq snapshot`` into ``--out`` unless that folder
    already holds the same or a later epoch; a snapshot of another run is refused."""
    from ..train.snapshot import read_snapshot, restore_snapshot

    path = pathlib.Path(path_text)
    if not path.is_file():
        raise CliError(f"--resume-from: file not found: {path}")
    with usage_errors("--resume-from"):
        snap_run = read_snapshot(path)["run"]
    if snap_run is not None:
        old = json.loads(snap_run)
        for key in ("model", "dataset", "weight_bits", "act_bits"):
            if old.get(key) != run[key]:
                raise CliError(f"--resume-from {path}: a snapshot of a run with {key}={old.get(key)!r}, "
                               f"not {run[key]!r}")
    with usage_errors("--resume-from"):
        epoch = restore_snapshot(path, out)
    if epoch is not None:
        _log(f"restored {path} into {out} (after epoch {epoch})")
    else:
        _log(f"--resume-from {path}: {out} already holds that epoch or a later one; continuing it")


def _load_teacher(path: pathlib.Path, model_name, num_classes: int, normalization: str):
    """``--teacher``: the FP model the student is distilled from, frozen in eval mode.

    Its architecture is ``--teacher-model`` or read from the checkpoint (a CIFAR ResNet's block
    count); it must expect the student's input normalisation, since both see the same batches.
    Returns ``(teacher, architecture name)``."""
    from ..models import extract_state_dict, infer_model_name, read_checkpoint

    with usage_errors("--teacher"):
        obj = read_checkpoint(path)
        name = model_name or infer_model_name(extract_state_dict(obj))
        teacher = get_model(name, num_classes)
        meta = load_fp_checkpoint(teacher, obj)
    if meta["normalization"] != normalization:
        raise CliError(f"--teacher {path}: expects {meta['normalization']!r} input normalisation, "
                       f"the student {normalization!r}; both see the same batches, so they must agree")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, name


def _selection_of(report: dict) -> str:
    """``"selected epoch E, val top-1 V %"`` or ``"not converged yet"`` for a paused run."""
    if not report.get("converged") and report.get("first_converged_epoch") is None:
        return "not converged yet"
    val = report.get("val_top1")
    val_text = "" if val is None else f", val top-1 {val:.2f} %"
    return f"selected epoch {report.get('selected_epoch')}{val_text}"



def add_parser(subparsers) -> None:
    """Add ``quantize`` to the ``gdnsq`` subparsers."""
    q = add_subcommand(subparsers, "quantize", "GDNSQ fine-tuning of an FP checkpoint to W/A bits")
    q.add_argument("--checkpoint", default=None,
                   help="FP teacher checkpoint (akamaster .th or gdnsq train-fp); without it a "
                        "teacher is trained first into OUT/teacher")
    q.add_argument("--weight-bits", type=bits_arg, required=True, help="target weight bits (1-16)")
    q.add_argument("--act-bits", type=act_bits_arg, required=True,
                   help="target activation bits (1-16), or 32 / none for float activations")
    q.add_argument("--out", required=True, help="run folder (checkpoints, metrics, report)")
    q.add_argument("--preset", default="cpu-fast", choices=["paper", "cpu-fast", "cpu-8ep", "cpu-long"],
                   help="hyper-parameters (default cpu-fast; cpu-8ep = 8 epochs with a cosine LR and "
                        "distillation at temperature 4, the recipe that beat a plain LSQ fine-tune; "
                        "cpu-long = the slower descent and long hold for a 1-3 hour CPU run; paper = "
                        "the authors' CIFAR recipe)")
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
    sched.add_argument("--anneal-shape", choices=list(ANNEAL_SHAPES), default=None,
                       help="exponential: LR x anneal per batch (the paper's, default); cosine: the LR "
                            "falls along a half cosine to 0 at the end of --epochs (a fixed budget)")
    sched.add_argument("--hold-epochs", type=nonneg_int, default=None,
                       help="epochs at full LR after the first convergence before annealing")
    sched.add_argument("--patience", type=positive_int, default=None,
                       help="validations without improvement (after the hold) before stopping")
    sched.add_argument("--val-every", type=positive_int, default=None, help="validate every N epochs")
    sched.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                       help="training step precision (default auto: bf16 where the CPU/GPU runs it "
                            "natively, else fp32; bf16: autocast per step, quantizers stay fp32)")
    sched.add_argument("--channels-last", action="store_const", const=True, default=None,
                       help="NHWC memory format for the models and batches")
    sched.add_argument("--start-bits", type=positive_float, default=None,
                       help="bit-width every quantizer starts at (default 10, the paper's; a lower "
                            "start shortens the descent of a short run)")
    sched.add_argument("--start-grid", choices=["minmax", "mse"], default=None,
                       help="activation clamp at the start: min/max of the calibration inputs "
                            "(default) or the MSE-optimal clamp at --start-bits")
    sched.add_argument("--label-weight", type=nonneg_float, default=None, metavar="W",
                       help="add W x cross-entropy on the training labels to the distillation loss "
                            "(default 0: pure Jeffreys distillation, the paper's)")
    sched.add_argument("--distill-temperature", type=positive_float, default=None, metavar="T",
                       help="temperature of the Jeffreys distillation, scaled by T^2 (default 1, the "
                            "paper's; 4 softens a teacher that is nearly certain on its training images)")
    q.add_argument("--resume-from", default=None, metavar="FILE",
                   help="a `gdnsq snapshot` of this run (e.g. committed from another machine): "
                        "restored into --out unless --out holds the same or a later epoch")
    q.add_argument("--teacher", default=None, metavar="PATH",
                   help="distil from this FP checkpoint (e.g. a larger model) instead of the "
                        "student's own FP copy; the student still starts from --checkpoint")
    q.add_argument("--teacher-model", default=None, choices=sorted(MODELS),
                   help="architecture of --teacher (default: read from the checkpoint)")
    q.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="start from the student of an earlier quantize run (a chained stage, "
                        "e.g. 4 -> 2 -> 1 bits) with a fresh optimizer and schedule")
    q.add_argument("--teacher-epochs", type=positive_int, default=200,
                   help="epochs of the FP teacher trained when --checkpoint is absent "
                        "(SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine; default 200)")
    q.add_argument("--teacher-batch-size", type=positive_int, default=128,
                   help="batch size of that teacher training (default 128)")
    q.set_defaults(func=cmd_quantize)
