"""docs/integrations.md, Lightning: a small CNN down to W2A2 through ``GDNSQLightningCallback``,
and a run resumed from a Lightning checkpoint that ends in the uninterrupted run's state."""

import pytest
import torch

import _doc_examples

pytest.importorskip("lightning")


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """The docs example, run as written inside a temporary folder."""
    folder = tmp_path_factory.mktemp("lightning")
    return folder, _doc_examples.run_first_block("Lightning", folder)


def test_cnn_reaches_w2a2_through_lightning(lightning_run):
    from gdnsq import stats
    _, ns = lightning_run
    bits = stats.realised_bits(ns["loop"].student)
    assert len(bits) == 2 and all(v["weight"] <= 2 and v["act"] <= 2 for v in bits.values()), bits
    assert ns["loop"].schedule.first_converged is not None and ns["callback"].status.converged


def _fit(ns, folder, epochs, ckpt_path=None):
    import lightning.pytorch as L

    from gdnsq.integrations.lightning import GDNSQLightningCallback
    loop, data = ns["build"]()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(folder),
                        callbacks=[GDNSQLightningCallback(loop)])
    module = ns["Distill"](loop)
    # Without the objective as a submodule, only the callback's checkpoint entry carries mu.
    del module.objective
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return loop, trainer


def test_resumed_lightning_run_restores_t_mu_lr_and_hold(lightning_run, tmp_path):
    _, ns = lightning_run
    _, trainer = _fit(ns, tmp_path / "a", epochs=16)
    checkpoint = tmp_path / "a.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["gdnsq"]
    # resumed inside the hold: converged once, not annealing yet
    assert saved["schedule"]["first_converged"] is not None and not saved["schedule"]["annealing"]
    resumed, _ = _fit(ns, tmp_path / "b", epochs=18, ckpt_path=str(checkpoint))
    full = ns["loop"]
    a, b = full.schedule.state_dict(), resumed.schedule.state_dict()
    for key in ("last_epoch", "t", "lr", "rho", "checks", "first_converged", "converged", "annealing"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    assert [g["lr"] for g in full.schedule.optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in resumed.schedule.optimizer.param_groups], rel=1e-12)
    assert int(resumed.objective.count) == int(full.objective.count)
    # Lightning does not restore the random streams (the dither), so the resumed steps differ
    # in the last digits.
    assert float(resumed.objective.mu) == pytest.approx(float(full.objective.mu), rel=1e-4)
    assert resumed.schedule.annealing and resumed.schedule.held


def test_checkpoint_without_gdnsq_state_is_refused(lightning_run):
    from gdnsq.integrations.lightning import GDNSQLightningCallback
    with pytest.raises(ValueError, match="no 'gdnsq' entry"):
        GDNSQLightningCallback(lightning_run[1]["loop"]).on_load_checkpoint(None, None, {"state_dict": {}})
