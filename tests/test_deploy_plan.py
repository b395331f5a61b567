"""The deploy plan compiler (gdnsq.deploy.plan): frozen models run integer segments by default.

Oracle: the frozen model's per-layer path (``per_layer``), with every deployed layer on the
``int`` path (and on its default path: ``binary`` for W1A1); the plan must equal it bit for bit
(``torch.equal``). End to end: predictions equal the exact fake-quant model's.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gdnsq.calibrate import calibrate
from gdnsq.convert import quantize_model
from gdnsq.deploy import freeze, load, per_layer, plan_report, reference_forward, save
from gdnsq.deploy import plan as plan_mod
from gdnsq.layers import set_exact_inference
from gdnsq.models.resnet_cifar import CifarResNet

from _arch_models import MobileNetV2, ResNet18, TinyViT
from _deploy_helpers import set_bits


class Encoder(nn.Module):
    """A small BERT-style encoder: token projection, nn.TransformerEncoder (post-norm, GELU),
    first-token head."""

    def __init__(self, d=16, heads=2, layers=2, ff=32, features=8, classes=3):
        super().__init__()
        self.embed = nn.Linear(features, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x))[:, 0])


# name -> (builder, input shape without batch, shapes to run (without batch))
ARCHS = {
    "resnet20": (lambda: CifarResNet(1), (3, 16, 16), [(3, 16, 16), (3, 13, 11)]),
    "resnet18": (lambda: ResNet18(width=4), (3, 32, 32), [(3, 32, 32), (3, 23, 19)]),
    "mobilenet_v2": (lambda: MobileNetV2(width_mult=0.25, last_channel=16), (3, 32, 32), [(3, 29, 33)]),
    "vit": (lambda: TinyViT(), (3, 16, 16), [(3, 16, 16)]),
    "encoder": (lambda: Encoder(), (7, 8), [(7, 8), (5, 8)]),
}

_CACHE: dict = {}


def _student(arch: str, bits: int, seed: int | None = None):
    key = (arch, bits, seed)
    if key not in _CACHE:
        build, shape, _ = ARCHS[arch]
        torch.manual_seed(bits if seed is None else seed)
        fp = build().eval()
        x = torch.randn(6, *shape)
        q = quantize_model(fp, bits, bits)
        calibrate(q, [x])
        set_bits(q, x, bits, bits)
        _CACHE[key] = q.eval()
    return _CACHE[key]


def _frozen(arch, bits, path=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fr = freeze(_student(arch, bits))
    if path:
        for m in fr.modules():
            if hasattr(m, "set_path") and path in m.allowed_paths():
                m.set_path(path)
    return fr


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _check_equal(fr, x):
    """The plan (first call: built; second: cached) equals the per-layer path bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no segment may fall back on these models
        first = _run(fr, x)
        second = _run(fr, x)
    with per_layer(fr):
        want = _run(fr, x)
    assert torch.equal(first, want) and torch.equal(second, want)
    return want


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_plan_bit_identical_to_per_layer(arch, bits):
    _, _, shapes = ARCHS[arch]
    for path in ("int", None):  # every layer on "int"; then the freeze defaults (binary for W1A1)
        fr = _frozen(arch, bits, path)
        for shape in shapes:
            for batch in (1, 3):
                _check_equal(fr, torch.randn(batch, *shape))
        report = plan_report(fr)
        assert report and all(r["fallback"] is None for r in report), report
        if arch in ("resnet20", "resnet18", "mobilenet_v2"):
            assert any(r["folded_into"] for r in report)  # conv -> BN -> ReLU -> conv chains fold
        if arch in ("vit", "encoder"):
            assert all(r["inside_opaque"] for r in report)
            gemms = {r["gemm"] for r in report}
            assert gemms == ({"popcount_linear"} if bits == 1 else {"int_linear"})


def test_plan_two_threads_bit_identical():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for arch in ("resnet18", "mobilenet_v2"):
            fr = _frozen(arch, 2, "int")
            _check_equal(fr, torch.randn(3, 3, 21, 17))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet_v2", "encoder"])
def test_predictions_equal_exact_fake_quant(arch):
    q = _student(arch, 2)
    fr = _frozen(arch, 2)
    x = torch.randn(4, *ARCHS[arch][1])
    got = _run(fr, x)
    set_exact_inference(q, True)
    try:
        want = _run(q, x)
    finally:
        set_exact_inference(q, False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_failed_fold_check_unfolds_only_that_segment(monkeypatch):
    fr = _frozen("resnet18", 2, "int")
    real = plan_mod.check_fold
    victim = "layer2.0.conv1"

    def failing(fold, consumer, captured):
        if fold.producer == victim:
            raise plan_mod.PlanError("forced failure")
        return real(fold, consumer, captured)

    monkeypatch.setattr(plan_mod, "check_fold", failing)
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(fr, x)
    messages = [str(w.message) for w in caught]
    assert any(victim in m and "forced failure" in m for m in messages), messages
    report = {r["layer"]: r for r in plan_report(fr)}
    assert report[victim]["folded_into"] == [] and report[victim]["fallback"] is None
    assert report["layer1.0.conv1"]["folded_into"] == ["layer1.0.conv2"]
    with per_layer(fr):
        assert torch.equal(got, _run(fr, x))


def test_failed_segment_check_falls_back_alone_per_shape(monkeypatch):
    fr = _frozen("mobilenet_v2", 4, "int")
    real = plan_mod.check_executor
    victim = "features.3.conv.1.0"
    small = (1, 3, 17, 17)

    def failing(ex, x, want):
        if ex.name == victim and tuple(x.shape[-2:]) == (5, 5):  # only the small input's plan
            raise plan_mod.PlanError("forced failure")
        return real(ex, x, want)

    monkeypatch.setattr(plan_mod, "check_executor", failing)
    xs = torch.randn(*small)
    with pytest.warns(RuntimeWarning, match=f"layer {victim} runs the per-layer path .*forced failure"):
        got = _run(fr, xs)
    report = {r["layer"]: r for r in plan_report(fr)}
    assert "forced failure" in report[victim]["fallback"]
    assert sum(r["fallback"] is not None for r in report.values()) == 1
    with per_layer(fr):
        assert torch.equal(got, _run(fr, xs))
    # another input size: its own plan, the layer runs fast there
    xb = torch.randn(1, 3, 32, 32)
    _check_equal(fr, xb)
    report = {r["layer"]: r for r in plan_report(fr)}
    assert report[victim]["fallback"] is None
    runner = fr.gdnsq_plan
    assert len(runner.plans) == 2
    plan = runner.plans[next(iter(runner.plans))]
    _run(fr, xs)
    assert runner.plans[next(iter(runner.plans))] is plan  # cached, not rebuilt


def test_deepcopy_save_load_and_state_dict(tmp_path):
    fr = _frozen("resnet20", 1)
    x = torch.randn(2, 3, 16, 16)
    want = _run(fr, x)
    dup = copy.deepcopy(fr)
    assert dup.forward.__self__ is dup and dup.gdnsq_plan is not fr.gdnsq_plan
    assert not dup.gdnsq_plan.plans
    assert torch.equal(_run(dup, x), want)
    assert set(dup.state_dict()) == set(freeze(_student("resnet20", 1), plan=False).state_dict())
    path = tmp_path / "m.gdnsq"
    save(fr, str(path), architecture={"name": "custom", "kwargs": {}})
    loaded = load(str(path), model=_student("resnet20", 1))
    assert isinstance(loaded.gdnsq_plan, plan_mod.PlanRunner)
    assert torch.equal(_run(loaded, x), want) and plan_report(loaded)
    assert not hasattr(load(str(path), model=_student("resnet20", 1), plan=False), "gdnsq_plan")
    # new weights through load_state_dict: the plans are dropped and rebuilt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = freeze(_student("resnet20", 1, seed=11))
    before = _run(other, x)
    assert other.gdnsq_plan.plans and not torch.equal(before, want)
    other.load_state_dict(fr.state_dict())
    assert torch.equal(_run(other, x), want)


def test_per_layer_oracle_and_unsupported_inputs():
    fr = _frozen("resnet20", 2)
    x = torch.randn(2, 3, 16, 16)
    with per_layer(fr):
        ref = _run(fr, x)
    assert torch.equal(_run(fr, x), ref)
    assert torch.equal(reference_forward(fr, x), ref)
    assert fr.gdnsq_plan.plans
    # an input that needs autograd, or float64 inputs: the whole per-layer path, no new plan
    n = len(fr.gdnsq_plan.plans)
    xg = torch.randn(2, 3, 12, 12, requires_grad=True)
    with per_layer(fr):
        want = fr(xg)
    assert torch.equal(fr(xg), want)
    assert not plan_mod.PlanRunner._eligible((x.double(),))
    assert len(fr.gdnsq_plan.plans) == n
    assert not hasattr(freeze(_student("resnet20", 2), plan=False), "gdnsq_plan")


@pytest.mark.parametrize("arch,bits", [("resnet18", 2), ("mobilenet_v2", 4), ("resnet20", 1)])
def test_fold_kernel_codes_equal_the_modules_at_every_threshold(arch, bits):
    """The folded epilogue (C++ thresholds) against the chain of modules + quantizer it replaces,
    on every threshold and its float neighbours (real data rarely lands on them): y is fed to the
    kernel as the constant term (acc = S_j = 0), so y is exactly the probe value."""
    from gdnsq_kernels import plan_ops
    from gdnsq_kernels.quantize.reference import activation_codes

    fr = _frozen(arch, bits, "int")
    _run(fr, torch.randn(1, *ARCHS[arch][1]))
    plan = fr.gdnsq_plan.last_plan
    assert plan.folds
    for fold in plan.folds.values():
        consumer = fr.get_submodule(fold.consumers[0].target)
        probe = plan_mod._probe_values(fold.thr, None)
        M, C = probe.shape
        codes, _ = plan_ops.ops().epilogue_codes(
            torch.zeros(M, C, dtype=torch.int32), torch.zeros(M, 1, dtype=torch.int32),
            torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64), probe.double(), 0,
            fold.thr_t, fold.sign, 0)
        v = probe.view(M, C, 1, 1)
        for f in fold.fns:
            v = f(v)
        want = activation_codes(v, consumer.act_log2_step, consumer.act_log2_range, consumer.act_offset)
        assert torch.equal(codes.long(), want.view(M, C).long()), fold.producer


def test_forward_hooks_on_bypassed_modules_see_their_calls():
    fr = _frozen("resnet20", 2)
    x = torch.randn(1, 3, 16, 16)
    want = _run(fr, x)
    seen = []
    handle = fr.layer1[0].conv1.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    assert torch.equal(_run(fr, x), want) and len(seen) == 1
    handle.remove()
    _run(fr, x)
    assert len(seen) == 1  # the plan again


class WideBinaryNet(nn.Module):
    """Convs with 64+ input channels: a tight-row popcount weight (70 channels), stride 2,
    dilation 2 with wide padding, a pointwise conv, and one 16-channel conv (bytes GEMM)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 70, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(70)
        self.c1 = nn.Conv2d(70, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.c2 = nn.Conv2d(64, 64, 1)
        self.c3 = nn.Conv2d(64, 16, 3, padding=2, dilation=2)
        self.c4 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.c1(x)))
        x = self.c3(torch.relu(self.c2(x)) - 0.5)
        x = self.c4(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("path", ["int", None])
def test_w1a1_wide_convs_take_popcount_gemm_bit_identical(path):
    torch.manual_seed(5)
    fp = WideBinaryNet().eval()
    with torch.no_grad():
        for m in fp.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)  # negative scales too: decreasing fold thresholds
    x = torch.randn(6, 3, 15, 13)
    q = quantize_model(fp, 1, 1)
    calibrate(q, [x])
    set_bits(q, x, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fr = freeze(q.eval())
    if path:
        for m in fr.modules():
            if hasattr(m, "set_path") and path in m.allowed_paths():
                m.set_path(path)
    for shape in [(1, 3, 15, 13), (3, 3, 9, 16)]:
        _check_equal(fr, torch.randn(*shape))
    gemm = {r["layer"]: r["gemm"] for r in plan_report(fr) if r["kind"] == "conv2d"}
    assert gemm["c1"] == gemm["c2"] == gemm["c3"] == "popcount_conv2d", gemm
    assert gemm["c4"] == "int_conv2d", gemm
    assert fr.gdnsq_plan.last_plan.execs["c1"].w_pop.tight  # 70 channels: tight rows


def test_cifar_resnet_default_freeze_runs_the_fused_trunk():
    from gdnsq.deploy.runtime import runtime

    fr = _frozen("resnet20", 1)  # freeze defaults: the binary path, the runtime's epilogue order
    for shape in [(1, 3, 16, 16), (3, 3, 13, 11)]:
        x = torch.randn(*shape)
        want = _check_equal(fr, x)
        plan = fr.gdnsq_plan.last_plan
        assert plan.fused is not None and plan.fused_reason is None
        fused = {r["layer"] for r in plan_report(fr) if r["fused"] == "runtime_trunk"}
        assert fused == {f"layer{s}.0.conv{j}" for s in (1, 2, 3) for j in (1, 2)}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(_run(runtime(fr), x), want)  # the explicit runtime wrapper still works
    # the int path's epilogue order is not the runtime's: generic segments, no warning
    fr_int = _frozen("resnet20", 1, "int")
    _check_equal(fr_int, torch.randn(2, 3, 16, 16))
    plan = fr_int.gdnsq_plan.last_plan
    assert plan.fused is None and "binary path" in plan.fused_reason
    assert not any(r["fused"] for r in plan_report(fr_int))


def test_fused_trunk_failure_falls_back_to_generic_segments(monkeypatch):
    from gdnsq.deploy import runtime as rt_mod

    def failing(*a, **k):
        raise rt_mod.PlanError("forced trunk failure")

    monkeypatch.setattr(rt_mod, "_Plan", failing)
    fr = _frozen("resnet20", 1)
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="trunk runs generic segments.*forced trunk failure"):
        got = _run(fr, x)
    plan = fr.gdnsq_plan.last_plan
    assert plan.fused is None and plan.fused_reason == "forced trunk failure"
    assert all(r["fallback"] is None and r["fused"] is None for r in plan_report(fr))
    with per_layer(fr):
        assert torch.equal(got, _run(fr, x))
    # a fused forward whose logits differ is refused too
    monkeypatch.undo()
    monkeypatch.setattr(plan_mod._FusedCifar, "__call__", lambda self, x: torch.zeros(x.shape[0], 10))
    fr2 = _frozen("resnet20", 1)
    with pytest.warns(RuntimeWarning, match="logits differ"):
        assert torch.equal(_run(fr2, x), got)
    assert fr2.gdnsq_plan.last_plan.fused is None
