"""Data-parallel training with 2 CPU processes (gloo): every rank takes identical steps, and
those steps are the single-process steps on the concatenated batches.

The ranks see different shards of the data (checked), so without DDP's gradient all-reduce,
the loss-mean reduction and the buffer averaging their weights would drift apart; and a
gradient sum instead of a mean would make the steps differ from the single-process run (RAdam's
first, unrectified steps are proportional to the gradient).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _trainer_tiny as tiny
from gdnsq.train import distributed as gdist
from gdnsq.train.checkpoint import LAST, METRICS, load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EPOCHS = 2


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-rank spawn for the whole module: the tiny BatchNorm run, then the plain run."""
    out = tmp_path_factory.mktemp("ddp")
    old = os.environ.get("GDNSQ_BACKEND")
    os.environ["GDNSQ_BACKEND"] = "torch"  # inherited by the spawned ranks
    try:
        mp.spawn(tiny.ddp_worker, args=(2, _free_port(), str(out), EPOCHS), nprocs=2, join=True)
    finally:
        if old is None:
            os.environ.pop("GDNSQ_BACKEND")
        else:
            os.environ["GDNSQ_BACKEND"] = old
    return out


def test_two_ranks_take_identical_steps(ddp_run):
    tmp_path, epochs = ddp_run, EPOCHS
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["first_batch_sum"] != r1["first_batch_sum"]  # different shards
    assert r0["steps"] == r1["steps"] == epochs * (256 // 2 // 16)  # 256 images, 2 shards, batch 16
    assert r0["student"].keys() == r1["student"].keys()
    for k in r0["student"]:
        assert torch.equal(r0["student"][k], r1["student"][k]), k
    assert r0["objective"] == r1["objective"] and r0["schedule"] == r1["schedule"]
    # The weights moved (the ranks did not just keep their identical starting point).
    start, _ = tiny.student_teacher()
    assert not torch.equal(start.state_dict()["conv2.weight"], r0["student"]["conv2.weight"])
    # Rank 0 alone wrote the files: one epoch record per epoch, a checkpoint with both RNGs.
    with open(tmp_path / METRICS) as f:
        kinds = [line.split('"kind": "')[1].split('"')[0] for line in f]
    assert kinds.count("epoch") == epochs
    ckpt = load_checkpoint(str(tmp_path / LAST))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # The val accuracy is over the whole validation set (both shards summed).
    assert r0["report"]["val_top1"] == r1["report"]["val_top1"] or r0["report"]["val_top1"] is None


def test_ddp_equals_single_process_on_concatenated_batches(ddp_run, tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    from gdnsq.train.trainer import Trainer
    monkeypatch.setenv("GDNSQ_BACKEND", "torch")  # as the ranks
    r0 = torch.load(ddp_run / "equiv_rank0.pt", weights_only=True)
    r1 = torch.load(ddp_run / "equiv_rank1.pt", weights_only=True)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # the same epoch in one process: each step sees both ranks' batches, concatenated
    torch.set_num_threads(1)
    student, teacher = tiny.plain_student_teacher()
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    xtr, ytr = tiny.make_data(256, 1)
    train = tiny.ConcatShards(TensorDataset(xtr, ytr), 16, world_size=2, seed=0)
    trainer = Trainer(student, teacher, train, None, config=tiny.fast_config(**tiny.EQUIV_CONFIG),
                      out_dir=str(tmp_path / "single"))
    trainer.fit()
    assert trainer.global_step == r0["steps"] == 256 // 2 // 16
    moved = 0.0
    for n, p in trainer.student.named_parameters():
        torch.testing.assert_close(r0["params"][n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
        moved = max(moved, float((p.detach() - start[n]).abs().max()))
    assert moved > 1e-3  # the training moved the weights far beyond the tolerance


def test_helpers_are_identity_without_process_group():
    assert not gdist.is_distributed() and gdist.rank() == 0 and gdist.world_size() == 1 and gdist.is_main()
    t = torch.arange(3.0)
    assert gdist.all_reduce_mean(t) is t and gdist.all_reduce_max(2.5) == 2.5
    assert gdist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert gdist.make_sampler(list(range(4))) is None
    info = gdist.init_from_env(device="cpu")  # no WORLD_SIZE: single process, nothing initialised
    assert (info.rank, info.world_size, info.backend) == (0, 1, None) and not dist.is_initialized()
    assert gdist.default_backend(torch.device("cpu")) == "gloo"
    assert gdist.default_backend(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="backend"):
        gdist.init_from_env(backend="mpi")
    with pytest.raises(ValueError, match="batch_size"):
        gdist.make_loader(list(range(4)), 0, shuffle=True)
    loader = gdist.make_loader(list(range(10)), 4, shuffle=True, seed=3)
    assert sorted(x for b in loader for x in b.tolist()) == list(range(10))


def test_resume_under_ddp_reads_the_checkpoint_on_rank_0_only(ddp_run):
    """Rank 1's checkpoint reads raise in the resumed segment; it still resumes, from rank 0's
    broadcast, and both ranks end identical. The convergence step's max-sync of the observed
    activation bits gives every rank the maximum."""
    r0 = torch.load(ddp_run / "resume_rank0.pt", weights_only=True)
    r1 = torch.load(ddp_run / "resume_rank1.pt", weights_only=True)
    assert r0["resumed_from"] == r1["resumed_from"] == 1
    assert r0["steps"] == r1["steps"] == 2 * (256 // 2 // 16)
    for k in r0["student"]:
        assert torch.equal(r0["student"][k], r1["student"][k]), k
    assert r0["schedule"] == r1["schedule"]
    assert r0["observed"] == r1["observed"] == [10.0, 11.0]
