"""``TrainConfig.label_weight``: Jeffreys distillation plus a weighted cross-entropy on the labels."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

import _trainer_tiny as tiny
from gdnsq.losses import GDNSQObjective
from gdnsq.train.presets import TrainConfig
from gdnsq.train.trainer import Trainer, _distill_with_labels


def _oracle(student_logits, teacher_logits, labels, weight):
    """Both KL directions and the cross-entropy written out in float64 from softmax probabilities."""
    s = student_logits.double()
    t = teacher_logits.double()
    p_s = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    p_t = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
    kl_ts = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    kl_st = (p_s * (p_s.log() - p_t.log())).sum(1).mean()
    ce = -p_s.log()[torch.arange(len(labels)), labels].mean()
    return float(kl_ts + kl_st + weight * ce)


@pytest.mark.parametrize("weight", [0.0, 0.3, 2.0])
def test_base_loss_matches_an_independent_oracle(weight):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 10, generator=g) * 3
    t = torch.randn(37, 10, generator=g) * 3
    y = torch.randint(0, 10, (37,), generator=g)
    student = tiny.student_teacher()[0]
    objective = GDNSQObjective(student, base_loss=_distill_with_labels(weight))
    _, parts = objective(s, t, 0.0, labels=y)
    assert float(parts["distill"]) == pytest.approx(_oracle(s, t, y, weight), rel=1e-5)
    if weight == 0.0:
        assert objective.base_loss is None  # the paper's objective, untouched


def test_config_rejects_bad_weights():
    assert TrainConfig().label_weight == 0.0
    with pytest.raises(ValueError, match="label_weight"):
        TrainConfig(label_weight=-0.1)
    with pytest.raises(ValueError, match="label_weight"):
        TrainConfig(label_weight=float("inf"))
    with pytest.raises(TypeError, match="label_weight"):
        TrainConfig(label_weight="1")


def test_trainer_uses_labels_and_records_the_weight(tmp_path):
    student, teacher = tiny.student_teacher()
    train, val, _ = tiny.loaders()
    cfg = tiny.fast_config(max_epochs=1, label_weight=0.5)
    trainer = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path))
    # the trainer's objective is the weighted sum (checked on fixed logits)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    assert float(trainer.objective.base_loss(s, t, y)) == pytest.approx(_oracle(s, t, y, 0.5), rel=1e-5)
    trainer.fit()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["label_weight"] == 0.5


def test_trainer_without_labels_names_the_field(tmp_path):
    student, teacher = tiny.student_teacher()
    x, _ = tiny.make_data(64, 1)
    unlabeled = DataLoader(x, batch_size=32)  # batches are bare tensors: no labels
    trainer = Trainer(student, teacher, unlabeled, None, config=tiny.fast_config(max_epochs=1, label_weight=1.0),
                      out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="label_weight"):
        trainer.fit()


def test_cli_flag_reaches_the_config():
    from gdnsq import cli

    args = cli.build_parser().parse_args(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x",
                                          "--label-weight", "0.5"])
    cfg, _ = cli.quantize.resolve_train_config(args)
    assert cfg.label_weight == 0.5
