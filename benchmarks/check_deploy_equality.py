"""Whole-test-set check that a frozen ResNet-20 predicts exactly what its fake-quant model does.

For each bit-width b in --bits (default 1 2 4):

1. the akamaster FP ResNet-20 (``../shared/models/resnet20_cifar10_akamaster.th``) is converted
   with ``gdnsq.quantize_model`` (default placement: first conv, classifier FP) and calibrated
   (``gdnsq.calibrate``, 10 bits, on --calib-batches batches of the validation split = the last
   5,000 training images; never the test set);
2. every quantizer is then set to b bits: weights ``s_c = range_c / (2**b - 1)``; activations
   offset = calibrated offset, clamp top = the 99.9th percentile of the layer's input on one
   validation batch, ``log2_range = log2_step + b`` (so exactly 2**b levels);
3. the model is frozen twice, each saved and reloaded through an artifact: "integer" (the
   default freeze: binary ops for W1A1, else int or bit-plane as measured) and "float"
   (``path="float"``: float32 conv of the dequantized codes), and all three models run on the
   full CIFAR-10 test set (10,000 images) in eval mode; on the CPU the "integer" artifact also
   runs on the fused runtime (``gdnsq.deploy.runtime``, variant "runtime", compared with the
   exact fake-quant model).

Written to --out (default results/deploy_equality.json): per bit-width the fake-quant and
deployed top-1 and, per frozen variant, the number of images whose top-1 differs from the
fake-quant model's, the max relative error of the logits
(max |deployed - fake_quant| / max |fake_quant| per image, maxed over images), the per-layer
relative error of each deployed layer on its fake-quant input (first test batch), the layer
paths and the time of each pass.

    python benchmarks/check_deploy_equality.py                 # ~5 min on 2 CPU cores
    python benchmarks/check_deploy_equality.py --limit 1000    # quick look

Other modes (each writes its own --out):

* ``--run RUN_DIR ...``: trained ``gdnsq quantize`` run folders (their selected checkpoint, bits
  from run.json) instead of the calibrated --bits models (results/deploy_equality_trained.json).
* ``--artifacts [FILE ...]``: deployed files; without FILE every committed student
  ``results/*/model.gdnsq``. Each is loaded with ``gdnsq.deploy.load`` and run through its
  normal forward (the default fast path), against the exact fake-quant model rebuilt from the
  same file (:func:`fake_quant_from_artifact`: the file's float tensors, each deployed layer as a
  QConv2d/QLinear whose latent weight is its dequantized weight ``min + step * k``, weight step
  ``2**log2_step`` equal to the stored step bit for bit, activation quantizer parameters as
  stored; such a layer quantizes to exactly the stored codes), on the CIFAR-10 test set
  (--limit for a part): differing top-1 predictions, max relative logit error, both top-1s and
  the top-1 of the run's report.json (results/deploy_equality_artifacts.json).
* ``--archs [resnet18 mobilenet_v2 bert]``: the architectures of benchmarks/_arch_full.py
  (ResNet-18 and MobileNetV2 at 224x224, the BERT-base-sized encoder; ``--scale small`` for
  tiny versions), calibrated on random data and set to each --bits, on one random batch of
  --arch-batch inputs: the deployed model (freeze -> save -> load, default path) at each
  --threads value against ``gdnsq.set_exact_inference(True)`` fake-quant (differing predictions,
  max relative logit error) (results/deploy_equality_archs.json).

    python benchmarks/check_deploy_equality.py --artifacts                 # all committed students
    python benchmarks/check_deploy_equality.py --artifacts --limit 500     # quick look
    python benchmarks/check_deploy_equality.py --archs                     # ~10 min on one core
    python benchmarks/check_deploy_equality.py --archs --scale small --arch-batch 2   # seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdnsq import data as gdata  # noqa: E402
from gdnsq._atomic import atomic_write_text  # noqa: E402
from gdnsq.calibrate import calibrate  # noqa: E402
from gdnsq.convert import quantize_model  # noqa: E402
from gdnsq.deploy import deployed_layers, freeze, layer_table, read_artifact  # noqa: E402
from gdnsq.layers import QConv2d, QLinear, set_exact_inference  # noqa: E402
from gdnsq.models import get_model, load_fp_checkpoint  # noqa: E402

_CKPT = pathlib.Path("shared") / "models" / "resnet20_cifar10_akamaster.th"
# a worktree sits one folder deeper than the main checkout: ../shared, else ../../shared
DEFAULT_CKPT = next((p for p in (ROOT.parent / _CKPT, ROOT.parent.parent / _CKPT) if p.is_file()), ROOT.parent / _CKPT)


def quantized(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_quantizer")]


@torch.no_grad()
def set_bits(student, batch, bits: int, quantile: float = 0.999) -> None:
    """Set every quantizer of the calibrated ``student`` to exactly 2**bits levels."""
    layers = quantized(student)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, i, n=n: inputs.__setitem__(n, i[0].detach()))
             for n, m in layers]
    for _, m in layers:
        m._fp_passthrough = True  # FP statistics, as calibrate uses
    student.eval()(batch)
    for _, m in layers:
        m._fp_passthrough = False
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    for n, m in layers:
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        span = (w.amax(1) - w.amin(1)).clamp_min(1e-12)
        m.weight_quantizer.log2_step.copy_(torch.log2(span / (2 ** bits - 1) * (1 + 1e-6)))
        m.weight_quantizer.target_bits.fill_(bits)
        aq = m.act_quantizer
        if aq is None or not aq.enabled:
            continue
        x = inputs[n].reshape(-1).float()
        if x.numel() > 2_000_000:
            x = x[torch.randint(0, x.numel(), (2_000_000,), generator=g)]
        lo = float(aq.offset)
        hi = float(torch.quantile(x, quantile))
        if hi <= lo:
            hi = float(x.max())
        alpha = math.log2(max(hi - lo, 1e-12) / (2 ** bits - 1))
        aq.log2_step.copy_(torch.tensor(alpha))
        aq.log2_range.copy_(torch.tensor(alpha + bits))
        aq.target_bits.fill_(bits)


@torch.no_grad()
def per_layer_errors(student, frozen, x) -> dict:
    """Relative error of each deployed layer against its fake-quant layer on the same input."""
    caps = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: caps.__setitem__(n, (i[0], o)))
             for n, m in quantized(student)]
    student(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, layer in deployed_layers(frozen):
        inp, ref = caps[n]
        out[n] = float((layer(inp) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return out


@torch.no_grad()
def _roundtrip(frozen, norm, device):
    """save + load through a temporary file (what ships is what is checked)."""
    from gdnsq.deploy import load, save

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.gdnsq")
        save(frozen.cpu(), path, architecture={"name": "resnet20", "kwargs": {"num_classes": 10}},
             normalization=norm)
        return load(path, map_location=device), os.path.getsize(path)


@torch.no_grad()
def run_bits(bits, fp, norm, calib_loader, test_loader, device, limit, calib_batches, student=None) -> dict:
    first_val = next(iter(calib_loader))[0].to(device)
    if student is None:  # calibrated model set to exactly 2**bits levels
        student = quantize_model(fp, bits, bits).to(device)
        calibrate(student, calib_loader, num_batches=calib_batches, device=device)
        set_bits(student, first_val, bits)
    student = student.to(device)
    student.eval()
    t0 = time.time()
    frozen = freeze(student, example_input=first_val[:16], strict=True, reps=1)
    freeze_s = time.time() - t0
    frozen, size = _roundtrip(frozen, norm, device)
    exact, _ = _roundtrip(freeze(student, path="float", strict=True), norm, device)
    variants = {"integer": frozen, "float": exact}
    if device.type == "cpu":  # the fused C++ runtime on the reloaded artifact (docs/deploy.md)
        from gdnsq.deploy.runtime import runtime

        variants["runtime"] = runtime(frozen, example_input=first_val[:16])
    stats = {k: {"agree": 0, "agree_default_fq": 0, "correct": 0, "max_rel": 0.0, "rels": [], "seconds": 0.0} for k in variants}
    n = fq_correct = 0
    t_fq = 0.0
    layer_err = None
    for x, y in test_loader:
        if limit and n >= limit:
            break
        x, y = x.to(device), y.to(device)
        if layer_err is None:
            layer_err = per_layer_errors(student, frozen, x[:100])
        t = time.time()
        ref = student(x)
        t_fq += time.time() - t
        fq_correct += int((ref.argmax(1) == y).sum())
        # The integer paths compute each layer's exact value rounded once; the fake-quant model
        # with exact inference (float64 conv of the quantized operands) does the same, while its
        # default float32 accumulation differs by rounding, which flips codes of the next
        # quantizer on a few images. Integer variant vs exact fake-quant, float variant vs the
        # default fake-quant; both comparisons are recorded.
        set_exact_inference(student, True)
        ref_exact = student(x)
        set_exact_inference(student, False)
        refs = {"integer": ref_exact, "float": ref, "runtime": ref_exact}
        for k, model in variants.items():
            t = time.time()
            out = model(x)
            st = stats[k]
            st["seconds"] += time.time() - t
            r = refs[k]
            rel = (out - r).abs().amax(1) / r.abs().amax(1).clamp_min(1e-30)
            st["rels"].append(rel.cpu())
            st["agree"] += int((out.argmax(1) == r.argmax(1)).sum())
            st["agree_default_fq"] += int((out.argmax(1) == ref.argmax(1)).sum())
            st["correct"] += int((out.argmax(1) == y).sum())
        n += y.numel()
    res = {"bits": bits, "images": n, "fake_quant_top1": 100.0 * fq_correct / n,
           "fake_quant_seconds": round(t_fq, 2), "artifact_bytes": size, "freeze_seconds": round(freeze_s, 2),
           "max_rel_err_per_layer": max(layer_err.values()), "rel_err_per_layer": layer_err,
           "paths": {r["name"]: r["path"] for r in layer_table(frozen)}}
    if "runtime" in variants:
        res["runtime_isa"] = variants["runtime"].isa
        res["runtime_fallback"] = variants["runtime"].fallback_reason
    for k, st in stats.items():
        rels = torch.cat(st["rels"])
        res[k] = {"compared_with": "float32 fake-quant" if k == "float" else "exact fake-quant",
                  "differing_predictions": n - st["agree"],
                  "differing_predictions_vs_float32_fake_quant": n - st["agree_default_fq"],
                  "top1": 100.0 * st["correct"] / n,
                  "max_rel_err_logits": float(rels.max()), "median_rel_err_logits": float(rels.median()),
                  "images_rel_err_above_1e-4": int((rels > 1e-4).sum()), "seconds": round(st["seconds"], 2)}
    return res


@torch.no_grad()
def calibrated_student(fp, example_shape, bits: int, device, calib_n: int, seed: int = 0):
    """``quantize_model(fp, bits, bits)`` (default placement, no teacher copy), calibrated on
    ``calib_n`` random normal inputs of ``example_shape`` and set to exactly 2**bits levels
    (:func:`set_bits` on the same batch); eval mode."""
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(calib_n, *example_shape, generator=g).to(device)
    q = quantize_model(fp, bits, bits, teacher=False).to(device)
    calibrate(q, [calib], device=device)
    set_bits(q, calib, bits)
    return q.eval()


def _log2_exact(step: torch.Tensor) -> torch.Tensor:
    """float32 ``L`` with ``torch.exp2(L) == step`` bit for bit (the stored step is
    ``exp2(log2_step)`` of some float32 ``log2_step``; ``log2(step)`` can be an ulp off it)."""
    step = step.float()
    lg = torch.log2(step)
    for _ in range(64):
        s = torch.exp2(lg)
        if bool((s == step).all()):
            return lg
        lg = torch.where(s < step, torch.nextafter(lg, torch.full_like(lg, math.inf)),
                         torch.where(s > step, torch.nextafter(lg, torch.full_like(lg, -math.inf)), lg))
    raise ValueError("a stored weight step is not exp2 of any float32 (not written by gdnsq.deploy.freeze)")


@torch.no_grad()
def fake_quant_from_artifact(path):
    """The fake-quant model a deployed file stands for, rebuilt from the file alone.

    The architecture comes from the file (``gdnsq.models``); float tensors (FP layers, BatchNorm)
    are loaded as stored; each deployed layer becomes a QConv2d/QLinear whose latent weight is
    ``min + step * k`` (float32, the stored codes k; every channel holds a code 0, so its minimum
    is the stored zero point and it quantizes back to exactly k), with ``log2_step`` such that
    ``2**log2_step`` is the stored step, and the stored activation quantizer parameters. Nothing
    of ``gdnsq.deploy`` runs but the file reader and the code unpacking. Returns
    ``(model, metadata)``."""
    from gdnsq.deploy.layers import unpack_codes

    meta, tensors = read_artifact(path)
    arch = meta["architecture"]
    if arch is None:
        raise ValueError(f"{path}: the artifact names no architecture")
    model = get_model(arch["name"], **arch.get("kwargs", {})).eval()
    deployed = {e["name"]: e["config"] for e in meta["layers"]}
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in deployed}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {f"{n}.{t}" for n in deployed for t in ("weight", "bias")}:
        raise ValueError(f"{path}: tensors do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, c in deployed.items():
        float_layer = model.get_submodule(name)
        cls = QConv2d if c["kind"] == "conv2d" else QLinear
        layer = cls.from_float(float_layer, weight_bits=c["weight_bits"], act_bits=c["act_bits"], signed=True)
        k = unpack_codes(tensors[f"{name}.weight_packed"], c["weight_bits"], c["weight_shape"]).float()
        view = (-1,) + (1,) * (k.dim() - 1)
        step, zero = tensors[f"{name}.weight_step"].float(), tensors[f"{name}.weight_min"].float()
        layer.weight.data = k * step.view(view) + zero.view(view)  # as DeployedConv2d.dequantized_weight
        layer.weight_quantizer.log2_step.data = _log2_exact(step)
        if c["bias"]:
            layer.bias.data = tensors[f"{name}.bias"].float().clone()
        if c["act_bits"] is not None:
            aq = layer.act_quantizer
            aq.log2_step.data = tensors[f"{name}.act_log2_step"].float().reshape(aq.log2_step.shape).clone()
            aq.log2_range.data = tensors[f"{name}.act_log2_range"].float().reshape(aq.log2_range.shape).clone()
            aq.offset.data = tensors[f"{name}.act_offset"].float().reshape(aq.offset.shape).clone()
        # the rebuilt layer's codes are the stored ones (checked: a wrong step would change them)
        codes, _ = layer.weight_quantizer.codes(layer.weight)
        if not torch.equal(codes.float(), k):
            raise ValueError(f"{path}: layer {name}: the rebuilt fake-quant layer does not reproduce the codes")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.eval())
    return model.eval(), meta


def _compare(out, ref):
    """(images whose top-1 differs, per-image max |out - ref| / max |ref|)."""
    rel = (out - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1).clamp_min(1e-30)
    return int((out.argmax(-1) != ref.argmax(-1)).sum()), rel


@torch.no_grad()
def check_artifact(path, test_loader, device, limit: int) -> dict:
    """Deployed file (``load``, default forward) vs the exact fake-quant model rebuilt from it."""
    from gdnsq.cli.benchmark import plan_info
    from gdnsq.deploy import load

    ref_model, meta = fake_quant_from_artifact(path)
    ref_model = ref_model.to(device)
    deployed = load(path, map_location=device)
    n = diff = diff_f32 = correct = correct_ref = 0
    rels, t_dep, t_ref = [], 0.0, 0.0
    for x, y in test_loader:
        if limit and n >= limit:
            break
        if limit:
            x, y = x[:limit - n], y[:limit - n]
        x, y = x.to(device), y.to(device)
        t = time.time()
        out = deployed(x)
        t_dep += time.time() - t
        t = time.time()
        ref32 = ref_model(x)
        set_exact_inference(ref_model, True)
        ref = ref_model(x)
        set_exact_inference(ref_model, False)
        t_ref += time.time() - t
        d, rel = _compare(out, ref)
        diff += d
        diff_f32 += _compare(out, ref32)[0]
        rels.append(rel.cpu())
        correct += int((out.argmax(1) == y).sum())
        correct_ref += int((ref.argmax(1) == y).sum())
        n += y.numel()
    rels = torch.cat(rels)
    report = pathlib.Path(path).with_name("report.json")
    md = meta.get("metadata") or {}
    return {"artifact": str(path), "architecture": meta["architecture"], "weight_bits": md.get("weight_bits"),
            "act_bits": md.get("act_bits"), "images": n, "compared_with": "exact fake-quant rebuilt from the file",
            "differing_predictions": diff, "differing_predictions_vs_float32_fake_quant": diff_f32,
            "max_rel_err_logits": float(rels.max()), "median_rel_err_logits": float(rels.median()),
            "deployed_top1": 100.0 * correct / n, "fake_quant_top1": 100.0 * correct_ref / n,
            "report_test_top1": json.loads(report.read_text()).get("test_top1") if report.is_file() else None,
            "paths": {r["name"]: r["path"] for r in layer_table(deployed)}, "plan": plan_info(deployed),
            "deployed_seconds": round(t_dep, 2), "fake_quant_seconds": round(t_ref, 2)}


@torch.no_grad()
def check_arch(arch: str, bits: int, threads_list, device, batch: int, scale: str) -> list:
    """One architecture at ``bits``: deployed (freeze -> save -> load, default forward) at each
    thread count vs the exact fake-quant model on one random batch."""
    import _arch_full
    from gdnsq.cli.benchmark import plan_info
    from gdnsq.deploy import load, save

    fp, shape = _arch_full.build(arch, scale)
    fp = fp.to(device)
    q = calibrated_student(fp, shape, bits, device, calib_n=max(2, batch))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    ref32 = q(x)
    set_exact_inference(q, True)
    ref = q(x)
    set_exact_inference(q, False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{arch}.gdnsq")
        frozen = freeze(q, example_input=x[:2], reps=1)
        save(frozen.cpu(), path)
        deployed = load(path, q, map_location=device)  # the fake-quant model as the skeleton
    rows, saved = [], torch.get_num_threads()
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            t = time.time()
            out = deployed(x)
            seconds = time.time() - t
            diff, rel = _compare(out, ref)
            rows.append({"arch": arch, "scale": scale, "bits": bits, "threads": threads, "batch": batch,
                         "input_shape": list(shape), "compared_with": "exact fake-quant",
                         "differing_predictions": diff,
                         "differing_predictions_vs_float32_fake_quant": _compare(out, ref32)[0],
                         "max_rel_err_logits": float(rel.max()), "seconds": round(seconds, 3),
                         "paths": sorted({r["path"] for r in layer_table(deployed)}),
                         "plan": plan_info(deployed)})
    finally:
        torch.set_num_threads(saved)
    return rows


def _document(argv, device, results, **extra) -> str:
    doc = {"command": "python benchmarks/check_deploy_equality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "platform": platform.platform(), "torch": torch.__version__,
           "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, **extra, "results": results}
    return json.dumps(doc, indent=1) + "\n"


def main_artifacts(args, argv, device) -> int:
    files = args.artifacts or sorted(str(p) for p in (ROOT / "results").glob("*/model.gdnsq"))
    if not files:
        raise SystemExit("--artifacts: no results/*/model.gdnsq found")
    out = pathlib.Path(args.out or ROOT / "results" / "deploy_equality_artifacts.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    loaders = {}
    for f in files:
        meta, _ = read_artifact(f)
        norm = meta["normalization"] or "imagenet"
        if norm not in loaders:
            loaders[norm] = gdata.build_loaders("cifar10", data_dir=args.data_dir, with_train=False,
                                                eval_batch_size=args.batch_size, normalization=norm,
                                                device="cpu")["test"]
        r = check_artifact(f, loaders[norm], device, args.limit)
        print(json.dumps({k: v for k, v in r.items() if k not in ("paths", "plan")}), flush=True)
        results.append(r)
        atomic_write_text(out, _document(argv, device, results))  # rewritten after every file
    print(f"wrote {out}", flush=True)
    return 0


def main_archs(args, argv, device) -> int:
    out = pathlib.Path(args.out or ROOT / "results" / "deploy_equality_archs.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for arch in args.archs:
        for b in args.bits:
            for r in check_arch(arch, b, args.threads, device, args.arch_batch, args.scale):
                print(json.dumps({k: v for k, v in r.items() if k != "plan"}), flush=True)
                results.append(r)
            atomic_write_text(out, _document(argv, device, results, scale=args.scale))
    print(f"wrote {out}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="stop after this many test images (0: all)")
    p.add_argument("--out", default=None, help="JSON to write (default results/deploy_equality.json, "
                   "deploy_equality_artifacts.json with --artifacts, deploy_equality_archs.json with --archs)")
    p.add_argument("--run", nargs="*", default=[],
                   help="trained `gdnsq quantize` run folders to check instead of --bits "
                        "(their selected checkpoint, bits from run.json)")
    p.add_argument("--artifacts", nargs="*", default=None, metavar="FILE",
                   help="deployed files to check against the fake-quant model rebuilt from them "
                        "(no FILE: every results/*/model.gdnsq)")
    p.add_argument("--archs", nargs="*", default=None, choices=["resnet18", "mobilenet_v2", "bert"],
                   help="architecture checks on random data (no name: all three)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="--archs: torch.set_num_threads values")
    p.add_argument("--arch-batch", type=int, default=8, help="--archs: random inputs per check (default 8)")
    p.add_argument("--scale", choices=["full", "small"], default="full",
                   help="--archs: full-size models, or tiny ones (checks the script)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.artifacts is not None:
        return main_artifacts(args, argv, device)
    if args.archs is not None:
        args.archs = args.archs or ["resnet18", "mobilenet_v2", "bert"]
        return main_archs(args, argv, device)
    fp = get_model("resnet20", 10)
    meta = load_fp_checkpoint(fp, args.checkpoint)
    fp.eval()
    norm = meta["normalization"]
    loaders = gdata.build_loaders("cifar10", data_dir=args.data_dir, batch_size=args.batch_size,
                                  eval_batch_size=args.batch_size, val_size=5000, normalization=norm,
                                  device="cpu")
    results = []
    out = pathlib.Path(args.out or ROOT / "results" / "deploy_equality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(b, None, None) for b in args.bits] if not args.run else []
    for run_dir in args.run:
        from gdnsq.cli._support import load_model_for_eval  # the CLI's loader of a quantize run
        ns = argparse.Namespace(checkpoint=run_dir, model="resnet20", dataset="cifar10",
                                weight_bits=None, act_bits=None)
        student, info = load_model_for_eval(ns)
        if info["normalization"] != norm:
            raise SystemExit(f"--run {run_dir}: normalisation {info['normalization']} != {norm}")
        jobs.append((int(info["weight_bits"]), student, run_dir))
    for b, student, run_dir in jobs:
        r = run_bits(b, fp, norm, loaders["val"], loaders["test"], device, args.limit, args.calib_batches,
                     student=student)
        if run_dir is not None:
            r["trained_run"] = os.path.basename(os.path.normpath(run_dir))
        print(json.dumps({k: v for k, v in r.items() if k not in ("rel_err_per_layer", "paths")}), flush=True)
        results.append(r)
        doc = {  # rewritten after every bit-width, so a partial run keeps what it measured
            "command": "python benchmarks/check_deploy_equality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "platform": platform.platform(), "torch": torch.__version__,
            "checkpoint": os.path.basename(args.checkpoint), "results": results,
        }
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
