"""gdnsq.calibrate.reestimate_batchnorm: exact statistics of the data, mode and momentum restored."""
import torch
from torch import nn

from gdnsq.calibrate import reestimate_batchnorm


def test_reestimate_batchnorm_gives_the_data_statistics():
    """The running statistics become the mean and unbiased variance of every value each channel
    received, all used batches pooled. The batches have different means, so the pooled variance
    (within-batch spread plus the spread of the batch means) differs clearly from the average of
    the per-batch variances that a cumulative BatchNorm average gives."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    bn.running_mean.fill_(7.0)  # stale statistics
    bn.running_var.fill_(9.0)
    batches = [torch.randn(4, 3, 6, 6) * 2 + 3 * i for i in range(3)]
    used = reestimate_batchnorm(model, [(x, 0) for x in batches], num_batches=2)
    assert used == 8
    with torch.no_grad():
        seen = torch.cat([conv(x) for x in batches[:2]]).double()  # (8, 5, 6, 6): what bn saw
    per_channel = seen.transpose(0, 1).reshape(5, -1)
    n = per_channel.shape[1]
    mean = per_channel.sum(1) / n
    var = ((per_channel - mean[:, None]) ** 2).sum(1) / (n - 1)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and not model.training


def test_reestimate_batchnorm_skips_batchnorms_without_running_stats():
    bn = nn.BatchNorm1d(4, track_running_stats=False)
    model = nn.Sequential(nn.Linear(3, 4), bn)
    assert reestimate_batchnorm(model, [torch.randn(6, 3)]) == 0
    assert bn.running_mean is None and bn.running_var is None


def test_reestimate_batchnorm_without_batchnorm_is_a_no_op():
    model = nn.Sequential(nn.Linear(3, 2))
    assert reestimate_batchnorm(model, [torch.randn(2, 3)]) == 0
