"""The pieces a user's own loop is built from (docs/method.md): a teacher that follows the
student's device and dtype moves (or none), calibration on any batch and model signature, and
the convergence step."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import gdnsq
from gdnsq import ConvergenceTracker, GDNSQSchedule, calibrate, quantize_model, stats, teacher_of
from gdnsq.convert import copy_without_teacher

from _method_models import TinyResNet, tiny_mlp


# --------------------------------------------------------------------------- the teacher

def test_teacher_follows_dtype_moves_and_stays_out_of_the_students_state():
    torch.manual_seed(0)
    fp = tiny_mlp()
    student = quantize_model(fp, 2, 2)  # an nn.Sequential: the teacher must not become a layer of it
    teacher = teacher_of(student)
    n_params = len(list(quantize_model(fp, 2, 2, teacher=False).parameters()))
    x = torch.randn(4, 3, 2, 2)
    student.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    assert teacher_of(student) is teacher and len(student) == len(fp)
    torch.testing.assert_close(teacher(x.double()), fp.double()(x.double()))
    assert len(list(student.parameters())) == n_params
    assert not any(id(p) in {id(q) for q in student.parameters()} for p in teacher.parameters())
    assert all(k.split(".")[0] in {str(i) for i in range(len(fp))} for k in student.state_dict())
    # it moves also when the student is inside another module that moves
    holder = nn.ModuleDict({"student": student}).to(torch.float32)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    # the student's train()/eval() and requires_grad never reach it
    holder.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student(x)  # the student still runs (nothing was added to its layers)


def test_copies_and_pickles_of_a_student_keep_their_own_teacher():
    student = quantize_model(TinyResNet(), 2, 2)
    twin = copy.deepcopy(student)
    assert teacher_of(twin) is not teacher_of(student)
    twin.double()
    assert next(teacher_of(twin).parameters()).dtype == torch.float64
    assert next(teacher_of(student).parameters()).dtype == torch.float32
    bare = copy_without_teacher(student)
    with pytest.raises(ValueError, match="no teacher"):
        teacher_of(bare)
    bare.double()  # moves without a teacher
    buf = io.BytesIO()
    torch.save(student, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert set(again.state_dict()) == set(student.state_dict())
    again.double()
    assert next(teacher_of(again).parameters()).dtype == torch.float64


def test_no_teacher_on_request():
    student = quantize_model(TinyResNet(), 2, 2, teacher=False)
    with pytest.raises(ValueError, match="teacher=False"):
        teacher_of(student)
    student.double()
    with pytest.raises(TypeError, match="teacher"):
        quantize_model(TinyResNet(), 2, 2, teacher=None)


# --------------------------------------------------------------------------- calibration batches

class KeywordNet(nn.Module):
    """A model called with keyword arguments, as Hugging Face models are."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, features, attention_mask=None, labels=None):
        h = torch.relu(self.embed(features))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(torch.relu(self.body(h)))


def test_calibrate_takes_dict_batches_and_any_forward():
    torch.manual_seed(1)
    batches = [{"features": torch.randn(2, 5, 6), "attention_mask": torch.ones(2, 5), "labels": torch.zeros(2)}
               for _ in range(3)]
    fp = KeywordNet()
    # the mask reaches `body` through no other layer, so the placement keeps it FP as an
    # input layer; this test is about calibration, so it is quantized explicitly
    student = quantize_model(fp, 4, 4, include=["body"])
    report = calibrate(student, batches)  # model(**batch)
    assert set(report) == {"body"} and math.isfinite(report["body"]["max"])
    # a forward_fn for any other signature and batch layout
    calls = []

    def forward_fn(model, batch):
        calls.append(1)
        return model(batch[1]["x"], attention_mask=batch[1]["m"])

    student2 = quantize_model(fp, 4, 4, include=["body"])
    report2 = calibrate(student2, [("id", {"x": b["features"], "m": b["attention_mask"]}) for b in batches],
                        forward_fn=forward_fn)
    assert len(calls) == 3 and report2 == report
    with pytest.raises(TypeError, match="forward_fn"):
        calibrate(student2, batches, forward_fn="model")


# --------------------------------------------------------------------------- convergence step

def test_convergence_step_probes_tests_and_tells_the_schedule():
    torch.manual_seed(2)
    student = quantize_model(tiny_mlp(), 8, 8)
    x = torch.randn(16, 3, 2, 2)
    calibrate(student, [x], bits=4.0)  # 4 calibrated bits, 8-bit targets: converged once observed
    opt = torch.optim.RAdam(gdnsq.param_groups(student, 0.01))
    schedule = GDNSQSchedule(opt, 0, hold_epochs=1)
    tracker = ConvergenceTracker(student, schedule)
    student.train()
    assert not stats.is_converged(student)  # nothing observed yet (observed bits +inf)
    first = tracker.step(x)
    assert student.training  # the probe ran in eval mode and restored the mode
    assert (first.converged, first.held, first.annealing, first.first_converged) == (True, False, False, 1)
    second = tracker.step({"input": x})  # gdnsq's dict batches; observed bits kept from the probe
    assert (second.converged, second.held, second.annealing) == (True, True, True)
    assert schedule.annealing and schedule.checks == 2
    # with unreachable targets the test fails and annealing stops
    for _, layer in stats.quantized_layers(student):
        layer.act_quantizer.target_bits.fill_(1.0)
    third = tracker.step()
    assert (third.converged, third.annealing) == (False, False)
    alone = ConvergenceTracker(student).step(x)  # without a schedule: only the test
    assert (alone.converged, alone.held, alone.annealing, alone.first_converged) == (False, False, False, None)
    with pytest.raises(TypeError, match="DistributedDataParallel|student"):
        ConvergenceTracker("student")
    with pytest.raises(TypeError, match="schedule"):
        ConvergenceTracker(student, schedule=0.1)
    with pytest.raises(TypeError, match="loader batch"):
        tracker.step("text")
