"""How accurate can a LeNet5 sub-network of the size the dense fine-tune goal allows be?

The goal (docs/RESULTS.md, "Dense fine-tune"): >= 99.0 % MNIST test accuracy with >= 95 % of the
paper's LeNet5 (61,706 parameters) removed, i.e. at most 3,085 parameters kept. This script trains
plain LeNet5-shaped networks with the kept widths (conv1, conv2, fc1, fc2) given, **from scratch**
with cross-entropy only (Adam, cosine schedule, batch 128, the data set's seeded validation split
for the best epoch), one process, one thread, and writes one JSON line per (shape, seed). It is a
reference point for what the BMRS-pruned and fine-tuned networks of that size reach, not a pruning
method.

    python scripts/lenet5_frontier.py --shapes 1,3,18,9 3,6,14,14 --epochs 40 --seeds 0 1 2 \\
        --data-dir ../shared/datasets --out results/paper/dense-finetune/frontier.jsonl
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from bayesprune.experiments.data import load_dataset

LENET5_PARAMETERS = 61706  # the paper's LeNet5 at 32x32: 6, 16, 120, 84 units


def lenet5_shape(k: int, m: int, a: int, b: int, num_classes: int = 10) -> nn.Sequential:
    """The paper's LeNet5 (models.LeNet5 at 32x32, no padding) with widths k, m, a, b."""
    return nn.Sequential(nn.Conv2d(1, k, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(k, m, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(25 * m, a), nn.ReLU(), nn.Linear(a, b),
                         nn.ReLU(), nn.Linear(b, num_classes))


def _shape(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 4 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"a shape is four positive widths 'conv1,conv2,fc1,fc2', got {text!r}")
    return widths


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return sum((net(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000)) / len(x)


def train(shape, seed: int, epochs: int, lr: float, data_dir: str) -> dict:
    torch.manual_seed(seed)
    splits = load_dataset("mnist", data_dir, seed=seed)
    (x, y), (xv, yv), (xt, yt) = splits.train.tensors, splits.val.tensors, splits.test.tensors
    net = lenet5_shape(*shape)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    best = (-1.0, 0, 0.0)
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
        val = _accuracy(net, xv, yv)
        if val > best[0]:
            best = (val, epoch, _accuracy(net, xt, yt))
    params = sum(p.numel() for p in net.parameters())
    return dict(shape=list(shape), params=params, removed=1 - params / LENET5_PARAMETERS, seed=seed, epochs=epochs,
                lr=lr, best_epoch=best[1], best_val_acc=best[0], test_acc=best[2],
                last_test_acc=_accuracy(net, xt, yt), wall_time_s=time.time() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=_shape, nargs="+", required=True, metavar="K,M,A,B")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for shape in args.shapes:
        for seed in args.seeds:
            row = train(shape, seed, args.epochs, args.lr, args.data_dir)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
