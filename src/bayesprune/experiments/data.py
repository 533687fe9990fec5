"""Data sets for the experiments: digits, MNIST, Fashion-MNIST, CIFAR-10 and TinyImageNet.

Everything is decoded once into uint8 tensors (cached in memory, and for CIFAR-10 JPEG/image
trees also on disk), preprocessed into float tensors and served from memory through
:class:`ImageTensorDataset`.  See ``docs/data.md`` for supported layouts and choices.

Public API: :func:`load_dataset`, :class:`DatasetSplits`, :data:`DATASETS`, :func:`make_loader`,
:func:`download`, :data:`MIRRORS`, :data:`CHECKSUMS`, the errors :class:`DataError`,
:class:`DataNotFoundError`, :class:`ChecksumError`, :class:`DownloadError`, and
:func:`clear_cache`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "CIFAR10_CLASSES",
    "MIRRORS",
    "CHECKSUMS",
    "DatasetSplits",
    "ImageTensorDataset",
    "DataError",
    "DataNotFoundError",
    "ChecksumError",
    "DownloadError",
    "load_dataset",
    "make_loader",
    "download",
    "default_data_dir",
    "clear_cache",
]

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "tinyimagenet")

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: Base URLs tried in order by :func:`download`; a file's URL is ``base + filename``.
#: Override by editing this dict or with the environment variable ``BAYESPRUNE_MIRROR``
#: (comma-separated base URLs; ``{name}`` in a URL is replaced by the data set name).
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/",
    ],
    "cifar10": [
        "https://www.cs.toronto.edu/~kriz/",
    ],
    "tinyimagenet": [
        "http://cs231n.stanford.edu/",
    ],
}

#: md5 checksums checked after a download.  For the IDX files it is the md5 of the
#: *decompressed* file (mirrors recompress the .gz files, the content stays identical); for
#: CIFAR-10 it is the md5 of the tarball itself.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    },
    "tinyimagenet": {
        "tiny-imagenet-200.zip": "90528d7ca1a48142e341f4ef8d21d0de",
    },
}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Sub-folders of a parent data_dir searched for each data set, in order.
_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST", "mnist/raw"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist", "FashionMNIST",
                      "fashion-mnist/raw"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10", "cifar10-jpeg"),
    "tinyimagenet": ("tiny-imagenet-200", "tinyimagenet", "tiny-imagenet"),
}

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_PICKLE_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_ZIP_NAMES = ("cifar10-jpeg.zip", "cifar10.zip", "cifar-10.zip")


# --------------------------------------------------------------------------------------------
# errors


class DataError(ValueError):
    """A data file exists but is corrupt, truncated or not in the expected format."""


class ChecksumError(DataError):
    """A downloaded file does not have the expected md5 checksum."""


class DataNotFoundError(FileNotFoundError):
    """A required data file is missing."""


class DownloadError(RuntimeError):
    """No mirror could deliver a file (network errors)."""


def _missing(path: Path | str, what: str, name: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{name}: missing {what}: {path} does not exist. Point --data-dir (data_dir=) at a "
        f"folder holding the {name} files, or pass download=True (--download) to fetch them."
    )


# --------------------------------------------------------------------------------------------
# datasets and splits


class ImageTensorDataset(TensorDataset):
    """Whole data set held as two tensors: ``images`` float [N,C,H,W], ``labels`` int64 [N].

    ``ds[i]`` gives ``(image, int label)``.  Indexing with a list/tensor of indices gives a
    batch ``(images[idx], labels[idx])``; :func:`make_loader` uses that to batch without
    per-item collation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        super().__init__(images, labels.to(torch.int64))

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) or (
            isinstance(index, torch.Tensor) and index.ndim == 0
        ):
            return self.tensors[0][index], int(self.tensors[1][index])
        if isinstance(index, slice):
            return self.tensors[0][index], self.tensors[1][index]
        idx = torch.as_tensor(index, dtype=torch.int64)
        return self.tensors[0][idx], self.tensors[1][idx]


@dataclass
class DatasetSplits:
    """Train/validation/test splits of one data set plus what a model needs to know."""

    train: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    in_channels: int
    image_size: int
    num_classes: int
    name: str

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def example_inputs(self, batch_size: int = 1) -> torch.Tensor:
        """A zero tensor of the input shape (for tracing / Torch-Pruning)."""
        return torch.zeros(batch_size, *self.input_shape)


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction))
    val_idx, _ = torch.sort(perm[:n_val])
    train_idx, _ = torch.sort(perm[n_val:])
    return train_idx, val_idx


def _make_splits(name, x_train, y_train, x_test, y_test, val_fraction, seed, num_classes=10) -> DatasetSplits:
    train_idx, val_idx = _split_indices(x_train.shape[0], val_fraction, seed)
    return DatasetSplits(
        train=ImageTensorDataset(x_train[train_idx], y_train[train_idx]),
        val=ImageTensorDataset(x_train[val_idx], y_train[val_idx]),
        test=ImageTensorDataset(x_test, y_test),
        in_channels=int(x_train.shape[1]),
        image_size=int(x_train.shape[-1]),
        num_classes=num_classes,
        name=name,
    )


def default_data_dir() -> Path:
    """``$BAYESPRUNE_DATA_DIR`` if set, else ``~/.cache/bayesprune/data``."""
    env = os.environ.get("BAYESPRUNE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return _cache_root() / "data"


def _cache_root() -> Path:
    env = os.environ.get("BAYESPRUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bayesprune"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    download: bool = False,
    resize: str = "bilinear",
    image_size: int | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASETS`) as in-memory train/val/test splits.

    The validation set is a seeded ``val_fraction`` share of the official training set (for
    ``digits``: of the 80% that is not the fixed test split; for ``tinyimagenet`` the test set
    is the labelled official ``val/`` set).  ``data_dir`` is ignored for ``digits``; for the
    others it defaults to :func:`default_data_dir`.  ``resize`` chooses how 28x28
    (Fashion-)MNIST becomes 32x32: ``"bilinear"`` (default, as the BMRS reference) or ``"pad"``
    (2 zero pixels each side, as the LeNet-5 papers).  ``image_size``: resize every image to
    this side (bilinear, antialiased when shrinking; default: the data set's own, 32 or 64);
    28 gives (Fashion-)MNIST's images as they are.
    ``train_subset`` / ``test_subset``: keep that many images of the official training / test
    set, a random choice fixed for all seeds (before the validation split).
    """
    key = str(name).lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "tiny-imagenet": "tinyimagenet",
           "tiny-imagenet-200": "tinyimagenet"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    for arg, n in (("train_subset", train_subset), ("test_subset", test_subset)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{arg} must be a positive integer (a number of images), got {n!r}")
    num_classes = 10
    if key == "digits":
        splits = _load_digits(val_fraction, seed, train_subset, test_subset)
        return _resized(splits, image_size)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in ("mnist", "fashion-mnist"):
        if resize not in ("bilinear", "pad"):
            raise ValueError(f"resize must be 'bilinear' or 'pad', got {resize!r}")
        folder = _find_idx_folder(key, root, download)
        xtr, ytr = _subset(*_read_idx_pair(key, folder, "train"), train_subset, "train_subset", key)
        xte, yte = _subset(*_read_idx_pair(key, folder, "test"), test_subset, "test_subset", key)
        native = image_size == 28  # the images as they are, not resized to 32 and back
        xtr, xte = _preprocess_mnist(xtr, resize, native), _preprocess_mnist(xte, resize, native)
    else:
        if key == "cifar10":
            (xtr, ytr), (xte, yte) = _load_cifar10_uint8(root, download)
        else:
            (xtr, ytr), (xte, yte) = _load_tinyimagenet_uint8(root, download)
            num_classes = TINYIMAGENET_CLASSES
        xtr, ytr = _subset(xtr, ytr, train_subset, "train_subset", key)
        xte, yte = _subset(xte, yte, test_subset, "test_subset", key)
        xtr, xte = _preprocess_cifar(xtr), _preprocess_cifar(xte)
    xtr, xte = _resize(xtr, image_size), _resize(xte, image_size)
    return _make_splits(key, xtr, ytr, xte, yte, val_fraction, seed, num_classes)


#: seed of the random choice of ``train_subset`` / ``test_subset`` images (the same for every run seed)
SUBSET_SEED = 0


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None, arg: str, name: str):
    """``n`` images of (x, y) chosen at random with :data:`SUBSET_SEED`, in their original order."""
    if n is None or n == x.shape[0]:
        return x, y
    if n > x.shape[0]:
        raise ValueError(f"{arg}={n} but {name} has only {x.shape[0]} images there")
    idx, _ = torch.sort(torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SUBSET_SEED))[:n])
    return x[idx], y[idx]


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """float [N,C,H,W] -> [N,C,size,size], bilinear (antialiased when shrinking), in chunks."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=x.dtype)
    for s in range(0, x.shape[0], 2048):
        out[s : s + 2048] = F.interpolate(x[s : s + 2048], size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=size < x.shape[-1])
    return out


def _resized(splits: DatasetSplits, size: int | None) -> DatasetSplits:
    if size is None or splits.image_size == size:
        return splits
    for part in ("train", "val", "test"):
        ds = getattr(splits, part)
        setattr(splits, part, ImageTensorDataset(_resize(ds.images, size), ds.labels))
    splits.image_size = size
    return splits


# --------------------------------------------------------------------------------------------
# preprocessing


def _preprocess_mnist(x: torch.Tensor, resize: str, native: bool = False) -> torch.Tensor:
    """uint8 [N,28,28] -> float [N,1,32,32] (``native``: [N,1,28,28]), values (pixel - 127) / 255."""
    x = x.unsqueeze(1)
    if native:
        out = x.float()
    elif resize == "pad":
        out = F.pad(x.float(), (2, 2, 2, 2), value=0.0)
    else:
        out = torch.empty(x.shape[0], 1, 32, 32)
        for s in range(0, x.shape[0], 10000):  # chunks keep the temporary small
            out[s : s + 10000] = F.interpolate(
                x[s : s + 10000].float(), size=(32, 32), mode="bilinear", align_corners=False
            )
    return out.sub_(127.0).div_(255.0)


def _preprocess_cifar(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,32,32] -> float, per channel (x/255 - 0.5) / 0.5."""
    return x.float().div_(255.0).sub_(0.5).div_(0.5)


def _load_digits(val_fraction: float, seed: int, train_subset=None, test_subset=None) -> DatasetSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)  # [1797, 8, 8] in [0, 1]
    x = ((x * 255.0 - 127.0) / 255.0).unsqueeze(1)  # same affine map as MNIST
    y = torch.from_numpy(d.target.astype(np.int64))
    # Fixed (seed-independent) 20% test split, like an official test set.
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1797))
    n_test = int(round(0.2 * x.shape[0]))
    test_idx, _ = torch.sort(perm[:n_test])
    pool_idx, _ = torch.sort(perm[n_test:])
    xtr, ytr = _subset(x[pool_idx], y[pool_idx], train_subset, "train_subset", "digits")
    xte, yte = _subset(x[test_idx], y[test_idx], test_subset, "test_subset", "digits")
    return _make_splits("digits", xtr, ytr, xte, yte, val_fraction, seed)


# --------------------------------------------------------------------------------------------
# in-memory cache of decoded uint8 data

_MEMORY_CACHE: dict[tuple, object] = {}


def clear_cache() -> None:
    """Forget the decoded data held in memory (disk caches are kept)."""
    _MEMORY_CACHE.clear()


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _cached(key: tuple, loader: Callable[[], object]):
    if key not in _MEMORY_CACHE:
        _MEMORY_CACHE[key] = loader()
    return _MEMORY_CACHE[key]


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / (stem + ".gz"), folder / stem):
        if cand.is_file():
            return cand
    return None


def _canonical(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


def _find_idx_folder(name: str, root: Path, download: bool) -> Path:
    candidates = [root / sub for sub in _SUBDIRS[name]] + [root]
    for folder in candidates:
        if folder.is_dir() and _idx_file(folder, _IDX_FILES["train_images"]) is not None:
            if name == "mnist" and "fashion" in folder.name.lower():
                warnings.warn(f"loading 'mnist' from {folder}, whose name says Fashion-MNIST")
            return folder
    if download:
        if _canonical(root.name) in {_canonical(s) for s in _SUBDIRS[name] + (name,)}:
            target = root
        else:
            target = root / name
        for gz in CHECKSUMS[name]:
            stem = gz[:-3]
            if _idx_file(target, stem) is None:
                _download_file(name, gz, target, _content_md5_gz)
        return target
    expected = root / name / (_IDX_FILES["train_images"] + ".gz")
    looked = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"{name}: missing the IDX file {_IDX_FILES['train_images']}.gz: {expected} does not "
        f"exist (looked in {looked}). Point --data-dir (data_dir=) at the folder holding the "
        f"four {name} IDX files or at its parent, or pass download=True (--download) to fetch "
        f"them."
    )


def _read_raw(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: cannot decompress ({type(e).__name__}: {e}); the file is "
                        f"corrupt or truncated - delete it and download it again") from e


def _parse_idx(data: bytes, path: Path, expect_ndim: int) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{path}: file too short ({len(data)} bytes) to be an IDX file")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or ndim != expect_ndim:
        raise DataError(
            f"{path}: wrong IDX magic number 0x{data[:4].hex()} (expected 0x000008"
            f"{expect_ndim:02x}: unsigned bytes, {expect_ndim} dimension(s)); not an "
            f"{'image' if expect_ndim == 3 else 'label'} IDX file"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"{path}: wrong length: header says shape {shape} ({expected} bytes) but the file "
            f"has {len(data)} bytes (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx_pair(name: str, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    paths = []
    for kind in ("images", "labels"):
        stem = _IDX_FILES[f"{split}_{kind}"]
        p = _idx_file(folder, stem)
        if p is None:
            raise _missing(folder / (stem + ".gz"), f"the {split} {kind} IDX file", name)
        paths.append(p)
    img_path, lab_path = paths

    def load():
        images = _parse_idx(_read_raw(img_path), img_path, 3)
        labels = _parse_idx(_read_raw(lab_path), lab_path, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{lab_path}: {labels.shape[0]} labels but {img_path} has "
                            f"{images.shape[0]} images")
        if images.shape[1:] != (28, 28):
            raise DataError(f"{img_path}: images are {images.shape[1:]}, expected 28x28")
        if labels.size and labels.max() > 9:
            raise DataError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))

    return _cached(("idx", _file_key(img_path), _file_key(lab_path)), load)


# --------------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar10_uint8(root: Path, download: bool):
    found = _find_cifar(root)
    if found is None and root.is_dir():
        for sub in _SUBDIRS["cifar10"]:
            if (root / sub).is_dir():
                found = _find_cifar(root / sub)
                if found is not None:
                    break
    if found is None:
        if download:
            is_file_arg = root.name.endswith((".zip", ".tar.gz", ".tgz"))
            target = root.parent if is_file_arg else root
            tarball = _download_file("cifar10", _CIFAR_TARBALL, target, _file_md5)
            _extract_tarball(tarball, target)
            found = ("pickle", target / _CIFAR_PICKLE_DIR)
        else:
            raise DataNotFoundError(
                f"cifar10: missing data: {root / _CIFAR_PICKLE_DIR / 'data_batch_1'} does not "
                f"exist, and {root} holds no {_CIFAR_TARBALL}, no train/ and test/ image "
                f"folders and no {' / '.join(_CIFAR_ZIP_NAMES)} (also looked in the "
                f"sub-folders {', '.join(_SUBDIRS['cifar10'])}). Point --data-dir (data_dir=) "
                f"at one of these, or pass download=True (--download) to fetch {_CIFAR_TARBALL}."
            )
    kind, path = found
    if kind == "pickle":
        return _read_cifar_pickle_dir(path)
    if kind == "tarball":
        return _cached(("cifar-tar", _file_key(path)), lambda: _read_cifar_tarball(path))
    if kind == "zip":
        return _cached(("cifar-zip", _file_key(path)), lambda: _read_cifar_zip(path))
    return _read_cifar_tree(path)


def _find_cifar(root: Path):
    """Return (kind, path) for the best CIFAR-10 source at ``root``, or None."""
    if root.is_file():
        if root.suffix.lower() == ".zip":
            return ("zip", root)
        if root.name.endswith((".tar.gz", ".tgz")):
            return ("tarball", root)
        if root.name.startswith("data_batch") or root.name == "test_batch":
            return ("pickle", root.parent)
        return None
    if not root.is_dir():
        return None
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file():
        return ("pickle", root)
    if (root / _CIFAR_PICKLE_DIR).is_dir():
        return ("pickle", root / _CIFAR_PICKLE_DIR)
    if (root / _CIFAR_TARBALL).is_file():
        return ("tarball", root / _CIFAR_TARBALL)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return ("tree", root)
    for z in _CIFAR_ZIP_NAMES:
        if (root / z).is_file():
            return ("zip", root / z)
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (CIFAR batches hold nothing else)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle_batch(data: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise DataError(f"{where}: not a valid CIFAR-10 pickle batch "
                        f"({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise DataError(f"{where}: CIFAR-10 batch should be a dict, got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{where}: CIFAR-10 batch lacks the 'data' or 'labels' entry "
                        f"(has {sorted(d)})")
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{where}: 'data' should be uint8 [N, 3072], got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{where}: {y.size} labels for {x.shape[0]} images")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where}: labels out of range 0..9")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def _concat(parts):
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _read_cifar_pickle_dir(folder: Path):
    paths = []
    for fname in _CIFAR_TRAIN_BATCHES + ("test_batch",):
        p = folder / fname
        if not p.is_file():
            raise _missing(p, f"the CIFAR-10 batch file {fname}", "cifar10")
        paths.append(p)

    def load():
        parts = [_unpickle_batch(p.read_bytes(), str(p)) for p in paths]
        return _concat(parts[:5]), parts[5]

    return _cached(("cifar-pickle",) + tuple(_file_key(p) for p in paths), load)


def _read_cifar_tarball(path: Path):
    try:
        with tarfile.open(path, "r:*") as tf:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            parts = []
            for fname in _CIFAR_TRAIN_BATCHES + ("test_batch",):
                if fname not in members:
                    raise DataError(f"{path}: the tarball has no {fname}")
                parts.append(_unpickle_batch(tf.extractfile(members[fname]).read(),
                                             f"{path}:{members[fname].name}"))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the tarball ({type(e).__name__}: {e}); it is "
                        f"corrupt or truncated") from e
    return _concat(parts[:5]), parts[5]


def _extract_tarball(path: Path, target: Path) -> None:
    try:
        with tarfile.open(path, "r:*") as tf:
            if sys.version_info >= (3, 12) or hasattr(tarfile, "data_filter"):
                tf.extractall(target, filter="data")
            else:  # pragma: no cover - old Pythons without extraction filters
                for m in tf.getmembers():
                    if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts:
                        raise DataError(f"{path}: unsafe member path {m.name}")
                tf.extractall(target)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot extract ({type(e).__name__}: {e})") from e


def _decoder() -> Callable[[bytes], torch.Tensor]:
    """bytes -> uint8 [3,H,W]: torchvision.io (fast) where it exists, else PIL."""
    try:
        from torchvision.io import ImageReadMode, decode_image

        def decode(blob: bytes) -> torch.Tensor:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                                    mode=ImageReadMode.RGB)
    except ImportError:  # pragma: no cover - torchvision without image decoders
        from PIL import Image

        def decode(blob: bytes) -> torch.Tensor:
            with Image.open(io.BytesIO(blob)) as im:
                arr = np.asarray(im.convert("RGB"))
            return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    return decode


def _decode_images(blobs: Sequence[bytes], names: Sequence[str], size: int = 32) -> torch.Tensor:
    decode = _decoder()
    out = torch.empty(len(blobs), 3, size, size, dtype=torch.uint8)
    for i, (blob, where) in enumerate(zip(blobs, names)):
        try:
            img = decode(blob)
        except Exception as e:
            raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
        if tuple(img.shape) != (3, size, size):
            raise DataError(f"{where}: image is {tuple(img.shape[1:])}, expected {size}x{size}")
        out[i] = img
    return out


def _group_entries(entries: Sequence[str], where: str):
    """Map relative paths '<...>/{train,test}/<class>/<file>' -> {split: [(path, label)]}."""
    by_split: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    classes_seen = set()
    for rel in entries:
        parts = rel.replace("\\", "/").strip("/").split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_EXTS):
            continue
        split, cls = parts[-3], parts[-2]
        if split not in by_split:
            continue
        classes_seen.add(cls)
        if cls in CIFAR10_CLASSES:
            by_split[split].append((rel, CIFAR10_CLASSES.index(cls)))
    unknown = classes_seen - set(CIFAR10_CLASSES)
    if unknown:
        raise DataError(f"{where}: class folders {sorted(unknown)} are not CIFAR-10 classes "
                        f"(expected {', '.join(CIFAR10_CLASSES)})")
    for split, items in by_split.items():
        if not items:
            raise DataError(f"{where}: no images under {split}/<class>/ "
                            f"(expected {split}/<class>/*.jpg with the CIFAR-10 class names)")
        items.sort()
    return by_split


def _writable_dir(folder: Path) -> bool:
    """True if ``folder`` may be written to: permission bits say so (root ignores them,
    so a ``r-x`` folder counts as read-only even for root) and the process may write."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(folder, os.W_OK)


def _disk_cache_paths(source: Path, fingerprint: str) -> list[Path]:
    """Where the decoded copy of ``source`` may live, in order of preference: next to a zip
    (if that folder is writable), else in the user cache folder."""
    paths = []
    if source.is_file() and _writable_dir(source.parent):
        paths.append(source.parent / f"{source.name}.{fingerprint}.decoded.npz")
    tag = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    stem = f"{source.name}-{tag}" if source.is_dir() else source.name
    paths.append(_cache_root() / f"{stem}.{fingerprint}.decoded.npz")
    return paths


def _load_or_decode(source: Path, fingerprint: str, decode: Callable[[], tuple]):
    paths = _disk_cache_paths(source, fingerprint)
    for cache in paths:
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    arrs = [torch.from_numpy(z[k]) for k in ("xtr", "ytr", "xte", "yte")]
                return (arrs[0], arrs[1]), (arrs[2], arrs[3])
            except Exception as e:  # a broken cache is rebuilt, never trusted
                warnings.warn(f"ignoring unreadable cache {cache} ({e}); decoding again")
    (xtr, ytr), (xte, yte) = decode()
    errors = []
    for cache in paths:
        tmp = None
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".decoding-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, xtr=xtr.numpy(), ytr=ytr.numpy(), xte=xte.numpy(),
                         yte=yte.numpy())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, cache)
            break
        except OSError as e:
            errors.append(f"{cache}: {e}")
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    else:
        warnings.warn(f"could not write a decode cache ({'; '.join(errors)})")
    return (xtr, ytr), (xte, yte)


def _read_zip(path: Path, decode_entries: Callable[[list, Callable[[str], bytes]], tuple]):
    """``decode_entries(file names, read)`` on the zip at ``path``, through the decode cache
    (fingerprint: size and mtime); a corrupt zip is a DataError naming the file."""
    st = path.stat()

    def decode():
        try:
            with zipfile.ZipFile(path) as zf:
                return decode_entries([i.filename for i in zf.infolist() if not i.is_dir()], zf.read)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DataError(f"{path}: not a valid zip file ({type(e).__name__}: {e})") from e

    return _load_or_decode(path, f"{st.st_size}-{st.st_mtime_ns}", decode)


def _decode_cifar(names: Sequence[str], read: Callable[[str], bytes], where: str, sep: str = ":"):
    """(train, test) from the image files ``names`` (``<split>/<class>/<file>``) read by ``read``;
    errors name a file as ``where + sep + name``."""
    groups = _group_entries(names, where)
    out = []
    for split in ("train", "test"):
        items = groups[split]
        x = _decode_images([read(n) for n, _ in items], [f"{where}{sep}{n}" for n, _ in items])
        out.append((x, torch.tensor([lab for _, lab in items], dtype=torch.int64)))
    return tuple(out)


def _read_cifar_zip(path: Path):
    return _read_zip(path, lambda names, read: _decode_cifar(names, read, str(path)))


def _read_cifar_tree(root: Path):
    files = []
    for split in ("train", "test"):
        for cls_dir in sorted((root / split).iterdir()):
            if cls_dir.is_dir():
                files.extend(p for p in cls_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTS)
    rel = [p.relative_to(root).as_posix() for p in files]
    rel.sort()
    h = hashlib.sha1()
    for r in rel:
        st = (root / r).stat()
        h.update(f"{r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    fingerprint = f"{len(rel)}-{h.hexdigest()[:16]}"

    decode = lambda: _decode_cifar(rel, lambda n: (root / n).read_bytes(), str(root), os.sep)  # noqa: E731
    return _cached(("cifar-tree", str(root.resolve()), fingerprint),
                   lambda: _load_or_decode(root, fingerprint, decode))


# --------------------------------------------------------------------------------------------
# TinyImageNet (tiny-imagenet-200: 200 classes, 500 training and 50 validation images each, 64x64)

#: classes of TinyImageNet; label i is the i-th wnid of ``wnids.txt`` in sorted order
TINYIMAGENET_CLASSES = 200
_TINY_ZIP = "tiny-imagenet-200.zip"
_TINY_SIZE = 64


def _load_tinyimagenet_uint8(root: Path, download: bool):
    """(train, test) uint8 [N,3,64,64] with int64 labels; test is the labelled official val/."""
    found = _find_tiny(root)
    if found is None and download:
        target = root.parent if root.name.endswith(".zip") else root
        found = ("zip", _download_file("tinyimagenet", _TINY_ZIP, target, _file_md5))
    if found is None:
        raise DataNotFoundError(
            f"tinyimagenet: missing data: {root / 'tiny-imagenet-200' / 'wnids.txt'} does not exist, and "
            f"{root} holds no {_TINY_ZIP} and no wnids.txt with train/ and val/ (also looked in the "
            f"sub-folders {', '.join(_SUBDIRS['tinyimagenet'])}). Point --data-dir (data_dir=) at the "
            f"tiny-imagenet-200 folder, its parent or {_TINY_ZIP}, or pass download=True (--download) "
            f"to fetch {_TINY_ZIP}."
        )
    kind, path = found
    if kind == "zip":
        return _cached(("tiny-zip", _file_key(path)),
                       lambda: _read_zip(path, lambda names, read: _decode_tiny(names, read, str(path))))
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for r in files:
        if r.startswith(("train/", "val/")) or r == "wnids.txt":
            st = (path / r).stat()
            h.update(f"{r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    fingerprint = f"{len(files)}-{h.hexdigest()[:16]}"
    return _cached(("tiny-tree", str(path.resolve()), fingerprint),
                   lambda: _load_or_decode(path, fingerprint,
                                           lambda: _decode_tiny(files, lambda r: (path / r).read_bytes(), str(path))))


def _find_tiny(root: Path):
    """(kind, path) of the TinyImageNet source at ``root`` (the folder, its parent, or the zip), or None."""
    if root.is_file():
        return ("zip", root) if root.suffix.lower() == ".zip" else None
    if not root.is_dir():
        return None
    for folder in (root,) + tuple(root / sub for sub in _SUBDIRS["tinyimagenet"]):
        if (folder / "wnids.txt").is_file():
            return ("tree", folder)
    for folder in (root,) + tuple(root / sub for sub in _SUBDIRS["tinyimagenet"]):
        if (folder / _TINY_ZIP).is_file():
            return ("zip", folder / _TINY_ZIP)
    return None


def _decode_tiny(names: Sequence[str], read: Callable[[str], bytes], where: str):
    """Decode the standard layout from its file names: wnids.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG labelled by val/val_annotations.txt (file, wnid, box), under one prefix."""
    wnid_files = sorted((n for n in names if n.replace("\\", "/").split("/")[-1] == "wnids.txt"), key=len)
    if not wnid_files:
        raise DataError(f"{where}: no wnids.txt (expected the tiny-imagenet-200 layout: wnids.txt, "
                        "train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt)")
    prefix = wnid_files[0][: -len("wnids.txt")]
    wnids = sorted({w.strip() for w in read(wnid_files[0]).decode().split() if w.strip()})
    label = {w: i for i, w in enumerate(wnids)}
    ann_name = prefix + "val/val_annotations.txt"
    if ann_name not in set(names):
        raise DataError(f"{where}: missing {ann_name} (the labels of val/images)")
    val_label = {}
    for line_no, line in enumerate(read(ann_name).decode().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label:
            raise DataError(f"{where}:{ann_name} line {line_no}: expected '<file>\\t<wnid>\\t...' with a wnid "
                            f"of wnids.txt, got {line.strip()[:80]!r}")
        val_label[parts[0]] = label[parts[1]]
    train, test = [], []
    for n in names:
        if not n.startswith(prefix) or not n.lower().endswith(_IMAGE_EXTS):
            continue
        parts = n[len(prefix):].split("/")
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images":
            if parts[1] not in label:
                raise DataError(f"{where}: training folder {parts[1]!r} is not a wnid of wnids.txt")
            train.append((n, label[parts[1]]))
        elif len(parts) == 3 and parts[:2] == ["val", "images"]:
            if parts[2] not in val_label:
                raise DataError(f"{where}: {n} has no line in {ann_name}")
            test.append((n, val_label[parts[2]]))
    out = []
    for split, items in (("train", train), ("val", test)):
        if not items:
            raise DataError(f"{where}: no images under {prefix}{split}/ (expected the tiny-imagenet-200 layout)")
        items.sort()
        x = _decode_images([read(n) for n, _ in items], [f"{where}:{n}" for n, _ in items], _TINY_SIZE)
        out.append((x, torch.tensor([lab for _, lab in items], dtype=torch.int64)))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# downloads


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_md5_gz(path: Path) -> str:
    """md5 of the decompressed content of a .gz file."""
    h = hashlib.md5()
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: downloaded file is not valid gzip ({e})") from e
    return h.hexdigest()


def _mirrors(name: str) -> list[str]:
    env = os.environ.get("BAYESPRUNE_MIRROR", "").strip()
    if env:
        return [u.strip().replace("{name}", name) for u in env.split(",") if u.strip()]
    return list(MIRRORS[name])


def _download_file(name: str, filename: str, target: Path,
                   md5_of: Callable[[Path], str], timeout: float = 60.0) -> Path:
    expected = CHECKSUMS[name][filename]
    target.mkdir(parents=True, exist_ok=True)
    dest = target / filename
    failures: list[str] = []
    mismatch = False
    for base in _mirrors(name):
        url = base if base.endswith(filename) else base.rstrip("/") + "/" + filename
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{filename}.", suffix=".part")
        tmp_path = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                req = urllib.request.Request(url, headers={"User-Agent": "bayesprune"})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, f, 1 << 20)
            try:
                got = md5_of(tmp_path)
            except DataError as e:
                got = f"unreadable ({e})"
            if got != expected:
                mismatch = True
                failures.append(f"{url}: checksum mismatch, md5 {got} != expected {expected}")
                continue
            os.replace(tmp_path, dest)
            return dest
        except (urllib.error.URLError, OSError, ValueError) as e:
            failures.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if tmp_path.exists():
                tmp_path.unlink()
    detail = "; ".join(failures) if failures else "no mirrors configured"
    if mismatch:
        raise ChecksumError(f"{name}: could not download {filename} with the expected md5 "
                            f"{expected}: {detail}")
    raise DownloadError(f"{name}: could not download {filename} into {target}: {detail}. "
                        f"Check the network or set BAYESPRUNE_MIRROR, or copy the files by "
                        f"hand and point --data-dir at them.")


def download(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the files of ``name`` into ``data_dir`` (checksummed); return the folder."""
    if name not in DATASETS or name == "digits":
        raise ValueError(f"nothing to download for {name!r}; downloadable: "
                         f"{', '.join(d for d in DATASETS if d != 'digits')}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "cifar10":
        _load_cifar10_uint8(root, download=True)
        found = _find_cifar(root)
        return found[1] if found else root
    if name == "tinyimagenet":
        _load_tinyimagenet_uint8(root, download=True)
        return _find_tiny(root)[1]
    return _find_idx_folder(name, root, download=True)


# --------------------------------------------------------------------------------------------
# loaders


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (and the epoch count).

    The generator is ``loader.generator``; save ``loader.generator.get_state()`` to resume
    mid-run.  For :class:`ImageTensorDataset` each batch is one tensor index operation (the
    sampler yields whole index lists), which gives exactly the same batches as the default
    per-item path, only faster.
    """
    g = torch.Generator().manual_seed(int(seed))
    if isinstance(dataset, ImageTensorDataset):
        base = RandomSampler(dataset, generator=g) if shuffle else SequentialSampler(dataset)
        return DataLoader(dataset, sampler=BatchSampler(base, batch_size, drop_last),
                          batch_size=None, num_workers=num_workers, generator=g)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                      num_workers=num_workers, drop_last=drop_last)
