"""Model registry and checkpoint loading for the CIFAR ResNets.

Example::

    from gdnsq.models import get_model, load_fp_checkpoint
    model = get_model("resnet20", num_classes=10)
    meta = load_fp_checkpoint(model, "../shared/models/resnet20_cifar10_akamaster.th")
    meta["normalization"]   # "imagenet": the input normalisation the weights expect

Checkpoint layouts :func:`load_fp_checkpoint` understands (all read with ``torch.load(weights_only=True)``):

* akamaster: ``{"best_prec1": float, "state_dict": {"module.<name>": tensor}}`` (DataParallel
  prefix stripped; normalisation "imagenet");
* gdnsq FP checkpoints written by ``gdnsq train-fp`` (:func:`save_fp_checkpoint`):
  ``{"format": "gdnsq-fp", "model": name, "num_classes": k, "normalization": str,
  "state_dict": {...}, ...}``;
* any dict holding a state dict under ``"state_dict"``, ``"model"`` or ``"student"``, or a bare
  state dict.
"""
from __future__ import annotations

import pathlib
import pickle
import re
from typing import Dict, Mapping

import torch
import torch.nn as nn

from .._atomic import atomic_torch_save
from .._sealed import is_sealed, read_sealed

from .resnet_cifar import DEPTHS, BasicBlock, CifarResNet, OptionAShortcut, resnet20, resnet32, \
    resnet44, resnet56

__all__ = ["MODELS", "DEPTHS", "get_model", "infer_model_name", "extract_state_dict", "load_fp_checkpoint",
           "fit_state_dict", "save_fp_checkpoint", "read_checkpoint", "CheckpointMismatch",
           "CifarResNet", "BasicBlock", "OptionAShortcut", "resnet20", "resnet32", "resnet44",
           "resnet56"]

#: name -> constructor(num_classes) -> nn.Module
MODELS = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56}

#: normalisation assumed for checkpoints that do not record one (the akamaster teachers')
DEFAULT_NORMALIZATION = "imagenet"


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not fit the model (missing/unexpected keys or wrong shapes)."""


def get_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) with ``num_classes`` outputs, He-initialised."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](num_classes)


def infer_model_name(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The :data:`MODELS` name whose layout a CIFAR ResNet state dict has (from its block count).

    Raises ValueError when the state dict is not one of those ResNets (then name the model)."""
    blocks = {int(k.split(".")[1]) for k in state_dict
              if k.startswith("layer1.") and k.split(".")[1].isdigit()}
    for name, blocks_per_stage in DEPTHS.items():
        if blocks and max(blocks) + 1 == blocks_per_stage and name in MODELS:
            return name
    raise ValueError("cannot tell the architecture of this checkpoint (not a CIFAR ResNet "
                     f"{'/'.join(sorted(MODELS))} state dict); name it explicitly")


def read_checkpoint(path) -> object:
    """Read a checkpoint on the CPU, safely: FileNotFoundError / one-line ValueError.

    Files are read with ``torch.load(weights_only=True)`` (tensors and plain Python values only;
    unpickling anything else could run code from the file). gdnsq trainer checkpoints are verified
    against their checksum first. A file that holds other Python objects is refused with a
    one-line ValueError naming it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_sealed(path):
        return read_sealed(path)  # SealError is a ValueError naming the file
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle at all, or a damaged one
            raise ValueError(f"checkpoint {path} cannot be read (UnpicklingError: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        raise ValueError(f"checkpoint {path} holds a Python object ({found.group(1)}) besides "
                         "tensors and plain containers; gdnsq loads checkpoints with "
                         "weights_only=True and will not unpickle it (that can run code from the "
                         "file): re-save only its state dict (torch.save(model.state_dict(), ...)) "
                         "in a session you trust") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def extract_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint object, ``module.`` prefixes removed."""
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "student", "model_state_dict", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError("checkpoint holds no model state dict (expected tensors under "
                         "'state_dict', 'model' or 'student', or a bare state dict)")
    out = {}
    for k, v in sd.items():
        # DataParallel / DistributedDataParallel save "module.<name>"
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model`` strictly, raising :class:`CheckpointMismatch` (one line).

    BatchNorm ``num_batches_tracked`` buffers are the only keys allowed to be missing (old
    checkpoints, e.g. the akamaster ones, predate them; they do not affect eval).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise CheckpointMismatch("checkpoint does not fit the model: " + "; ".join(parts))
    model.load_state_dict(dict(state_dict), strict=False)


def load_fp_checkpoint(model: nn.Module, path) -> dict:
    """Load an FP checkpoint (any layout above) into ``model``; return its metadata.

    ``path`` may also be an already loaded checkpoint object (see :func:`read_checkpoint`).

    Returns ``{"normalization": str, "format": str, "model": name or None, "best_prec1": float
    or None, "epoch": int or None}``. Raises FileNotFoundError (no file), ValueError (unreadable
    file or no state dict) or :class:`CheckpointMismatch` (does not fit ``model``).
    """
    obj = path if isinstance(path, Mapping) else read_checkpoint(path)
    fit_state_dict(model, extract_state_dict(obj))
    meta = obj if isinstance(obj, Mapping) else {}
    fmt = meta.get("format") or ("akamaster" if "best_prec1" in meta else "state_dict")
    return {
        "normalization": meta.get("normalization", DEFAULT_NORMALIZATION),
        "format": fmt,
        "model": meta.get("model"),
        "best_prec1": meta.get("best_prec1"),
        "epoch": meta.get("epoch"),
    }


def save_fp_checkpoint(path, model: nn.Module, *, model_name: str, num_classes: int,
                       normalization: str, **extra) -> None:
    """Write a gdnsq FP checkpoint atomically (temp file in the same folder, then rename).

    ``extra`` entries (epoch, optimizer state, loader state, accuracies...) are stored as is.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": "gdnsq-fp", "model": model_name, "num_classes": num_classes,
           "normalization": normalization, "state_dict": model.state_dict(), **extra}
    atomic_torch_save(obj, path)
