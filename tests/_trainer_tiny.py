"""Tiny model and synthetic data shared by the trainer, resume and DDP tests.

The task: 4 classes of 3x8x8 images, class k has a bright 4x4 patch in quadrant k on top of
Gaussian noise. A 3-conv net learns it to ~100 % in a few dozen steps, so a GDNSQ run from it
can be checked for "accuracy stays above chance (25 %)" at W2A2.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 4


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    for k in range(NUM_CLASSES):
        r, c = divmod(k, 2)
        x[y == k, :, r * 4:r * 4 + 4, c * 4:c * 4 + 4] += 1.5
    return x, y


class TinyNet(nn.Module):
    """conv(FP, first) -> conv -> conv -> mean pool -> linear(FP, last): two quantized convs.
    ``batchnorm=False`` replaces the BatchNorms by identities (per-sample independent forward)."""

    def __init__(self, batchnorm: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = norm(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = norm(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn3 = norm(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


@functools.lru_cache(maxsize=1)
def _fp_state():
    torch.manual_seed(1234)
    m = TinyNet()
    x, y = make_data(512, 1)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in m.state_dict().items()}


def fp_model() -> TinyNet:
    """A TinyNet trained in FP on the synthetic task (same weights on every call)."""
    m = TinyNet()
    m.load_state_dict(_fp_state())
    return m


def fp_accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def loaders(n_train=512, n_val=128, batch_size=32, seed=0, generator=True):
    """(train_loader, val_loader, test_loader) on fresh synthetic data; the train loader
    shuffles with its own seeded generator (or the global RNG when ``generator=False``)."""
    xtr, ytr = make_data(n_train, 1)
    xva, yva = make_data(n_val, 2)
    xte, yte = make_data(n_val, 3)
    gen = torch.Generator().manual_seed(seed) if generator else None
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True, generator=gen)
    val = DataLoader(TensorDataset(xva, yva), batch_size=64)
    test = DataLoader(TensorDataset(xte, yte), batch_size=64)
    return train, val, test


def student_teacher(weight_bits=2, act_bits=2, calib_bits=4.0, calib_loader=None):
    """Converted + calibrated student and its FP teacher. Calibration starts at ``calib_bits``
    (4 instead of the paper's 10) so that W2A2 is reached in a few dozen steps."""
    import gdnsq
    student = gdnsq.quantize_model(fp_model(), weight_bits=weight_bits, act_bits=act_bits)
    teacher = gdnsq.teacher_of(student)
    if calib_loader is None:
        calib_loader = loaders()[1]
    gdnsq.calibrate(student, calib_loader, bits=calib_bits)
    return student, teacher


def fast_config(**overrides):
    """A config for the tiny task: large LR (RAdam's rectification keeps early steps small),
    short warm-up, fast t growth, LR halving every ~2 epochs after convergence."""
    from gdnsq.train.presets import get_preset
    values = dict(lr=0.2, quantizer_lr_scale=1.0, warmup_steps=5, t_scale=5.0, anneal=0.95, val_every=1, patience=3,
                  max_epochs=8, log_every=2, progress=False, device="cpu", seed=0,
                  precision="fp32")  # the same numbers on every CPU ("auto" picks bf16 on some)
    values.update(overrides)
    return get_preset("cpu-fast", **values)


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str, epochs: int):
    """One rank of the 2-process DDP test (torch.multiprocessing.spawn entry point)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gdnsq.train import distributed as gdist
    from gdnsq.train.trainer import Trainer
    info = gdist.init_from_env(device="cpu")
    assert info.backend == "gloo" and info.world_size == world_size
    try:
        student, teacher = student_teacher()
        xtr, ytr = make_data(256, 1)
        xva, yva = make_data(128, 2)
        train = gdist.make_loader(TensorDataset(xtr, ytr), 16, shuffle=True, seed=0)
        val = gdist.make_loader(TensorDataset(xva, yva), 32, shuffle=False)
        first_batch_sum = float(next(iter(train))[0].sum())
        trainer = Trainer(student, teacher, train, val, config=fast_config(max_epochs=epochs), out_dir=out_dir)
        report = trainer.fit()
        torch.save({"student": trainer.student.state_dict(), "objective": trainer.objective.state_dict(),
                    "schedule": trainer.schedule.state_dict(), "first_batch_sum": first_batch_sum,
                    "report": report, "steps": trainer.global_step},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        _equivalence_run(rank, out_dir)  # same process group: one spawn serves every test
        _resume_run(rank, out_dir)
    finally:
        gdist.cleanup()


def plain_student_teacher():
    """A BatchNorm-free TinyNet student without dither (its forward on a batch is the
    concatenation of its forwards on the batch's parts, so a data-parallel step equals one
    step on the concatenated batch) and its teacher; random FP weights (seeded)."""
    import gdnsq
    torch.manual_seed(77)
    student = gdnsq.quantize_model(TinyNet(batchnorm=False), weight_bits=2, act_bits=2, dither=False)
    teacher = gdnsq.teacher_of(student)
    gdnsq.calibrate(student, loaders()[1], bits=4.0)
    return student, teacher


EQUIV_CONFIG = dict(lr=0.05, max_epochs=1, warmup_steps=2)


class ConcatShards:
    """The batches of a ``world_size``-rank DistributedSampler run, concatenated in rank order:
    step i yields [rank 0's batch i; rank 1's batch i; ...] (the single-process equivalent)."""

    def __init__(self, dataset, batch_size: int, world_size: int, seed: int = 0):
        from torch.utils.data.distributed import DistributedSampler
        self.dataset, self.batch_size = dataset, batch_size
        self.samplers = [DistributedSampler(dataset, num_replicas=world_size, rank=r, shuffle=True, seed=seed)
                         for r in range(world_size)]

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)

    def __len__(self):
        return -(-len(self.samplers[0]) // self.batch_size)

    def __iter__(self):
        shards = [list(s) for s in self.samplers]
        for i in range(0, len(shards[0]), self.batch_size):
            idx = [j for shard in shards for j in shard[i:i + self.batch_size]]
            yield self.dataset[idx]


def _equivalence_run(rank: int, out_dir: str):
    """This rank's part of the DDP-equals-concatenated-batch test: one epoch of the plain
    student; its parameters go to ``out_dir/equiv_rank<rank>.pt``."""
    from gdnsq.train import distributed as gdist
    from gdnsq.train.trainer import Trainer
    student, teacher = plain_student_teacher()
    xtr, ytr = make_data(256, 1)
    train = gdist.make_loader(TensorDataset(xtr, ytr), 16, shuffle=True, seed=0)
    trainer = Trainer(student, teacher, train, None, config=fast_config(**EQUIV_CONFIG),
                      out_dir=os.path.join(out_dir, "equiv"))
    trainer.fit()
    torch.save({"params": {n: p.detach().clone() for n, p in trainer.student.named_parameters()},
                "steps": trainer.global_step}, os.path.join(out_dir, f"equiv_rank{rank}.pt"))


def _resume_run(rank: int, out_dir: str):
    """This rank's part of the DDP resume test: one epoch, then a resumed second one during which
    every checkpoint read on rank 1 raises (as if its disk did not hold rank 0's files); and a
    max-sync of rank-specific observed bits. Results go to ``out_dir/resume_rank<rank>.pt``."""
    from gdnsq.convergence import sync_observed_bits
    from gdnsq.stats import quantized_layers
    from gdnsq.train import checkpoint, distributed as gdist
    from gdnsq.train.trainer import Trainer
    run_dir = os.path.join(out_dir, "resume")

    def trainer(max_epochs):
        student, teacher = student_teacher()
        train = gdist.make_loader(TensorDataset(*make_data(256, 1)), 16, shuffle=True, seed=0)
        val = gdist.make_loader(TensorDataset(*make_data(128, 2)), 32, shuffle=False)
        return Trainer(student, teacher, train, val, config=fast_config(max_epochs=max_epochs), out_dir=run_dir)

    trainer(1).fit()
    if rank == 1:
        def refuse(*args, **kwargs):
            raise AssertionError("rank 1 read a trainer checkpoint itself")
        checkpoint.load_checkpoint = refuse
    resumed = trainer(2)
    resumed_from = resumed.resumed_from
    resumed.fit()
    layers = [layer for _, layer in quantized_layers(resumed.student)]
    for i, layer in enumerate(layers):
        layer.act_quantizer.observed_bits.fill_(float(10 * rank + i))
    sync_observed_bits(resumed.student)
    torch.save({"resumed_from": resumed_from, "steps": resumed.global_step,
                "student": resumed.student.state_dict(), "schedule": resumed.schedule.state_dict(),
                "observed": [float(layer.act_quantizer.observed_bits) for layer in layers]},
               os.path.join(out_dir, f"resume_rank{rank}.pt"))
