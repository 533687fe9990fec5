"""Epoch time of continuous pruning with shrink-as-you-go (``--shrink``) against masks only.

Two continuous-pruning runs with the same seed (BMRS_N at the reference threshold, so that the
run prunes within a few epochs): masks only, and physical removal after every pruning step.
Prints their per-epoch training times side by side, then times training steps of the final
masked network and its shrunk counterpart interleaved (A/B alternating, medians) — the part of
the comparison that the machine's load affects least.

    python benchmarks/shrink_training.py --dataset mnist --data-dir ../shared/datasets --epochs 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bayesprune as bp
import bayesprune.experiments.training as tr
from bayesprune.experiments.data import load_dataset, make_loader
from bayesprune.reduction import REFERENCE_THRESHOLD


def _step_times(model, opt, batches, num_train, reps):
    out = []
    model.train()
    for i in range(reps):
        x, y = batches[i % len(batches)]
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y) + bp.kl(model, "mean", num_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--noise-lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    root = Path(tempfile.mkdtemp(prefix="bp-shrink-bench-"))
    runs = {}
    for shrink in (False, True):
        cfg = tr.resolve_config(dataset=args.dataset, data_dir=args.data_dir, model=args.model, method="bmrs_n",
                                threshold=REFERENCE_THRESHOLD, noise_lr=args.noise_lr, epochs=args.epochs,
                                finetune_epochs=1, shrink=shrink, device="cpu", out_dir=str(root / f"shrink{int(shrink)}"))
        tr.run_continuous(cfg, progress=False)
        runs[shrink] = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{args.model}/{args.dataset}, BMRS_N (reference threshold), {args.epochs} epochs + 1 fine-tune")
    print(f"{'epoch':>5} {'params masks':>12} {'s masks':>8} {'params shrunk':>13} {'s shrunk':>9} {'ratio':>6}")
    for a, b in zip(runs[False], runs[True]):
        print(f"{a['epoch']:>5} {a['params']:>12} {a['epoch_time']:>8.2f} {b['params']:>13} {b['epoch_time']:>9.2f} "
              f"{a['epoch_time'] / b['epoch_time']:>6.2f}")

    # interleaved step timing at the final masks
    splits = load_dataset(args.dataset, args.data_dir)
    cfg = tr.RunConfig(**json.loads((root / "shrink0" / "config.json").read_text()))
    masked, example = tr._build(cfg, splits, torch.device("cpu"))
    masked.load_state_dict(torch.load(root / "shrink0" / "checkpoint.pt", weights_only=True)["model"])
    small = bp.shrink_for_training(masked, example)
    batches = [(x, y) for (x, y), _ in zip(make_loader(splits.train, cfg.batch_size, True, 0), range(8))]
    opts = {id(m): torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in (masked, small)}
    ta, tb = [], []
    for _ in range(args.steps // 10):
        ta += _step_times(masked, opts[id(masked)], batches, splits.num_train, 10)
        tb += _step_times(small, opts[id(small)], batches, splits.num_train, 10)
    ma, mb = statistics.median(ta[10:]), statistics.median(tb[10:])
    print(f"\ntraining step at the final masks, interleaved, batch {cfg.batch_size}: masks {1e3 * ma:.2f} ms "
          f"({bp.count_parameters(masked)} params), shrunk {1e3 * mb:.2f} ms ({bp.count_parameters(small)} params), "
          f"speed-up {ma / mb:.2f}x")


if __name__ == "__main__":
    main()
