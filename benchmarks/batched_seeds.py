"""Several seeds on a small CPU: parallel single-seed processes, or one batched K-seed ensemble?

Question: to train K seeds of the same LeNet5/MNIST BMRS run (batch 128, noise layers + KL +
Adam, loss = cross-entropy + kl(model, "mean")) on this machine, is it faster to run K processes
at once (one thread each), or to train the K seeds together as one batched model?

Variants (every one runs in its own worker process(es), started once, so each pays the same
process overheads; the parent only coordinates):

    A  one single-seed process, --threads threads (default 2)      -- the baseline
    B  K single-seed processes in parallel, 1 thread each, timed together (wall time until all
       K have finished their N steps)
    C  one process training the K-seed ensemble, --threads threads
    D  one process training the K-seed ensemble, 1 thread

Throughput is counted in seed-steps/s (A: N steps / wall; B, C, D: K*N / wall) and compared with
A.  Each repetition runs every variant once (warm-up steps first, not timed), in an order that
rotates between repetitions so that drifts of a shared machine hit every variant alike; the
table shows medians over the repetitions.  A step includes picking the mini-batch out of the
in-memory training tensors (each seed has its own shuffling), as a real training loop does.

The ensemble (:class:`SeedEnsemble`) is a real K-seed ensemble trained in one step, built from
standard layers only, so ``bayesprune.add_noise`` handles it unchanged: input ``[B, K, H, W]``,
channel k holding seed k's own mini-batch; grouped convolutions ``Conv2d(K, 6K, 5, groups=K)``,
``Conv2d(6K, 16K, 5, groups=K)``; the pooled ``[B, 16K, s, s]`` is flattened to
``[B, K*16*s*s]`` (channel-major, so group k's features are the contiguous block k, each in the
order of LeNet5's own Flatten) and unflattened to ``[B, K*16*s*s, 1]``; the fully connected
layers are grouped 1x1 ``Conv1d`` (groups=K) down to ``[B, K*10, 1]``, reshaped to logits
``[B, K, 10]``.  Group k is initialised as a copy of a separately seeded LeNet5.

Loss of the ensemble: ``sum_k CE(logits[:, k], y[:, k]) + K * kl(ensemble, "mean")``.  Each noise
layer of the ensemble holds the K seeds' structures side by side, so its mean KL is the average of
the K per-seed means, and ``kl(ensemble, "mean") = (1/K) sum_k kl(seed k, "mean")`` (the same 4
noise layers divide both).  Hence the loss equals ``sum_k [CE_k + kl_k]``, each seed's parameters
appear only in its own term, and each seed's gradient is exactly that of a single-seed run's loss;
Adam is element-wise, so the optimiser step per group is that of a single-seed run too.  (The
noise draws come from one random stream instead of K: the same distribution, not the same numbers.)

Note: ``load_dataset("mnist")`` returns 32x32 images (bilinear resize, as the BMRS reference and
``bayesprune run``), so the LeNet5 measured here is ``LeNet5(1, 10, 32)`` (pooled 16x5x5, i.e.
400 features per seed) -- the network that real training uses.  The ensemble takes any image
size (the checks also run it on 28x28).

    python benchmarks/batched_seeds.py [--steps 60] [--repeats 3] [--seeds 2] [--data DIR]
    python benchmarks/batched_seeds.py --check   # correctness checks only (no timing)

``--check`` verifies, with noise layers absent (plain networks): the ensemble's eval-mode logits
for seed k equal LeNet5 seed k's logits (1e-5), one SGD step of the ensemble gives each group the
same parameter update as the separate models on the same batches (1e-5); and with noise layers
present (eval mode, so deterministic): the gradient of the ensemble loss per group equals each
single-seed loss's gradient, noise parameters included.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import bayesprune
from bayesprune.benchmarking import machine_info
from bayesprune.experiments.models import LeNet5

BATCH = 128
LR = 1.4e-3  # the lenet5/mnist learning rate of bayesprune.experiments.training
VARIANTS = ("A", "B", "C", "D")


# ---------------------------------------------------------------------------------------------
# the ensemble


class SeedEnsemble(nn.Sequential):
    """K LeNet5 networks side by side, as one network of grouped layers (see the module docstring).

    Input ``[B, K, H, W]`` (channel k: seed k's images), output logits ``[B, K, num_classes]``.
    """

    #: index in this Sequential -> index of the same layer in LeNet5
    LENET_INDEX = {0: 0, 3: 3, 8: 7, 10: 9, 12: 11}

    def __init__(self, seeds: int, num_classes: int = 10, image_size: int = 32) -> None:
        ref = LeNet5(1, num_classes, image_size)  # padding and feature size, as LeNet5 computes them
        k, pad, s = seeds, ref.padding, ref.feature_size
        super().__init__(
            nn.Conv2d(k, 6 * k, 5, padding=pad, groups=k),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6 * k, 16 * k, 5, padding=pad, groups=k),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),  # [B, 16K, s, s] -> [B, K*16*s*s]: group k = block k, in LeNet5's order
            nn.Unflatten(1, (k * 16 * s * s, 1)),
            nn.Conv1d(k * 16 * s * s, k * 120, 1, groups=k),
            nn.ReLU(),
            nn.Conv1d(k * 120, k * 84, 1, groups=k),
            nn.ReLU(),
            nn.Conv1d(k * 84, k * num_classes, 1, groups=k),
            nn.Flatten(),  # [B, K*classes, 1] -> [B, K*classes]
            nn.Unflatten(1, (k, num_classes)),
        )
        self.seeds, self.num_classes, self.image_size = k, num_classes, image_size

    @classmethod
    def from_models(cls, models: list[LeNet5]) -> "SeedEnsemble":
        """The ensemble whose group k is a copy of ``models[k]`` (LeNet5(1, classes, size), no noise)."""
        ens = cls(len(models), models[0].num_classes, models[0].image_size)
        for k, m in enumerate(models):
            if m.in_channels != 1:
                raise ValueError("the ensemble is built from single-channel LeNet5 networks")
            for pa, pb in group_pairs(ens, m, k):
                with torch.no_grad():
                    pa.copy_(pb.reshape(pa.shape))
        return ens


def group_items(ens: SeedEnsemble, model: nn.Module, k: int):
    """(ensemble tensor, first row, end row, LeNet5 tensor) for every parameter and noise tensor
    (mu, log_sigma, mask) that both networks have: rows [first, end) of the ensemble's tensor are
    group k's copy of the LeNet5's tensor (same numbers, the ensemble's shape)."""
    for ie, il in SeedEnsemble.LENET_INDEX.items():
        a, b = ens[ie], model[il]
        n = b.weight.shape[0]
        pairs = [(a.weight, b.weight), (a.bias, b.bias)]
        na, nb = getattr(a, "bayes_noise", None), getattr(b, "bayes_noise", None)
        if na is not None and nb is not None:
            pairs += [(getattr(na, name), getattr(nb, name)) for name in ("mu", "log_sigma", "mask")]
        for ta, tb in pairs:
            yield ta, k * n, (k + 1) * n, tb


def group_pairs(ens: SeedEnsemble, model: nn.Module, k: int):
    """(view of group k's rows of the ensemble's tensor, the LeNet5's tensor), see group_items."""
    for ta, lo, hi, tb in group_items(ens, model, k):
        yield ta[lo:hi], tb


def seeded_lenets(seeds, image_size: int) -> list[LeNet5]:
    """LeNet5(1, 10, image_size) per seed (an int K means seeds 0..K-1), each made after
    torch.manual_seed(seed): the networks that the single-seed runs start from."""
    out = []
    for s in (range(seeds) if isinstance(seeds, int) else seeds):
        torch.manual_seed(s)
        out.append(LeNet5(1, 10, image_size))
    return out


def ensemble_loss(logits: torch.Tensor, y: torch.Tensor, noisy: bool, model: nn.Module) -> torch.Tensor:
    """sum_k CE(seed k) [+ K * kl(model, "mean")]; logits [B, K, C], y [B, K]."""
    b, k, c = logits.shape
    loss = F.cross_entropy(logits.reshape(b * k, c), y.reshape(b * k), reduction="sum") / b
    if noisy:
        loss = loss + k * bayesprune.kl(model, "mean")
    return loss


def single_loss(logits: torch.Tensor, y: torch.Tensor, noisy: bool, model: nn.Module) -> torch.Tensor:
    loss = F.cross_entropy(logits, y)
    if noisy:
        loss = loss + bayesprune.kl(model, "mean")
    return loss


# ---------------------------------------------------------------------------------------------
# correctness checks


def check_logits(seeds: int = 2, image_size: int = 32, batch: int = 16) -> float:
    """Max |ensemble logits[:, k] - LeNet5_k logits| for plain networks in eval mode."""
    models = seeded_lenets(seeds, image_size)
    ens = SeedEnsemble.from_models(models).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seeds, image_size, image_size, generator=g)
    with torch.no_grad():
        out = ens(x)
        return max(float((out[:, k] - m.eval()(x[:, k:k + 1])).abs().max()) for k, m in enumerate(models))


def check_sgd_step(seeds: int = 2, image_size: int = 32, batch: int = 16, lr: float = 1.0) -> float:
    """Max difference between the ensemble's per-group parameter update and the separate plain
    models' updates after one SGD step on the same batches (noise layers absent)."""
    models = seeded_lenets(seeds, image_size)
    ens = SeedEnsemble.from_models(models).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, seeds, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (batch, seeds), generator=g)
    before = [[(pa.detach().clone(), pb.detach().clone()) for pa, pb in group_pairs(ens, m, k)] for k, m in enumerate(models)]
    opt = torch.optim.SGD(ens.parameters(), lr=lr)
    opt.zero_grad()
    ensemble_loss(ens(x), y, False, ens).backward()
    opt.step()
    for k, m in enumerate(models):
        o = torch.optim.SGD(m.parameters(), lr=lr)
        o.zero_grad()
        single_loss(m(x[:, k:k + 1]), y[:, k], False, m).backward()
        o.step()
    worst = 0.0
    for k, m in enumerate(models):
        for (pa, pb), (a0, b0) in zip(group_pairs(ens, m, k), before[k]):
            da, db = (pa.detach() - a0).reshape(pb.shape), pb.detach() - b0
            worst = max(worst, float((da - db).abs().max()))
    return worst


def check_noisy_gradients(seeds: int = 2, image_size: int = 32, batch: int = 16) -> tuple[float, float]:
    """With noise layers (random mu/log_sigma per seed), eval mode: (max |K*kl(ens) - sum_k kl_k|,
    max per-group gradient difference of the full losses, noise parameters included)."""
    models = seeded_lenets(seeds, image_size)
    example = torch.zeros(2, 1, image_size, image_size)
    g = torch.Generator().manual_seed(3)
    for m in models:
        bayesprune.add_noise(m, example, sharing="channel")
        with torch.no_grad():
            for nl in bayesprune.noise_layers(m):
                nl.mu.copy_(0.5 * torch.randn(nl.mu.shape, generator=g))
                nl.log_sigma.copy_(-1.0 + 0.5 * torch.randn(nl.log_sigma.shape, generator=g))
    ens = SeedEnsemble(seeds, 10, image_size)
    bayesprune.add_noise(ens, torch.zeros(2, seeds, image_size, image_size), sharing="channel")
    for k, m in enumerate(models):
        for pa, pb in group_pairs(ens, m, k):
            with torch.no_grad():
                pa.copy_(pb.reshape(pa.shape))
    ens.eval()
    x = torch.randn(batch, seeds, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (batch, seeds), generator=g)
    with torch.no_grad():
        kl_diff = abs(float(seeds * bayesprune.kl(ens, "mean") - sum(bayesprune.kl(m, "mean") for m in models)))
    ensemble_loss(ens(x), y, True, ens).backward()
    worst = 0.0
    for k, m in enumerate(models):
        m.eval()
        single_loss(m(x[:, k:k + 1]), y[:, k], True, m).backward()
        for ta, lo, hi, tb in group_items(ens, m, k):
            if not tb.requires_grad:
                continue  # the mask buffer
            worst = max(worst, float((ta.grad[lo:hi].reshape(tb.shape) - tb.grad).abs().max()))
    return kl_diff, worst


def run_checks(tol: float = 1e-5) -> bool:
    ok = True
    for seeds, size in ((2, 32), (3, 28)):
        results = [
            ("logits, plain, eval", check_logits(seeds, size)),
            ("SGD update per group, plain", check_sgd_step(seeds, size)),
        ]
        kl_diff, grad_diff = check_noisy_gradients(seeds, size)
        results += [("K*kl(ens) - sum_k kl_k, noisy", kl_diff), ("loss gradient per group, noisy eval", grad_diff)]
        for name, diff in results:
            good = diff <= tol
            ok &= good
            print(f"K={seeds} {size}x{size}  {name:<38} max diff {diff:.2e}  {'ok' if good else 'FAILED'} (tol {tol:g})")
    return ok


# ---------------------------------------------------------------------------------------------
# training steps and workers


class Shuffler:
    """Mini-batch indices of one seed: a fresh permutation each epoch (last partial batch dropped)."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch = n, batch
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.g), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx


class Trainer:
    """One model (a single seed, or the K-seed ensemble) with noise, Adam and its data."""

    def __init__(self, kind: str, seeds: list[int], images: torch.Tensor, labels: torch.Tensor,
                 batch: int = BATCH, sharing: str = "channel") -> None:
        self.kind, self.images, self.labels = kind, images, labels
        size = images.shape[-1]
        models = seeded_lenets(seeds, size)
        if kind == "single":
            if len(seeds) != 1:
                raise ValueError("a single-seed trainer takes one seed")
            self.model = models[0]
            example = torch.zeros(2, 1, size, size)
            self.data = images
        else:
            self.model = SeedEnsemble.from_models(models)
            example = torch.zeros(2, len(seeds), size, size)
            self.data = images[:, 0]  # [N, H, W]; indexing with [B, K] gives [B, K, H, W]
        bayesprune.add_noise(self.model, example, sharing=sharing)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.shufflers = [Shuffler(len(labels), batch, 1000 + s) for s in seeds]

    def step(self) -> None:
        if self.kind == "single":
            idx = self.shufflers[0].next()
            loss_fn = single_loss
        else:
            idx = torch.stack([s.next() for s in self.shufflers], dim=1)  # [B, K]
            loss_fn = ensemble_loss
        x, y = self.data[idx], self.labels[idx]
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(x), y, True, self.model)
        loss.backward()
        self.opt.step()


def worker(kind, seeds, threads, images, labels, sharing, barrier, cmd_q, res_q) -> None:
    """A long-lived worker: build the trainer, then for each (warmup, steps) command run the warm-up,
    wait at the variant's barrier (with the parent and the variant's other workers), time the steps."""
    torch.set_num_threads(threads)
    trainer = Trainer(kind, seeds, images, labels, sharing=sharing)
    res_q.put("ready")
    while True:
        cmd = cmd_q.get()
        if cmd is None:
            return
        warmup, steps = cmd
        for _ in range(warmup):
            trainer.step()
        barrier.wait()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        res_q.put(time.perf_counter() - t0)


class Variant:
    """The worker processes of one variant, a barrier shared with the parent, and their queues."""

    def __init__(self, ctx, name: str, specs: list[tuple[str, list[int], int]], images, labels, sharing: str) -> None:
        self.name, self.specs = name, specs
        self.barrier = ctx.Barrier(len(specs) + 1)
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in specs]
        self.procs = [
            ctx.Process(target=worker, args=(kind, seeds, threads, images, labels, sharing, self.barrier, q, self.res_q), daemon=True)
            for (kind, seeds, threads), q in zip(specs, self.cmd_qs)
        ]
        for p in self.procs:
            p.start()

    def wait_ready(self) -> None:
        for _ in self.procs:
            self.res_q.get()

    def run(self, warmup: int, steps: int) -> float:
        """Wall time from 'all workers warmed up' to 'all workers done with their steps'."""
        for q in self.cmd_qs:
            q.put((warmup, steps))
        self.barrier.wait()
        t0 = time.perf_counter()
        for _ in self.procs:
            self.res_q.get()
        return time.perf_counter() - t0

    def close(self) -> None:
        for q in self.cmd_qs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)


def load_images(path: str, size_if_random: int = 32):
    try:
        from bayesprune.experiments.data import load_dataset

        splits = load_dataset("mnist", path)
        x, y = splits.train.images, splits.train.labels
        source = f"real MNIST from {path} ({len(y)} training images, 1x{x.shape[-2]}x{x.shape[-1]})"
    except Exception as err:  # noqa: BLE001 - fall back to random data, say so
        n = 48000
        x = torch.randn(n, 1, size_if_random, size_if_random)
        y = torch.randint(0, 10, (n,))
        source = f"random 1x{size_if_random}x{size_if_random} tensors (MNIST did not load: {type(err).__name__}: {err})"
    return x.float().contiguous(), y.long().contiguous(), source


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="measured steps per variant and repetition")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps before each measurement")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of the whole set of variants")
    ap.add_argument("--seeds", type=int, default=2, help="K, the number of seeds trained together")
    ap.add_argument("--threads", type=int, default=2, help="threads of variants A and C")
    ap.add_argument("--sharing", default="channel", choices=("channel", "element"), help="noise sharing (training default: channel)")
    ap.add_argument("--variants", default="ABCD", help="which variants to run (A is needed for the ratios)")
    ap.add_argument("--data", default="../shared/datasets", help="folder holding mnist/")
    ap.add_argument("--check", action="store_true", help="run the correctness checks only, then exit")
    args = ap.parse_args(argv)

    if args.check:
        ok = run_checks()
        print("all checks passed" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1
    if args.seeds < 1 or args.steps < 1 or args.repeats < 1:
        ap.error("--seeds, --steps and --repeats must be >= 1")
    chosen = [v for v in VARIANTS if v in args.variants.upper()]
    if not chosen:
        ap.error("--variants names none of A, B, C, D")

    images, labels, source = load_images(args.data)
    images.share_memory_()
    labels.share_memory_()
    k, t = args.seeds, args.threads
    specs = {
        "A": [("single", [0], t)],
        "B": [("single", [s], 1) for s in range(k)],
        "C": [("ensemble", list(range(k)), t)],
        "D": [("ensemble", list(range(k)), 1)],
    }
    about = {
        "A": f"1 process, 1 seed, {t} threads",
        "B": f"{k} processes x 1 seed, 1 thread each",
        "C": f"1 process, {k}-seed ensemble, {t} threads",
        "D": f"1 process, {k}-seed ensemble, 1 thread",
    }
    seed_steps = {"A": args.steps, "B": k * args.steps, "C": k * args.steps, "D": k * args.steps}

    info = machine_info()
    info["torch_threads"] = f"per variant (A, C: {t}; B, D: 1)"
    print(", ".join(f"{key} {val}" for key, val in info.items()))
    print(f"data: {source}; LeNet5(1, 10, {images.shape[-1]}) + noise ({args.sharing}) + KL('mean') + Adam, "
          f"batch {BATCH}, CPU; K = {k} seeds")

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no OpenMP state inherited
    variants = {v: Variant(ctx, v, specs[v], images, labels, args.sharing) for v in chosen}
    walls: dict[str, list[float]] = {v: [] for v in chosen}
    try:
        for v in variants.values():
            v.wait_ready()
        for r in range(args.repeats):
            order = chosen[r % len(chosen):] + chosen[: r % len(chosen)]  # rotate: A B C D, B C D A, ...
            for name in order:
                walls[name].append(variants[name].run(args.warmup, args.steps))
            print(f"repeat {r + 1}/{args.repeats} ({' '.join(order)}): "
                  + ", ".join(f"{n} {seed_steps[n] / walls[n][-1]:.1f}" for n in chosen) + " seed-steps/s", flush=True)
    finally:
        for v in variants.values():
            v.close()

    med = {v: statistics.median(w) for v, w in walls.items()}
    rate = {v: seed_steps[v] / med[v] for v in chosen}
    print(f"\n{'variant':<8} {'setup':<40} {'median wall s':>13} {'seed-steps/s':>13} {'vs A':>6}")
    for v in chosen:
        ratio = f"{rate[v] / rate['A']:>6.2f}" if "A" in rate else f"{'-':>6}"
        print(f"{v:<8} {about[v]:<40} {med[v]:>13.3f} {rate[v]:>13.1f} {ratio}")
    print(f"({args.steps} steps per seed and variant, {args.warmup} warm-up steps excluded, "
          f"median of {args.repeats} interleaved repetitions; seed-steps/s = seeds x steps / wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
