"""gdnsq.calibrate.reestimate_batchnorm: exact statistics of the data, mode and momentum restored."""
import torch
from torch import nn

from gdnsq.calibrate import reestimate_batchnorm


def test_reestimate_batchnorm_gives_the_data_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    bn.running_mean.fill_(7.0)  # stale statistics
    bn.running_var.fill_(9.0)
    batches = [torch.randn(4, 3, 6, 6) * 2 + 1 for _ in range(3)]
    used = reestimate_batchnorm(model, [(x, 0) for x in batches], num_batches=2)
    assert used == 8
    with torch.no_grad():
        y = [conv(x) for x in batches[:2]]
    # a cumulative average over the two batches: the mean of the batch means / unbiased variances
    means = torch.stack([t.mean((0, 2, 3)) for t in y])
    vars_ = torch.stack([t.var((0, 2, 3), unbiased=True) for t in y])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, vars_.mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and not model.training


def test_reestimate_batchnorm_without_batchnorm_is_a_no_op():
    model = nn.Sequential(nn.Linear(3, 2))
    assert reestimate_batchnorm(model, [torch.randn(2, 3)]) == 0
