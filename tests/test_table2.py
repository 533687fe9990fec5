"""The BMRS paper's Table 2: TinyImageNet (folder, zip, checksummed download from a loopback
server), the Table 2 networks (ResNet-50, ViT-B/16, the CPU ViT), their noise placement, weights
from a file, and ``bayesprune reproduce bmrs-table2`` end to end on a tiny synthetic TinyImageNet."""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.experiments import data as D
from bayesprune.experiments import models as M
from bayesprune.experiments.data import ChecksumError, DataError, DataNotFoundError, load_dataset

WNIDS = ("n01443537", "n01629819", "n01641577")  # written unsorted below; labels follow the sorted order


def _jpeg(seed: int, size: int = 64, gray: bool = False) -> tuple[bytes, np.ndarray]:
    """A smooth random image as JPEG bytes (quality 95) and its decoded pixels (via PIL)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 1 if gray else 3)).astype(np.uint8)
    img = Image.fromarray(base.squeeze(-1) if gray else base).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    blob = buf.getvalue()
    with Image.open(io.BytesIO(blob)) as im:
        pixels = np.asarray(im.convert("RGB")).copy()
    return blob, pixels


def write_tiny(root: Path, n_train: int = 3, n_val: int = 2) -> dict:
    """A tiny tiny-imagenet-200 folder under ``root``; returns {relative path: (label, pixels)}."""
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    (base / "test" / "images").mkdir(parents=True)  # unlabelled, ignored
    (base / "test" / "images" / "test_0.JPEG").write_bytes(_jpeg(999)[0])
    expected, seed, lines = {}, 0, []
    for label, w in enumerate(WNIDS):
        (base / "train" / w / "images").mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(n_train):
            blob, px = _jpeg(seed, gray=(seed == 1))  # one grayscale JPEG, as in the real set
            seed += 1
            rel = f"train/{w}/images/{w}_{k}.JPEG"
            (base / rel).write_bytes(blob)
            expected[rel] = (label, px)
        for k in range(n_val):
            blob, px = _jpeg(seed)
            seed += 1
            name = f"val_{label * n_val + k}.JPEG"
            (base / "val" / "images" / name).write_bytes(blob)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
            expected[f"val/images/{name}"] = (label, px)
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return expected


def zip_tiny(folder: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder.parent).as_posix())
    return dest


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    D.clear_cache()
    expected = write_tiny(tmp_path / "data")
    yield tmp_path / "data", expected
    D.clear_cache()


def _by_label(expected: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    items = sorted((k, v) for k, v in expected.items() if k.startswith(split))
    return np.stack([v[1] for _, v in items]).transpose(0, 3, 1, 2), np.array([v[0] for _, v in items])


def test_tinyimagenet_folder_and_zip_agree_with_the_files(tiny, tmp_path):
    root, expected = tiny
    s = load_dataset("tinyimagenet", root, val_fraction=0.25, seed=0)
    assert (s.num_classes, s.in_channels, s.image_size) == (200, 3, 64)
    assert s.num_train + len(s.val) == 9 and len(s.test) == 6
    # the test set is the labelled val/ folder, labels from val_annotations.txt, wnids in sorted order
    px, labels = _by_label(expected, "val/")
    assert s.test.labels.tolist() == labels.tolist() == [0, 0, 1, 1, 2, 2]
    want = (torch.from_numpy(px).float() / 255 - 0.5) / 0.5
    assert torch.allclose(s.test.images, want, atol=1e-6)
    train_px, train_labels = _by_label(expected, "train/")
    all_train = torch.cat([s.train.images, s.val.images])
    assert sorted(s.train.labels.tolist() + s.val.labels.tolist()) == sorted(train_labels.tolist())
    assert torch.allclose(all_train.sum(0), ((torch.from_numpy(train_px).float() / 255 - 0.5) / 0.5).sum(0), atol=1e-4)
    # the zip (as downloaded: tiny-imagenet-200/... inside), given as the file or as its folder
    z = zip_tiny(root / "tiny-imagenet-200", tmp_path / "z" / "tiny-imagenet-200.zip")
    for where in (z, z.parent):
        D.clear_cache()
        sz = load_dataset("tiny-imagenet", where, val_fraction=0.25, seed=0)
        assert torch.equal(sz.test.images, s.test.images) and torch.equal(sz.train.images, s.train.images)
        assert torch.equal(sz.train.labels, s.train.labels)


def test_tinyimagenet_resolution_and_subsets(tiny):
    root, _ = tiny
    full = load_dataset("tinyimagenet", root, val_fraction=0.25)
    s = load_dataset("tinyimagenet", root, val_fraction=0.25, image_size=16)
    assert s.image_size == 16 and s.test.images.shape == (6, 3, 16, 16)
    ref = torch.nn.functional.interpolate(full.test.images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(s.test.images, ref, atol=1e-6)
    sub = load_dataset("tinyimagenet", root, val_fraction=0.25, train_subset=4, test_subset=3, seed=1)
    assert sub.num_train + len(sub.val) == 4 and len(sub.test) == 3
    # the subset is the same for every run seed, only the validation split moves
    sub2 = load_dataset("tinyimagenet", root, val_fraction=0.25, train_subset=4, test_subset=3, seed=2)
    assert torch.equal(sub.test.images, sub2.test.images)
    assert sorted(torch.cat([sub.train.labels, sub.val.labels]).tolist()) == sorted(torch.cat([sub2.train.labels, sub2.val.labels]).tolist())
    for kw, match in ((dict(train_subset=10), "train_subset=10 but tinyimagenet has only 9"),
                      (dict(test_subset=0), "test_subset must be a positive integer"),
                      (dict(image_size=0), "image_size must be a positive integer")):
        with pytest.raises(ValueError, match=match):
            load_dataset("tinyimagenet", root, **kw)


def test_tinyimagenet_errors_name_the_file(tiny, tmp_path):
    root, _ = tiny
    with pytest.raises(DataNotFoundError, match="tiny-imagenet-200.*--download"):
        load_dataset("tinyimagenet", tmp_path / "empty")
    ann = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace(WNIDS[1], "n99999999", 1))
    with pytest.raises(DataError, match=r"val_annotations.txt line 3: .*n99999999"):
        load_dataset("tinyimagenet", root)
    ann.write_text("")
    D.clear_cache()
    with pytest.raises(DataError, match=r"val_0.JPEG has no line in .*val_annotations.txt"):
        load_dataset("tinyimagenet", root)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A synthetic tiny-imagenet-200.zip served on 127.0.0.1; yields (base URL, its md5)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BAYESPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny(tmp_path / "src")
    folder = tmp_path / "served"
    folder.mkdir()
    z = zip_tiny(tmp_path / "src" / "tiny-imagenet-200", folder / "tiny-imagenet-200.zip")
    md5 = hashlib.md5(z.read_bytes()).hexdigest()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    D.clear_cache()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", md5
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
        D.clear_cache()


def test_tinyimagenet_download_from_loopback(served, tmp_path, monkeypatch):
    base, md5 = served
    assert D.MIRRORS["tinyimagenet"] and len(D.CHECKSUMS["tinyimagenet"]["tiny-imagenet-200.zip"]) == 32
    monkeypatch.setitem(D.CHECKSUMS, "tinyimagenet", {"tiny-imagenet-200.zip": md5})
    monkeypatch.setitem(D.MIRRORS, "tinyimagenet", ["http://127.0.0.1:9/never-used/", base])
    s = load_dataset("tinyimagenet", tmp_path / "dl", download=True, val_fraction=0.25)
    assert len(s.test) == 6 and (tmp_path / "dl" / "tiny-imagenet-200.zip").is_file()
    D.clear_cache()  # offline now: the downloaded zip is found again
    assert torch.equal(load_dataset("tinyimagenet", tmp_path / "dl", val_fraction=0.25).test.images, s.test.images)
    assert D.download("tinyimagenet", tmp_path / "dl") == tmp_path / "dl" / "tiny-imagenet-200.zip"


def test_tinyimagenet_download_checksum_mismatch(served, tmp_path, monkeypatch):
    base, md5 = served
    monkeypatch.setitem(D.CHECKSUMS, "tinyimagenet", {"tiny-imagenet-200.zip": "0" * 32})
    monkeypatch.setitem(D.MIRRORS, "tinyimagenet", [base])
    with pytest.raises(ChecksumError, match=f"md5 {md5} != expected 0{{32}}"):
        load_dataset("tinyimagenet", tmp_path / "dl", download=True)
    assert not (tmp_path / "dl" / "tiny-imagenet-200.zip").exists()


# ------------------------------------------------------------------------------- networks


def test_vit_self_attention_matches_torchvision():
    """The ViT with SelfAttention computes torchvision's VisionTransformer output (same state dict)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    ours = M.build_model("vit-small", 3, 16, 10).eval()
    ref = VisionTransformer(image_size=16, patch_size=2, num_layers=6, num_heads=6, hidden_dim=192, mlp_dim=768,
                            num_classes=10).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert 2.6e6 < sum(p.numel() for p in ours.parameters()) < 2.8e6
    b16 = M.build_model("vit-b16", 3, 32, 200)
    assert b16.patch_size == 16 and len(b16.encoder.layers) == 12 and b16.heads.head.out_features == 200
    with pytest.raises(ValueError, match="image_size=40 is not a multiple of the ViT's patch size 16"):
        M.build_model("vit-b16", 3, 40, 10)
    r50 = M.build_model("resnet50", 3, 32, 200)
    assert r50.fc.out_features == 200 and 23.9e6 < sum(p.numel() for p in r50.parameters()) < 24.0e6


def test_paper_noise_placement():
    """ResNet: after every BatchNorm; ViT: after each block's attention-output and MLP-output layers,
    and those noise layers act (a mask on one changes the output)."""
    torch.manual_seed(0)
    r = M.build_model("resnet18-cifar", 3, 8, 10)
    x = torch.randn(2, 3, 8, 8)
    bp.add_noise(r, x, layers=M.noise_layer_names("resnet18-cifar", r))
    bns = [n for n, m in r.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(n.target_name for n in bp.noise_layers(r)) == sorted(bns)
    v = M.build_model("vit-small", 3, 16, 10)
    x = torch.randn(2, 3, 16, 16)
    bp.add_noise(v, x, layers=M.noise_layer_names("vit-small", v))
    layers = bp.noise_layers(v)
    assert [n.layer_name.split(".", 3)[-1] for n in layers] == ["self_attention.out_proj", "mlp.3"] * 6
    assert all(n.target_name == n.layer_name for n in layers)
    v.eval()
    with torch.no_grad():
        nn.init.normal_(v.heads.head.weight)  # torchvision starts the ViT head at zero
        before = v(x)
        for n in layers[:2]:  # block 0's attention output, then its MLP output
            n.mask[:5] = 0
            after = v(x)
            assert (after - before).abs().max() > 1e-4
            before = after


def test_weights_from_a_file(tmp_path):
    """--weights: a state dict read with weights_only=True, the head of another class count replaced;
    a file that does not fit is an error naming the file and the key."""
    from bayesprune.experiments.training import _build, resolve_config

    torch.manual_seed(1)
    donor = M.build_model("resnet18-cifar", 3, 8, 1000)
    f = tmp_path / "r18.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in donor.state_dict().items()}}, f)
    loaded = M.build_model("resnet18-cifar", 3, 8, 10, weights=str(f))
    for k, v in loaded.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, donor.state_dict()[k]), k
    assert loaded.fc.out_features == 10
    # the harness path: RunConfig.weights -> _build (noise added on top of the loaded weights)
    cfg = resolve_config(model="resnet18-cifar", dataset="digits", method="bmrs_n", weights=str(f))
    splits = type("S", (), dict(in_channels=3, image_size=8, num_classes=10, example_inputs=lambda self, n: torch.zeros(n, 3, 8, 8)))()
    model, _ = _build(cfg, splits, torch.device("cpu"))
    assert torch.equal(model.conv1.weight, donor.conv1.weight) and bp.noise_layers(model)
    bad = dict(donor.state_dict())
    bad["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"weights file .*bad.pt does not fit .*layer1.0.conv1.weight \(3, 3\) in the file"):
        M.build_model("resnet18-cifar", 3, 8, 10, weights=str(tmp_path / "bad.pt"))
    torch.save({"w": torch.zeros(1), "code": functools.partial(print, "x")}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match=r"code.pt cannot be read as a state dict with torch.load\(weights_only=True\)"):
        M.build_model("resnet18-cifar", 3, 8, 10, weights=str(tmp_path / "code.pt"))
    with pytest.raises(ValueError, match="weights .* apply to the models resnet18-cifar, resnet50"):
        resolve_config(model="lenet5", dataset="digits", weights=str(f))


def test_paper_table2_defaults():
    from bayesprune.experiments.reproduce import bmrs_table2_configs
    from bayesprune.experiments.training import PAPER_TABLE2, resolve_config
    from bayesprune.reduction import REFERENCE_THRESHOLD

    assert abs(REFERENCE_THRESHOLD + 0.5 * np.log(2 * np.pi)) < 1e-12  # prior odds sqrt(2 pi)
    assert PAPER_TABLE2 == dict(epochs=100, batch_size=32, lr=6.8e-4)  # docs/maths.md section 4.4
    cfg = resolve_config(model="resnet50", dataset="tinyimagenet", method="none")
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (100, 32, 6.8e-4)
    cfgs = bmrs_table2_configs("out", seeds=[0])
    assert {(c.model, c.dataset) for c in cfgs} == {(m, d) for m in ("resnet50", "vit-b16") for d in ("cifar10", "tinyimagenet")}
    rows = {(c.method, c.precision if c.method == "bmrs_u" else None, c.threshold, c.prior_odds) for c in cfgs}
    assert rows == {("none", None, None, None), ("etheta", None, None, None), ("snr", None, None, None),
                    ("bmrs_n", None, None, 1.0), ("bmrs_n", None, REFERENCE_THRESHOLD, None),
                    ("bmrs_u", 8.0, None, None), ("bmrs_u", 4.0, None, None)}
    assert all((c.epochs, c.batch_size, c.lr, c.finetune_epochs) == (100, 32, 6.8e-4, 10) for c in cfgs)


def test_reproduce_bmrs_table2_end_to_end(tiny, tmp_path, capsys):
    """``bayesprune reproduce bmrs-table2 --epochs 1`` on a tiny synthetic TinyImageNet: every row
    of the table gets a number, L2 runs at BMRS_N's compression, the table says "from scratch"."""
    from bayesprune.experiments.cli import main

    root, _ = tiny
    out = tmp_path / "runs"
    rc = main(["reproduce", "bmrs-table2", "--epochs", "1", "--models", "lenet5", "--datasets", "tinyimagenet",
               "--data-dir", str(root), "--image-size", "8", "--train-subset", "8", "--test-subset", "4",
               "--seeds", "0", "--jobs", "1", "--no-latency", "--quiet", "--out-dir", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "lenet5 / tinyimagenet (from scratch)" in text
    for row in ("None", "L2", "E[θ]", "SNR", "BMRS_N", "BMRS_U-8", "BMRS_U-4", "BMRS_N (dF ≥ -0.919)"):
        assert f"| {row} | " in text, row
    summaries = {p.parent.parent.name: json.loads(p.read_text()) for p in (out / "bmrs-table2").rglob("summary.json")}
    assert len(summaries) == 8
    for name, s in summaries.items():
        c = s["config"]
        assert (c["epochs"], c["finetune_epochs"], c["batch_size"], c["lr"]) == (1, 1, 32, 6.8e-4), name
        assert (c["image_size"], c["train_subset"], c["test_subset"], c["weights"]) == (8, 8, 4, None)
        assert s["params_dense"] == sum(p.numel() for p in M.LeNet5(3, 200, image_size=8).parameters())
        assert "latency_ms" not in s["size_speed"] or not s["size_speed"]["latency_ms"]
    l2 = summaries["lenet5-tinyimagenet-l2"]
    assert l2["config"]["compression"] == summaries["lenet5-tinyimagenet-bmrs_n-t-0.919"]["param_compression"]
