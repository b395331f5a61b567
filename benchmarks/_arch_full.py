"""Full-size architectures for the inference benchmark and the deploy equality checks.

``build(name, scale="full")`` returns ``(fp_model, sample_shape)`` (eval mode, seeded init):

* ``r20``: the CIFAR ResNet-20 of ``gdnsq.models`` (3x32x32, 10 classes);
* ``resnet18``: torchvision's ResNet-18 (3x224x224, 1000 classes), ``torchvision.models`` when
  it imports, else the torch-only definition with torchvision's module tree
  (tests/_arch_models.py, width 64);
* ``mobilenet_v2``: torchvision's MobileNetV2, width 1.0, last channel 1280 (3x224x224, 1000
  classes), same fallback;
* ``bert``: a BERT-base-sized encoder, 12 x ``nn.TransformerEncoderLayer(768, 12, 3072, GELU,
  batch_first, post-norm, eps 1e-12)``; input = token embeddings (B, 128, 768) float; output the
  logits of a linear head on the first token (2 classes).

``scale="small"`` gives the same module trees at tiny widths and inputs (quick looks and tests
of the scripts, not measurements). ``gdnsq.quantize_model``'s default placement keeps the input
layer, the classifier and ResNet's 1x1 downsample convs FP; it quantizes the other convs
(MobileNetV2: pointwise and depthwise) and the attention projections and MLP of the encoder.
"""
from __future__ import annotations

import pathlib
import sys

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

NAMES = ("r20", "resnet18", "mobilenet_v2", "bert")


class BertEncoder(nn.Module):
    """BERT-shaped encoder on given embeddings: (B, S, d) float -> (B, num_classes) logits."""

    def __init__(self, num_layers=12, d_model=768, heads=12, ff=3072, num_classes=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-12, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x)[:, 0])


def _torchvision():
    try:
        import torchvision

        return torchvision.models
    except Exception:  # noqa: BLE001 - the CUDA wheels fail to import beside the CPU torch in many ways
        return None


def build(name: str, scale: str = "full", seed: int = 0):
    """``(fp_model, sample_shape)`` of architecture ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    if scale not in ("full", "small"):
        raise ValueError(f"scale must be 'full' or 'small', got {scale!r}")
    torch.manual_seed(seed)
    full = scale == "full"
    tv = _torchvision() if full else None
    if name == "r20":
        from gdnsq.models import get_model

        return get_model("resnet20", 10).eval(), (3, 32, 32)
    if name == "resnet18":
        from _arch_models import ResNet18

        model = tv.resnet18(num_classes=1000) if tv else ResNet18(num_classes=1000 if full else 10,
                                                                  width=64 if full else 8)
        return model.eval(), (3, 224, 224) if full else (3, 32, 32)
    if name == "mobilenet_v2":
        from _arch_models import MobileNetV2

        model = (tv.mobilenet_v2(num_classes=1000, width_mult=1.0) if tv else
                 MobileNetV2(num_classes=1000, width_mult=1.0, last_channel=1280) if full else
                 MobileNetV2(num_classes=10, width_mult=0.25, last_channel=64))
        return model.eval(), (3, 224, 224) if full else (3, 32, 32)
    if full:
        return BertEncoder().eval(), (128, 768)
    return BertEncoder(num_layers=2, d_model=32, heads=4, ff=64).eval(), (16, 32)

