"""The training-loop callbacks with the real libraries: Lightning's ``Trainer.fit`` and Hugging Face's
``Trainer.train`` on CPU, a tiny model, a few steps each.

Each run must end with fewer parameters than it started with, ``report.params_kept`` equal to the
shrunk network's own count, and ``callback.shrunk_model``'s eval output equal to the masked noisy
network's on held-out inputs (1e-5 of the output scale).  The KL is checked to be in the loss
against an independent reference: one SGD step on a zero data loss moves the noise parameters by
exactly ``-lr * d KL / d(mu, log_sigma)``; Hugging Face's ``compute_loss`` differs from the plain
Trainer's by exactly ``bayesprune.kl``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesprune as bp

import lightning.pytorch as pl  # the extras [lightning] and [transformers]: pinned in requirements-dev.txt
import transformers as hf
from bayesprune.integrations.lightning import BMRSPruning
from bayesprune.integrations.transformers import BMRSPruningCallback, BMRSTrainer

RTOL = 1e-5


def _assert_same_output(reference: torch.Tensor, other: torch.Tensor) -> None:
    err = float((reference - other).abs().max() / reference.abs().max())
    assert err <= RTOL, f"shrunk output differs from the masked model's by {err:.3g} of the output scale"


# ------------------------------------------------------------------------------------------ Lightning
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.features(x))


class Classifier(pl.LightningModule):
    def __init__(self, lr=1e-2, zero_data_loss=False, optimizer="adam"):
        super().__init__()
        self.net = ConvNet()
        self.lr, self.zero_data_loss, self.optimizer = lr, zero_data_loss, optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return 0.0 * loss if self.zero_data_loss else loss

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, (x[:, 0, :4, :4].sum((1, 2)) > 0).long() + (x[:, 0, 4:, 4:].sum((1, 2)) > 0).long()


def _loader(seed=0):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(seed=seed)), batch_size=16, shuffle=True)


def _fit(module, callback, **kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[callback], enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False, **kw)
    trainer.fit(module, _loader())
    return trainer


def _record_prunes(callback):
    steps, original = [], callback.prune_now

    def record(step):
        steps.append(step)
        return original(step)

    callback.prune_now = record
    return steps


def test_lightning_fit_prunes_each_epoch_and_leaves_a_shrunk_model_equal_to_the_masked_one():
    torch.manual_seed(0)
    module = Classifier()
    params_before = bp.count_parameters(module.net)
    cb = BMRSPruning("bmrs_n", compression=0.3)  # noise from the first training batch
    steps = _record_prunes(cb)
    trainer = _fit(module, cb, max_epochs=2)
    assert steps == [4, 8]  # end of each epoch (4 batches), not again at the end of training
    assert bp.noise_layers(module.net), "the noise is on the LightningModule's network"
    assert "training_step" not in vars(module), "the wrapped training_step is removed after fit"
    assert not bp.noise_layers(cb.shrunk_model) and not cb.shrunk_model.training
    params_after = bp.count_parameters(cb.shrunk_model)
    assert params_after < params_before and params_after <= 0.7 * params_before + 1e-9
    assert cb.report.params_kept == params_after and cb.report.params_total == params_before
    assert trainer.callback_metrics["bmrs_kl"] > 0  # logged from the loss
    module.eval()
    x_test, _ = _data(32, seed=1)
    with torch.no_grad():
        _assert_same_output(module(x_test), cb.shrunk_model(x_test))


def test_lightning_kl_enters_the_loss_one_sgd_step_matches_the_kl_gradient():
    torch.manual_seed(0)
    example = _data(2, seed=3)[0]
    lr = 0.5
    module = Classifier(lr=lr, zero_data_loss=True, optimizer="sgd")
    reference = copy.deepcopy(module.net)
    bp.add_noise(reference, example)  # the same deterministic start: mu = 0, log_sigma = -5
    bp.kl(reference).backward()
    expected = {n.layer_name: (n.mu - lr * n.mu.grad, n.log_sigma - lr * n.log_sigma.grad)
                for n in bp.noise_layers(reference)}
    assert all(float(g[0].detach().sub(n.mu.detach()).abs().max()) > 1e-4 for n, g in zip(bp.noise_layers(reference), expected.values()))

    _fit(module, BMRSPruning("bmrs_n", example_inputs=example), max_steps=1)
    for n in bp.noise_layers(module.net):
        mu, log_sigma = expected[n.layer_name]
        torch.testing.assert_close(n.mu.detach(), mu.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(n.log_sigma.detach(), log_sigma.detach(), rtol=0, atol=1e-6)

    plain = Classifier(lr=lr, zero_data_loss=True, optimizer="sgd")
    _fit(plain, BMRSPruning("bmrs_n", example_inputs=example, add_kl=False), max_steps=1)
    for n in bp.noise_layers(plain.net):  # no KL in the loss: nothing moves the noise
        assert torch.equal(n.mu.detach(), torch.zeros_like(n.mu)) and bool((n.log_sigma == -5).all())


def test_lightning_shrink_during_training_rebuilds_the_optimizer_with_its_state():
    torch.manual_seed(0)
    module = Classifier()
    params_before = bp.count_parameters(module.net)
    first_net = module.net
    cb = BMRSPruning("bmrs_n", compression=0.3, shrink_during_training=True)
    trainer = _fit(module, cb, max_epochs=2)
    assert module.net is not first_net and module.net is cb.network
    params_now = bp.count_parameters(module.net)
    assert params_now < params_before
    assert params_now <= 0.7 * params_before + 1e-9  # the target counts the original network, not compounded
    assert params_now > 0.6 * params_before
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.parameters()}
    steps = {int(opt.state[p]["step"]) for p in module.net.parameters()}
    assert steps == {8}, "Adam's step count went on across the shrink (2 epochs x 4 batches)"
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 2)  # the StepLR state was carried
    assert bp.count_parameters(cb.shrunk_model) == cb.report.params_kept <= params_now
    module.eval()
    x_test, _ = _data(32, seed=2)
    with torch.no_grad():
        _assert_same_output(module(x_test), cb.shrunk_model(x_test))


def test_lightning_callback_refuses_bad_options_and_ambiguous_modules():
    with pytest.raises(ValueError, match="unknown criterion 'bmrs_x'"):
        BMRSPruning("bmrs_x")
    with pytest.raises(ValueError, match="unknown option 'palcement'"):
        BMRSPruning(palcement="layer")
    with pytest.raises(ValueError, match="'l2' has no default threshold"):
        BMRSPruning("l2")
    with pytest.raises(ValueError, match="prune_every_n_epochs"):
        BMRSPruning(prune_every_n_epochs=0)
    with pytest.raises(ValueError, match="kl_weighting='elbo' needs num_train"):
        BMRSPruning(kl_weighting="elbo")

    class TwoNets(Classifier):
        def __init__(self):
            super().__init__()
            self.other = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"several child modules with parameters \(net, other\); pass network="):
        _fit(TwoNets(), BMRSPruning(), max_steps=1)


# ------------------------------------------------------------------------------------- Hugging Face
class TokenData(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 40, (n, 8), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _bert():
    torch.manual_seed(0)
    cfg = hf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return hf.BertForSequenceClassification(cfg)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "hf"), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return hf.TrainingArguments(**base)


def test_hf_trainer_prunes_every_n_steps_and_leaves_a_shrunk_model_equal_to_the_masked_one(tmp_path):
    model = _bert()
    params_before = bp.count_parameters(model)
    cb = BMRSPruningCallback("bmrs_n", compression=0.2, prune_every_n_steps=3)
    steps = _record_prunes(cb)
    trainer = BMRSTrainer(model=model, args=_args(tmp_path), train_dataset=TokenData(32, seed=0), callbacks=[cb])
    start = {n.layer_name: n.mu.detach().clone() for n in bp.noise_layers(model)}
    assert len(start) == 7  # query, key, value, attention output, intermediate, output, pooler
    trainer.train()
    assert steps == [3, 6, 8]  # 2 epochs x 4 steps: every third step and once more at the end
    assert all(float((n.mu.detach() - start[n.layer_name]).abs().max()) > 1e-3 for n in bp.noise_layers(model))
    params_after = bp.count_parameters(cb.shrunk_model)
    assert params_after < params_before and params_after <= 0.8 * params_before + 1e-9
    assert cb.report.params_kept == params_after
    test = TokenData(16, seed=1)
    inputs = {"input_ids": test.ids, "attention_mask": torch.ones_like(test.ids)}
    model.eval()
    with torch.no_grad():
        _assert_same_output(model(**inputs).logits, cb.shrunk_model(**inputs).logits)


def test_hf_compute_loss_is_the_model_loss_plus_the_kl(tmp_path):
    model = _bert()
    data = TokenData(8, seed=4)
    cb = BMRSPruningCallback("bmrs_n", example_inputs={"input_ids": data.ids[:2], "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    trainer = BMRSTrainer(model=model, args=_args(tmp_path), train_dataset=data, callbacks=[cb])
    assert cb.network is model and len(bp.noise_layers(model)) == 7
    with torch.no_grad():  # a KL that is not tiny
        for n in bp.noise_layers(model):
            n.mu.uniform_(-3, 0)
            n.log_sigma.uniform_(-3, 0)
    batch = trainer.data_collator([data[i] for i in range(8)])

    def losses():
        torch.manual_seed(1)
        ours = trainer.compute_loss(model, dict(batch))
        torch.manual_seed(1)  # the same noise draw
        plain = hf.Trainer.compute_loss(trainer, model, dict(batch))
        return float(ours), float(plain)

    model.train()
    ours, plain = losses()
    assert ours - plain == pytest.approx(float(bp.kl(model)), rel=1e-5) and float(bp.kl(model)) > 0.1
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: F.cross_entropy(outputs.logits, labels)
    trainer.current_gradient_accumulation_steps = 4  # a loss already scaled for accumulation: KL / 4 per micro-batch
    ours, plain = losses()
    assert ours - plain == pytest.approx(float(bp.kl(model)) / 4, rel=1e-5)
    model.eval()
    ours, plain = losses()
    assert ours == plain  # evaluation losses are the model's own


def test_hf_callback_refuses_a_plain_trainer_and_bmrs_trainer_needs_its_callback(tmp_path):
    trainer = hf.Trainer(model=_bert(), args=_args(tmp_path, max_steps=1), train_dataset=TokenData(8, seed=0),
                         callbacks=[BMRSPruningCallback()])
    with pytest.raises(RuntimeError, match="needs BMRSTrainer"):
        trainer.train()
    with pytest.raises(ValueError, match="exactly one BMRSPruningCallback"):
        BMRSTrainer(model=_bert(), args=_args(tmp_path), train_dataset=TokenData(8, seed=0))
    model = _bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer built before the noise"):
        BMRSTrainer(model=model, args=_args(tmp_path), train_dataset=TokenData(8, seed=0),
                    callbacks=[BMRSPruningCallback()], optimizers=(opt, None))


def test_hf_noise_parameters_get_their_own_group_without_weight_decay(tmp_path):
    model = _bert()
    trainer = BMRSTrainer(model=model, args=_args(tmp_path, weight_decay=0.1), train_dataset=TokenData(8, seed=0),
                          callbacks=[BMRSPruningCallback()], noise_lr=0.05)
    opt = trainer.create_optimizer()
    noise = {id(p) for n in bp.noise_layers(model) for p in (n.mu, n.log_sigma)}
    groups = [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert [(lr, wd) for ids, lr, wd in groups if ids == noise] == [(0.05, 0.0)]
    others = [(ids, lr, wd) for ids, lr, wd in groups if ids != noise]
    assert all(not ids & noise and lr == 1e-2 for ids, lr, wd in others)
    assert {wd for _, _, wd in others} == {0.1, 0.0}  # the Trainer's decay / no-decay split is kept
    assert set().union(*(ids for ids, _, _ in groups)) == {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="noise_lr must be > 0"):
        BMRSTrainer(model=_bert(), args=_args(tmp_path), train_dataset=TokenData(8, seed=0),
                    callbacks=[BMRSPruningCallback()], noise_lr=0)


# ------------------------------------------------------------------------------------------ imports
def test_integrations_are_not_imported_by_the_core_and_name_their_extra_when_missing():
    script = textwrap.dedent(
        """
        import sys
        import bayesprune
        loaded = [m for m in sys.modules if m.startswith(("bayesprune.integrations", "lightning", "pytorch_lightning",
                                                          "transformers"))]
        assert not loaded, loaded
        for name in ("lightning", "pytorch_lightning", "transformers"):
            sys.modules[name] = None  # as if not installed
        for mod in ("lightning", "transformers"):
            try:
                __import__("bayesprune.integrations." + mod)
            except ImportError as e:
                print(e)
            else:
                raise SystemExit(mod + " imported without its library")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "pip install 'bayesprune[lightning]'" in lines[0]
    assert "pip install 'bayesprune[transformers]'" in lines[1]


_DDP_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    import lightning.pytorch as pl
    import bayesprune as bp
    from bayesprune.integrations.lightning import BMRSPruning

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(6 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    if __name__ == "__main__":
        out = sys.argv[1]
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 8, 8, generator=g)
        y = (x[:, 0, :4, :4].sum((1, 2)) > 0).long() + (x[:, 0, 4:, 4:].sum((1, 2)) > 0).long()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
        module = Classifier()
        cb = BMRSPruning("bmrs_n", compression=0.3, example_inputs=x[:2])  # noise added in setup, before DDP wraps
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[cb],
                             enable_progress_bar=False, logger=False, enable_checkpointing=False,
                             enable_model_summary=False)
        trainer.fit(module, loader)
        rank = trainer.global_rank
        module.eval()
        with torch.no_grad():
            masked, shrunk = module(x), cb.shrunk_model(x)
        torch.save({"masks": [m.mask.clone() for m in bp.noise_layers(module.net)],
                    "params": {k: v.detach().clone() for k, v in module.net.named_parameters()},
                    "kept": cb.report.params_kept, "total": cb.report.params_total,
                    "shrunk_params": bp.count_parameters(cb.shrunk_model),
                    "err": float((masked - shrunk).abs().max() / masked.abs().max())}, f"{out}/rank{rank}.pt")
''')


def test_lightning_callback_under_the_ddp_strategy_prunes_alike_on_every_rank(tmp_path):
    """Lightning's ``ddp`` strategy, 2 CPU processes (gloo): the noise is added before DDP wraps
    the module, DDP keeps the noise parameters in sync, and both ranks end with the same masks,
    the same parameters (BatchNorm's running statistics are buffers, which DDP broadcasts from
    rank 0 at each forward and each rank then updates on its own shard: not compared) and a
    shrunk network equal to the masked one with fewer parameters."""
    script = tmp_path / "fit_ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["masks"]) == 2 and all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"]))
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=0, msg=k)
    assert sum(int((m == 0).sum()) for m in r0["masks"]) > 0  # something was pruned
    for r in (r0, r1):
        assert r["kept"] == r["shrunk_params"] <= 0.7 * r["total"] + 1e-9
        assert r["err"] <= RTOL
