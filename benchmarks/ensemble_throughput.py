"""Throughput of the batched ensemble (bayesprune.experiments.ensemble) against single runs.

K members of one paper network (BMRS noise, KL, Adam; the paper's batch size) train one epoch on
the first ``--train`` images of the data set, as one batched epoch (``ensemble._Batch``) and as K
single epochs one after another (``training._train_epoch``), from the same states; the two are
timed in alternation, ``--repeats`` times (the order flips each repetition), after a warm-up
epoch of each.  Printed: the median seconds of each, the ratio single / ensemble (above 1: the
ensemble is faster), the device and ``uptime``'s load average.

    python benchmarks/ensemble_throughput.py --model lenet5 --dataset mnist --members 4 \
        --data-dir ../shared/datasets [--train 4096] [--repeats 3] [--device cuda]

``--probe``: instead, the probe that ``reproduce --ensemble auto`` runs (``ensemble.probe``: a few
steps of each side on the full training set's loader) for ``--members`` runs with seeds 0..K-1;
with ``--model fcn`` or ``cnn``, the Bayes-factor runs' probe (``ensemble.bf_probe``, the paper's
batch 64 and lr 1e-3) that ``reproduce bf-table1`` runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from bayesprune.experiments import ensemble, training
from bayesprune.experiments.data import ImageTensorDataset, load_dataset, make_loader


class _Waiting:
    def __init__(self, args, rng):
        self.request = (args, rng)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet5")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--train", type=int, default=4096, help="training images used (the first ones)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe", action="store_true", help="run reproduce --ensemble auto's probe instead")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.probe:
        t0 = time.perf_counter()
        if a.model in ("fcn", "cnn"):
            from bayesprune.experiments.bf_training import BayesFactorRunConfig

            r = ensemble.bf_probe([BayesFactorRunConfig(model=a.model, dataset=a.dataset, seed=s, device=a.device,
                                                        data_dir=a.data_dir, out_dir="probe") for s in range(a.members)])
        else:
            cfgs = [training.resolve_config(model=a.model, dataset=a.dataset, seed=s, device=a.device, data_dir=a.data_dir,
                                            out_dir=f"probe{s}") for s in range(a.members)]
            r = ensemble.probe(cfgs)
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        print(f"{a.model}/{a.dataset}, device {device}, {a.threads} thread(s): {r}; ratio {ratio} "
              f"({'batched' if r.batched else 'single runs'}), probe {time.perf_counter() - t0:.1f} s")
        print("load average (1, 5, 15 min):", " ".join(f"{v:.2f}" for v in os.getloadavg()))
        return
    splits = load_dataset(a.dataset, a.data_dir, seed=0)
    data = ImageTensorDataset(splits.train.images[:a.train], splits.train.labels[:a.train])
    members = []
    for seed in range(a.members):
        cfg = training.resolve_config(model=a.model, dataset=a.dataset, seed=seed, device=a.device)
        training._seed_all(seed)
        model, _ = training._build(cfg, splits, device)
        members.append((cfg, model, training._optimizer(model, cfg)))

    def fresh():
        out = []
        for cfg, model, _ in members:
            m = copy.deepcopy(model)
            out.append((cfg, m, training._optimizer(m, cfg)))
        return out

    def single() -> float:
        runs = fresh()
        _sync(device)
        t0 = time.perf_counter()
        for cfg, m, opt in runs:
            loader = make_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed)
            training._train_epoch(m, opt, loader, cfg, splits.num_train, device, "single")
        _sync(device)
        return time.perf_counter() - t0

    def batched() -> float:
        runs = fresh()
        rng = training._rng_state()
        group = [_Waiting((m, opt, make_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed), cfg,
                           splits.num_train, device, "ensemble"), rng) for cfg, m, opt in runs]
        _sync(device)
        t0 = time.perf_counter()
        ensemble._Batch(group).epoch()
        _sync(device)
        return time.perf_counter() - t0

    single(), batched()  # warm-up
    times = {"single": [], "ensemble": []}
    for r in range(a.repeats):
        for name in (("single", "ensemble") if r % 2 == 0 else ("ensemble", "single")):
            times[name].append(single() if name == "single" else batched())
    s, e = statistics.median(times["single"]), statistics.median(times["ensemble"])
    steps = -(-a.train // members[0][0].batch_size)
    print(f"{a.model}/{a.dataset}, {a.members} members, {a.train} images ({steps} steps of batch "
          f"{members[0][0].batch_size}), device {device}, {a.threads} thread(s), {a.repeats} repeats")
    print(f"{a.members} single epochs: {s:.2f} s (median; all: {', '.join(f'{t:.2f}' for t in times['single'])})")
    print(f"one ensemble epoch:  {e:.2f} s (median; all: {', '.join(f'{t:.2f}' for t in times['ensemble'])})")
    print(f"ensemble throughput / single runs' = {s / e:.2f}x")
    print("load average (1, 5, 15 min):", " ".join(f"{v:.2f}" for v in os.getloadavg()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
