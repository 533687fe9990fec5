"""Tests for bayesprune.experiments.data: digits, MNIST from the shared folder, CIFAR-10 layouts built in
tmp_path, downloads from a loopback HTTP server, and error messages for bad input."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesprune.experiments import data as D
from bayesprune.experiments.data import (
    DATASETS,
    ChecksumError,
    DataError,
    DataNotFoundError,
    DownloadError,
    load_dataset,
    make_loader,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """No test writes to ~/.cache or reuses another test's decoded data."""
    monkeypatch.setenv("BAYESPRUNE_CACHE_DIR", str(tmp_path / "home-cache"))
    monkeypatch.delenv("BAYESPRUNE_MIRROR", raising=False)
    D.clear_cache()
    yield
    D.clear_cache()


# ------------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">HBB", 0, 8, arr.ndim) + b"".join(
        struct.pack(">I", s) for s in arr.shape) + arr.tobytes()


def write_fake_idx(folder: Path, n_train=5, n_test=3, seed=0) -> dict[str, str]:
    """Write the four gzipped IDX files; return md5 of each decompressed file by .gz name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for stem, arr in (
            (f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28))),
            (f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10),
        ):
            raw = idx_bytes(arr)
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            md5[f"{stem}.gz"] = hashlib.md5(raw).hexdigest()
    return md5


def cifar_arrays(n=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    y = np.arange(n) // (n // 10)  # sorted by class: 0,0,1,1,...
    return x, y


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_pickle_dir(folder: Path, train, test) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (xtr, ytr), (xte, yte) = train, test
    per = len(xtr) // 5
    for i in range(5):
        sl = slice(i * per, (i + 1) * per)
        d = {b"data": xtr[sl].reshape(per, -1), b"labels": [int(v) for v in ytr[sl]],
             b"batch_label": b"training batch"}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(d, protocol=2))
    d = {b"data": xte.reshape(len(xte), -1), b"labels": [int(v) for v in yte]}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    return folder


def tree_entries(train, test, encode):
    for split, (x, y) in (("train", train), ("test", test)):
        for k, (img, lab) in enumerate(zip(x, y)):
            yield f"{split}/{D.CIFAR10_CLASSES[lab]}/{k:04d}.png", encode(img)


@pytest.fixture
def cifar_small(tmp_path):
    train, test = cifar_arrays(20, 0), cifar_arrays(20, 1)
    root = tmp_path / "cifar"
    write_pickle_dir(root / "pickled" / "cifar-10-batches-py", train, test)
    zpath = root / "zipped" / "cifar10-jpeg.zip"
    zpath.parent.mkdir(parents=True)
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        for name, blob in tree_entries(train, test, png_bytes):
            zf.writestr(name, blob)
    for name, blob in tree_entries(train, test, png_bytes):
        p = root / "tree" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    return root, train, test


# ------------------------------------------------------------------------------- digits


def test_digits_shapes_splits_and_seeding():
    s = load_dataset("digits")
    assert s.name == "digits" and s.num_classes == 10
    assert (s.in_channels, s.image_size) == (1, 8)
    assert s.num_train == len(s.train) == 1150
    assert (len(s.val), len(s.test)) == (288, 359)
    assert s.num_train + len(s.val) + len(s.test) == 1797
    x, y = s.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    lo, hi = -127 / 255, 128 / 255
    assert s.train.images.min() >= lo - 1e-6 and s.train.images.max() <= hi + 1e-6
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train.images, s.train.images)
    assert torch.equal(again.val.labels, s.val.labels)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.train.images, s.train.images)
    assert torch.equal(other.test.images, s.test.images)  # test split is fixed
    assert set(s.test.labels.tolist()) == set(range(10))


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(e.value)


def test_bad_val_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)


# ------------------------------------------------------------------------------- MNIST


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(),
                    reason=f"shared MNIST folder {SHARED / 'mnist'} is absent")
def test_mnist_from_shared_folder():
    s = load_dataset("mnist", SHARED)  # parent folder with an mnist/ sub-folder
    assert (s.num_train, len(s.val), len(s.test)) == (48000, 12000, 10000)
    assert (s.in_channels, s.image_size, s.num_classes) == (1, 32, 10)
    x, y = s.test[0]
    assert x.shape == (1, 32, 32) and y == 7  # the first MNIST test digit is a 7
    assert torch.bincount(s.test.labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    for ds in (s.train, s.test):
        assert ds.images.min().item() == pytest.approx(-127 / 255)
        assert ds.images.max().item() == pytest.approx(128 / 255)
    # the folder itself works too, the val split is disjoint and covers the training set
    s2 = load_dataset("mnist", SHARED / "mnist", seed=0)
    assert torch.equal(s2.val.labels, s.val.labels)
    assert torch.bincount(torch.cat([s.train.labels, s.val.labels])).sum() == 60000
    padded = load_dataset("mnist", SHARED, resize="pad")
    assert torch.all(padded.test.images[:, :, :2, :] == -127 / 255)


# ------------------------------------------------------------------------------- CIFAR-10


def expected_norm(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(x).float() / 255 - 0.5) / 0.5


def test_cifar_three_layouts_agree(cifar_small):
    root, (xtr, ytr), (xte, yte) = cifar_small
    loaded = {
        "pickle": load_dataset("cifar10", root / "pickled", val_fraction=0.25, seed=3),
        "zip": load_dataset("cifar10", root / "zipped", val_fraction=0.25, seed=3),
        "zip-file": load_dataset("cifar10", root / "zipped" / "cifar10-jpeg.zip",
                                 val_fraction=0.25, seed=3),
        "tree": load_dataset("cifar10", root / "tree", val_fraction=0.25, seed=3),
    }
    ref = loaded["pickle"]
    assert (ref.num_train, len(ref.val), len(ref.test)) == (15, 5, 20)
    assert (ref.in_channels, ref.image_size, ref.num_classes) == (3, 32, 10)
    assert torch.allclose(ref.test.images, expected_norm(xte))
    assert ref.test.labels.tolist() == yte.tolist()
    whole = torch.cat([ref.train.images, ref.val.images])
    assert whole.min() >= -1 and whole.max() <= 1
    for name, s in loaded.items():
        assert s.train.labels.tolist() == ref.train.labels.tolist(), name
        assert s.val.labels.tolist() == ref.val.labels.tolist(), name
        assert s.test.labels.tolist() == ref.test.labels.tolist(), name
        assert torch.equal(s.train.images, ref.train.images), name  # PNG is lossless
        assert torch.equal(s.test.images, ref.test.images), name


def test_cifar_zip_disk_cache(cifar_small, monkeypatch):
    root, _, _ = cifar_small
    zpath = root / "zipped" / "cifar10-jpeg.zip"
    first = load_dataset("cifar10", zpath)
    caches = list(zpath.parent.glob("*.npz"))
    assert len(caches) == 1  # written next to the zip (folder writable)
    D.clear_cache()

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(D, "_decode_images", boom)
    second = load_dataset("cifar10", zpath)
    assert torch.equal(first.test.images, second.test.images)


def test_cifar_zip_cache_in_home_when_readonly(cifar_small, monkeypatch, tmp_path):
    root, _, _ = cifar_small
    zpath = root / "zipped" / "cifar10-jpeg.zip"
    zpath.parent.chmod(0o555)  # read-only by its mode bits (counts even when run as root)
    try:
        load_dataset("cifar10", zpath)
    finally:
        zpath.parent.chmod(0o755)
    assert not list(zpath.parent.glob("*.npz"))
    assert len(list((tmp_path / "home-cache").glob("cifar10-jpeg.zip.*.npz"))) == 1


def test_cifar_jpeg_decoding(tmp_path):
    x = np.zeros((20, 3, 32, 32), dtype=np.uint8)
    y = np.arange(20) // 2
    x[:] = (np.arange(20) * 12).astype(np.uint8)[:, None, None, None]  # flat grey levels
    zpath = tmp_path / "cifar10.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for split in ("train", "test"):
            for k in range(20):
                zf.writestr(f"top/{split}/{D.CIFAR10_CLASSES[y[k]]}/{k:04d}.jpg",
                            jpeg_bytes(x[k]))
    s = load_dataset("cifar10", zpath, val_fraction=0.0)
    assert s.num_train == 20 and len(s.val) == 0
    assert s.test.labels.tolist() == y.tolist()
    assert torch.allclose(s.test.images, expected_norm(x), atol=3 / 127.5)


def test_cifar_tarball_and_download(cifar_small, tmp_path, monkeypatch):
    root, (xtr, ytr), (xte, yte) = cifar_small
    served = tmp_path / "served"
    served.mkdir()
    tar_path = served / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(root / "pickled" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    # the tarball is read directly
    direct = load_dataset("cifar10", tar_path)
    assert direct.test.labels.tolist() == yte.tolist()
    md5 = hashlib.md5(tar_path.read_bytes()).hexdigest()
    monkeypatch.setitem(D.CHECKSUMS, "cifar10", {"cifar-10-python.tar.gz": md5})
    with loopback_server(served) as base:
        monkeypatch.setitem(D.MIRRORS, "cifar10", [base + "/"])
        s = load_dataset("cifar10", tmp_path / "dl", download=True)
    assert (tmp_path / "dl" / "cifar-10-batches-py" / "test_batch").is_file()
    assert torch.allclose(s.test.images, expected_norm(xte))


def test_shared_cifar_zip_is_found_without_decoding():
    zpath = SHARED / "cifar10-jpeg" / "cifar10-jpeg.zip"
    if not zpath.is_file():
        pytest.skip(f"shared CIFAR-10 zip {zpath} is absent")
    assert D._find_cifar(SHARED / "cifar10-jpeg") == ("zip", zpath)


# ------------------------------------------------------------------------------- downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class loopback_server:
    """Serve a folder on 127.0.0.1 (random port) for the duration of a with-block."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_download_mnist_from_loopback(tmp_path, monkeypatch, no_proxy):
    md5 = write_fake_idx(tmp_path / "served" / "mnist", n_train=10, n_test=3)
    monkeypatch.setitem(D.CHECKSUMS, "mnist", md5)
    monkeypatch.setitem(D.MIRRORS, "mnist", ["http://127.0.0.1:9/never-used/"])
    with loopback_server(tmp_path / "served") as base:
        monkeypatch.setenv("BAYESPRUNE_MIRROR", base + "/{name}/")  # overrides MIRRORS
        s = load_dataset("mnist", tmp_path / "data", download=True)
    assert (s.num_train, len(s.val), len(s.test)) == (8, 2, 3)
    assert s.test.labels.tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(md5)
    # now offline: loads from the downloaded files
    D.clear_cache()
    assert load_dataset("mnist", tmp_path / "data").num_train == 8


def test_download_checksum_mismatch(tmp_path, monkeypatch, no_proxy):
    md5 = write_fake_idx(tmp_path / "served" / "mnist")
    bad = dict(md5, **{"train-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setitem(D.CHECKSUMS, "mnist", bad)
    with loopback_server(tmp_path / "served") as base:
        monkeypatch.setitem(D.MIRRORS, "mnist", [base + "/mnist/"])
        with pytest.raises(ChecksumError) as e:
            load_dataset("mnist", tmp_path / "data", download=True)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "0" * 32 in msg
    assert md5["train-images-idx3-ubyte.gz"] in msg and "mismatch" in msg
    assert isinstance(e.value, DataError)
    assert not (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert not list((tmp_path / "data" / "mnist").glob("*.part"))


def test_download_missing_on_mirror(tmp_path, monkeypatch, no_proxy):
    (tmp_path / "served").mkdir()
    with loopback_server(tmp_path / "served") as base:
        monkeypatch.setenv("BAYESPRUNE_MIRROR", base + "/{name}/")
        with pytest.raises(DownloadError, match="404"):
            load_dataset("fashion-mnist", tmp_path / "data", download=True)


# ------------------------------------------------------------------------------- bad input


def test_missing_files_message(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "download=True" in msg and "--data-dir" in msg
    with pytest.raises(DataNotFoundError, match="download=True"):
        load_dataset("cifar10", tmp_path)


def test_missing_label_file(tmp_path):
    write_fake_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(e.value)
    assert "--data-dir" in str(e.value)


def test_mnist_image_size_28_is_the_images_as_they_are(tmp_path):
    """image_size=28 gives the IDX pixels themselves ((p - 127) / 255), not 28 -> 32 -> 28."""
    write_fake_idx(tmp_path, n_train=10, n_test=3)
    native = load_dataset("mnist", tmp_path, image_size=28, val_fraction=0.2)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(3, 28, 28)
    expected = (torch.from_numpy(raw.copy()).float() - 127) / 255
    assert native.image_size == 28 and native.test.images.shape == (3, 1, 28, 28)
    assert torch.equal(native.test.images[:, 0], expected)
    resized = load_dataset("mnist", tmp_path, image_size=30)  # any other size: resized from the 32x32
    assert resized.test.images.shape == (3, 1, 30, 30)


def test_truncated_gzip(tmp_path):
    write_fake_idx(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(DataError, match="corrupt or truncated") as e:
        load_dataset("mnist", tmp_path)
    assert str(p) in str(e.value)


def test_wrong_magic(tmp_path):
    write_fake_idx(tmp_path)
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28)))))  # images, not labels
    with pytest.raises(DataError, match="magic") as e:
        load_dataset("mnist", tmp_path)
    assert str(p) in str(e.value)


def test_wrong_length_and_count_mismatch(tmp_path):
    write_fake_idx(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28)))[:-10]))
    with pytest.raises(DataError, match="wrong length"):
        load_dataset("mnist", tmp_path)
    write_fake_idx(tmp_path)
    q = tmp_path / "train-labels-idx1-ubyte.gz"
    q.write_bytes(gzip.compress(idx_bytes(np.zeros(4))))
    D.clear_cache()
    with pytest.raises(DataError, match="4 labels but .* 5 images"):
        load_dataset("mnist", tmp_path)


def test_bad_pickle(cifar_small):
    root, _, _ = cifar_small
    p = root / "pickled" / "cifar-10-batches-py" / "data_batch_3"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="not a valid CIFAR-10 pickle batch") as e:
        load_dataset("cifar10", root / "pickled")
    assert str(p) in str(e.value)


def test_pickle_with_foreign_globals_is_refused(cifar_small):
    root, _, _ = cifar_small
    p = root / "pickled" / "cifar-10-batches-py" / "test_batch"
    p.write_bytes(pickle.dumps({b"data": functools.partial(print, "pwned"), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load global"):
        load_dataset("cifar10", root / "pickled")


def test_bad_zip(tmp_path):
    z = tmp_path / "cifar10.zip"
    z.write_bytes(b"PK\x03\x04 this is not really a zip file" * 10)
    with pytest.raises(DataError, match="not a valid zip") as e:
        load_dataset("cifar10", z)
    assert str(z) in str(e.value)


def test_zip_with_wrong_classes(tmp_path):
    z = tmp_path / "cifar10.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"{split}/plane/0000.png", png_bytes(np.zeros((3, 32, 32), np.uint8)))
    with pytest.raises(DataError, match="plane"):
        load_dataset("cifar10", z)


# ------------------------------------------------------------------------------- loaders


def test_make_loader_reproducible_and_matches_default_order():
    s = load_dataset("digits")
    a = [y for _, y in make_loader(s.train, 100, shuffle=True, seed=5)]
    b = [y for _, y in make_loader(s.train, 100, shuffle=True, seed=5)]
    c = [y for _, y in make_loader(s.train, 100, shuffle=True, seed=6)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    assert sum(len(y) for y in a) == s.num_train and len(a) == 12
    std = torch.utils.data.DataLoader(s.train, batch_size=100, shuffle=True,
                                      generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, (y for _, y in std)))
    x, y = next(iter(make_loader(s.test, 50, shuffle=False, seed=0)))
    assert torch.equal(x, s.test.images[:50]) and torch.equal(y, s.test.labels[:50])
    # a plain (non-tensor) dataset goes through the standard path
    sub = torch.utils.data.Subset(s.train, list(range(30)))
    xb, yb = next(iter(make_loader(sub, 8, shuffle=True, seed=0)))
    assert xb.shape == (8, 1, 8, 8) and yb.dtype == torch.int64
