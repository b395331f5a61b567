"""Distillation temperature: ``jeffreys_divergence(..., temperature=T)``, ``GDNSQObjective(temperature=)``,
``TrainConfig.distill_temperature`` and ``gdnsq quantize --distill-temperature``."""
import json
import math

import pytest
import torch

import _trainer_tiny as tiny
from gdnsq.losses import GDNSQObjective, jeffreys_divergence
from gdnsq.train.presets import TrainConfig
from gdnsq.train.trainer import Trainer, _distill_with_labels


def _oracle(student_logits, teacher_logits, temperature, mask=None, label_weight=0.0, labels=None):
    """T^2 (KL(p_T||p_S) + KL(p_S||p_T)) in float64 from softmax probabilities written out by hand,
    averaged over the (masked) positions, plus label_weight x the cross-entropy at T = 1."""
    s = student_logits.double() / temperature
    t = teacher_logits.double() / temperature
    p_s = torch.exp(s - s.amax(-1, keepdim=True))
    p_s = p_s / p_s.sum(-1, keepdim=True)
    p_t = torch.exp(t - t.amax(-1, keepdim=True))
    p_t = p_t / p_t.sum(-1, keepdim=True)
    per_position = temperature**2 * ((p_t * (p_t / p_s).log()).sum(-1) + (p_s * (p_s / p_t).log()).sum(-1))
    if mask is None:
        d = per_position.mean()
    else:
        keep = mask.double()
        d = (per_position * keep).sum() / keep.sum()
    if label_weight:
        z = student_logits.double()
        log_p = z - z.exp().sum(-1, keepdim=True).log()
        d = d - label_weight * log_p[torch.arange(len(labels)), labels].mean()
    return d


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 4.0, 7.3])
@pytest.mark.parametrize("shape", [(37, 10), (3, 5, 11)], ids=["classifier", "tokens"])
def test_value_and_gradient_match_the_oracle(temperature, shape):
    s, t = _logits(*shape, seed=1)
    s.requires_grad_(True)
    got = jeffreys_divergence(s, t, temperature=temperature)
    s64 = s.detach().double().requires_grad_(True)
    want = _oracle(s64, t, temperature)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-7)
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-7)


def test_mask_with_temperature():
    s, t = _logits(2, 6, 9, seed=2)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 0]])
    got = jeffreys_divergence(s, t, mask, temperature=3.0)
    assert float(got) == pytest.approx(float(_oracle(s, t, 3.0, mask)), rel=1e-5)


def test_high_temperature_limit_is_the_centered_logit_distance():
    """At large T, T^2 J -> mean over classes of (d - mean(d))^2 with d = student - teacher logits
    (second-order expansion of both KLs): a check of the T^2 factor independent of the formula."""
    s, t = _logits(16, 10, seed=3, scale=1.0)
    d = s.double() - t.double()
    d = d - d.mean(-1, keepdim=True)
    limit = (d**2).mean(-1).mean()
    got = jeffreys_divergence(s.double(), t.double(), temperature=1000.0)
    assert float(got) == pytest.approx(float(limit), rel=1e-3)


def test_temperature_softens_a_confident_teacher():
    """A teacher sure of one class (logit margin 20) and a student that agrees but is less sure:
    at T = 1 the divergence sees almost nothing beyond the label; at T = 4 it sees the rest."""
    teacher = torch.tensor([[20.0, 8.0, 0.0, -4.0]])
    student = torch.tensor([[20.0, 0.0, 8.0, -4.0]])  # same top class, other classes swapped
    assert float(jeffreys_divergence(student, teacher)) < 1e-3
    assert float(jeffreys_divergence(student, teacher, temperature=4.0)) > 1.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "2"])
def test_bad_temperature_is_refused(bad):
    s, t = _logits(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        jeffreys_divergence(s, t, temperature=bad)
    student = tiny.student_teacher()[0]
    with pytest.raises(ValueError, match="temperature"):
        GDNSQObjective(student, temperature=bad)


def test_objective_uses_its_temperature():
    s, t = _logits(37, 10, seed=4)
    student = tiny.student_teacher()[0]
    objective = GDNSQObjective(student, temperature=4.0)
    _, parts = objective(s, t, 0.0)
    assert float(parts["distill"]) == pytest.approx(float(_oracle(s, t, 4.0)), rel=1e-5)
    assert "temperature=4" in repr(objective)
    assert GDNSQObjective(student).temperature == 1.0


def test_labels_and_temperature_together():
    s, t = _logits(37, 10, seed=5)
    y = torch.randint(0, 10, (37,), generator=torch.Generator().manual_seed(0))
    loss = _distill_with_labels(0.5, 4.0)
    want = _oracle(s, t, 4.0, label_weight=0.5, labels=y)
    assert float(loss(s, t, y)) == pytest.approx(float(want), rel=1e-5)


def test_config_validation():
    assert TrainConfig().distill_temperature == 1.0
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="distill_temperature"):
            TrainConfig(distill_temperature=bad)
    with pytest.raises(ValueError, match="distill_temperature"):
        TrainConfig(distill_temperature=math.inf)
    with pytest.raises(TypeError, match="distill_temperature"):
        TrainConfig(distill_temperature="4")


def test_trainer_distils_at_the_temperature_and_records_it(tmp_path):
    student, teacher = tiny.student_teacher()
    train, val, _ = tiny.loaders()
    trainer = Trainer(student, teacher, train, val, config=tiny.fast_config(max_epochs=1, distill_temperature=4.0),
                      out_dir=str(tmp_path))
    s, t = _logits(8, 4, seed=6)
    _, parts = trainer.objective(s, t, 0.0)
    assert float(parts["distill"]) == pytest.approx(float(_oracle(s, t, 4.0)), rel=1e-5)
    trainer.fit()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["distill_temperature"] == 4.0


def test_cli_flag_reaches_the_config(capsys):
    from gdnsq import cli

    args = cli.build_parser().parse_args(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x",
                                          "--distill-temperature", "4"])
    cfg, _ = cli.quantize.resolve_train_config(args)
    assert cfg.distill_temperature == 4.0
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x",
                                       "--distill-temperature", "0"])
    assert exit_info.value.code == 2
    assert "--distill-temperature" in capsys.readouterr().err


def test_framework_loop_distils_at_the_objectives_temperature():
    """GDNSQLoop (the Hugging Face / Lightning / any-loop adapter) takes the temperature through
    its objective: its training loss is the oracle's T = 4 divergence plus the (zero-mu) penalty."""
    import gdnsq
    from gdnsq.integrations.loop import GDNSQLoop

    student, teacher = tiny.student_teacher()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    schedule = gdnsq.GDNSQSchedule(optimizer, warmup_steps=1)
    loop = GDNSQLoop(student, schedule, teacher=teacher,
                     objective=GDNSQObjective(student, temperature=4.0))
    x, _ = tiny.make_data(8, 2)
    student.train()
    s_logits = student(x)
    with torch.no_grad():
        t_logits = teacher(x)
    _, parts = loop.training_loss(s_logits, x)
    assert float(parts["distill"]) == pytest.approx(float(_oracle(s_logits.detach(), t_logits, 4.0)), rel=1e-5)


def test_cpu_8ep_preset_is_the_measured_recipe():
    """`--preset cpu-8ep` resolves to the flags of the 8-epoch arm in docs/results.md."""
    from gdnsq import cli

    def resolved(argv):
        args = cli.build_parser().parse_args(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x"] + argv)
        return cli.quantize.resolve_train_config(args)[0].to_dict()

    preset = resolved(["--preset", "cpu-8ep"])
    arm = resolved(["--preset", "cpu-fast", "--patience", "100", "--lr", "1e-3", "--quantizer-lr-scale", "14",
                    "--t-scale", "560", "--anneal-shape", "cosine", "--distill-temperature", "4"])
    preset.pop("extra"), arm.pop("extra")
    # cpu-fast's per-batch anneal factor is unused under the cosine shape
    assert preset.pop("anneal") == 0.9985 and arm.pop("anneal") != 0.9985
    assert preset == arm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_temperature_one_is_the_previous_formula_bit_for_bit(dtype):
    """Long runs resume bit-exactly across this change only if T = 1 computes exactly what the
    divergence computed before temperatures existed (written out here): value and gradient."""
    import torch.nn.functional as F

    s, t = _logits(128, 10, seed=7, scale=5.0)
    s, t = s.to(dtype).requires_grad_(True), t.to(dtype)
    ct = torch.promote_types(dtype, torch.float32)
    ls, lt = F.log_softmax(s.to(ct), dim=-1), F.log_softmax(t.to(ct), dim=-1)
    per_position = ((lt.exp() - ls.exp()) * (lt - ls)).sum(-1)
    before = per_position.sum() / per_position.numel()
    now = jeffreys_divergence(s, t)
    assert torch.equal(now, before)
    assert torch.equal(torch.autograd.grad(now, s)[0], torch.autograd.grad(before, s)[0])
