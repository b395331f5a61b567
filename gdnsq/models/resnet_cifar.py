"""CIFAR ResNets (He et al. 2016, section 4.2) with option-A shortcuts: ResNet-20/32/44/56.

The layout and parameter names match the checkpoints of akamaster/pytorch_resnet_cifar10: stem ``conv1``/``bn1`` (3->16, 3x3), stages ``layer1..3`` of n basic blocks with 16, 32,
64 channels (stride 2 at the first block of stages 2 and 3), global average pooling and
``linear`` (64 -> classes, with bias). Depth = 6n + 2.

Option-A shortcut: identity, or where the shape changes ``x[:, :, ::2, ::2]`` zero-padded with
``planes // 4`` channels on each side. It has no parameters, so the state dict holds only convs,
BatchNorms and the classifier. The activations are ``F.relu`` calls (not modules), so every conv
input except the stem's follows a ReLU (non-negative), which the quantizer placement relies on.

Input: float32 (B, 3, 32, 32), normalised (the akamaster teachers use "imagenet" mean/std on
[0, 1] RGB). Output: logits (B, num_classes).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CifarResNet", "BasicBlock", "OptionAShortcut", "resnet20", "resnet32", "resnet44",
           "resnet56", "DEPTHS"]

#: model name -> blocks per stage (n, depth = 6n + 2)
DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad ``pad`` channels on each side.

    (B, C, H, W) -> (B, C + 2*pad, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            # option A assumes planes = 2 * in_planes, as in every CIFAR ResNet stage change
            self.shortcut = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``blocks_per_stage`` basic blocks per stage (depth 6n+2)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be a positive int, got {blocks_per_stage!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.blocks_per_stage = blocks_per_stage
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            # He-normal init for convs and the classifier, as the original CIFAR ResNets
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(DEPTHS["resnet20"], num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(DEPTHS["resnet32"], num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(DEPTHS["resnet44"], num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(DEPTHS["resnet56"], num_classes)
