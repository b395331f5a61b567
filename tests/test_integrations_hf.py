"""docs/integrations.md, Hugging Face: a tiny BERT through ``GDNSQTrainer`` down to W4A4, and a
run resumed from a mid-run checkpoint that ends in the uninterrupted run's state."""
import pytest
import torch

import _doc_examples

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """The docs example, run as written inside a temporary folder."""
    folder = tmp_path_factory.mktemp("hf")
    return folder, _doc_examples.run_first_block("Hugging Face `Trainer`", folder)


def test_bert_reaches_w4a4_through_hf_trainer(hf_run):
    from gdnsq import stats
    _, ns = hf_run
    student = ns["trainer"].gdnsq.student
    bits = stats.realised_bits(student)
    assert len(bits) >= 10  # the encoder's linears and the pooler are quantized
    assert all(v["weight"] <= 4 and v["act"] <= 4 for v in bits.values()), bits
    schedule = ns["trainer"].gdnsq.schedule
    assert schedule.first_converged is not None and schedule.n == 15 * 8


def test_resumed_hf_run_restores_t_mu_lr_and_hold(hf_run):
    import os

    from gdnsq.integrations.huggingface import STATE_FILE
    folder, ns = hf_run
    checkpoint = folder / "runs" / "bert-w4a4" / "checkpoint-104"
    # The checkpoint is inside the hold: converged once, not annealing yet.
    from gdnsq._sealed import read_sealed
    state = read_sealed(checkpoint / STATE_FILE)
    assert state["schedule"]["first_converged"] is not None and not state["schedule"]["annealing"]
    assert state["objective"]["count"].item() == 104 + 1

    old = os.getcwd()
    os.chdir(folder)
    try:
        resumed = ns["build"]("runs/bert-w4a4-resumed")
        fresh_mu = float(resumed.gdnsq.objective.mu)
        resumed.train(resume_from_checkpoint=str(checkpoint.relative_to(folder)))
    finally:
        os.chdir(old)
    assert fresh_mu == 0.0
    full, again = ns["trainer"].gdnsq, resumed.gdnsq
    a, b = full.schedule.state_dict(), again.schedule.state_dict()
    for key in ("last_epoch", "t", "lr", "rho", "checks", "first_converged", "converged", "annealing"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    assert again.schedule.annealing and again.schedule.held  # the hold ended after the resume
    assert [g["lr"] for g in full.schedule.optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in again.schedule.optimizer.param_groups], rel=1e-12)
    assert int(again.objective.count) == int(full.objective.count)
    assert float(again.objective.mu) == pytest.approx(float(full.objective.mu), rel=1e-6)
    sa, sb = full.student.state_dict(), again.student.state_dict()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resume_without_gdnsq_state_is_refused(hf_run, tmp_path):
    from gdnsq.integrations.huggingface import load_checkpoint_state
    with pytest.raises(FileNotFoundError, match="gdnsq_state.pt not found"):
        load_checkpoint_state(hf_run[1]["trainer"].gdnsq, str(tmp_path))
