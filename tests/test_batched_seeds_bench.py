"""benchmarks/batched_seeds.py: the K-seed ensemble really is K independent LeNet5 runs.

The benchmark module is loaded from its file with importlib (benchmarks/ is not a package).
Checks: with noise layers absent (plain networks, eval mode) the ensemble's logits for seed k
equal LeNet5 seed k's logits (1e-5); one SGD step of the plain ensemble gives each group the
same parameter update as the separate plain models on the same batches (1e-5); with noise
layers (eval mode, so deterministic) K * kl(ensemble, "mean") equals the sum of the seeds' KLs
and the ensemble loss's gradient per group equals each single-seed loss's gradient; add_noise
puts one noise layer per prunable layer on the ensemble, with K times LeNet5's structures; the
benchmark's training step runs for both kinds and starts the ensemble from the single-seed
networks.
"""

from __future__ import annotations

import pytest
import torch

import bayesprune
from benchmark_module import load_benchmark  # tests/benchmark_module.py


@pytest.fixture(scope="module")
def bs():
    return load_benchmark("batched_seeds")


CASES = [(1, 32), (2, 32), (3, 28), (2, 12)]  # 12x12 exercises LeNet5's padded variant


@pytest.mark.parametrize("seeds,size", CASES)
def test_plain_logits_match_separate_lenets(bs, seeds, size):
    assert bs.check_logits(seeds, size) <= 1e-5


@pytest.mark.parametrize("seeds,size", CASES)
def test_one_sgd_step_matches_separate_lenets(bs, seeds, size):
    assert bs.check_sgd_step(seeds, size) <= 1e-5


@pytest.mark.parametrize("seeds,size", [(2, 32), (3, 28)])
def test_noisy_loss_gradient_per_group_matches_single_seed_loss(bs, seeds, size):
    kl_diff, grad_diff = bs.check_noisy_gradients(seeds, size)
    assert kl_diff <= 1e-5
    assert grad_diff <= 1e-5


def test_flatten_order_matters(bs):
    """The check is sensitive: mixing the groups' features breaks the logits equality."""
    models = bs.seeded_lenets(2, 32)
    ens = bs.SeedEnsemble.from_models(models).eval()
    x = torch.randn(4, 2, 32, 32)
    with torch.no_grad():
        good = ens(x)
        w = ens[8].weight  # first grouped FC layer: swap the groups' weights of their input feature 0
        w[:120, 0], w[120:, 0] = w[120:, 0].clone(), w[:120, 0].clone()
        bad = ens(x)
    assert (good - bad).abs().max() > 1e-4


def test_add_noise_on_the_ensemble(bs):
    ens = bs.SeedEnsemble(3, 10, 32)
    bayesprune.add_noise(ens, torch.zeros(2, 3, 32, 32), sharing="channel")
    layers = bayesprune.noise_layers(ens)
    assert [m.num_structures for m in layers] == [18, 48, 360, 252]
    assert [m.layer_name for m in layers] == ["0", "3", "8", "10"]
    assert ens(torch.randn(5, 3, 32, 32)).shape == (5, 3, 10)


@pytest.mark.parametrize("kind,seeds", [("single", [1]), ("ensemble", [0, 1])])
def test_trainer_step_runs(bs, kind, seeds):
    images, labels = torch.randn(300, 1, 32, 32), torch.randint(0, 10, (300,))
    trainer = bs.Trainer(kind, seeds, images, labels, batch=128)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(3):  # the third step starts a new epoch (300 // 128 = 2 batches)
        trainer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert len(bayesprune.noise_layers(trainer.model)) == 4


def test_ensemble_trainer_starts_from_the_single_seed_networks(bs):
    images, labels = torch.randn(300, 1, 32, 32), torch.randint(0, 10, (300,))
    ens = bs.Trainer("ensemble", [0, 1], images, labels).model
    for k in (0, 1):
        single = bs.Trainer("single", [k], images, labels).model
        for pa, pb in bs.group_pairs(ens, single, k):
            assert torch.equal(pa.reshape(pb.shape), pb)
