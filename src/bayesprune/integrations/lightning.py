"""BMRS pruning as a Lightning callback (docs/integrations.md; the maths in docs/maths.md).

``trainer = Trainer(callbacks=[BMRSPruning("bmrs_n")])``: the callback puts noise on the
LightningModule's network, adds the KL term to the loss ``training_step`` returns, prunes at the
end of every ``prune_every_n_epochs``-th training epoch, optionally removes the pruned structures
during training, and leaves the shrunk plain network as ``callback.shrunk_model``.

Needs ``lightning`` (the extra ``bayesprune[lightning]``) or, failing that, ``pytorch_lightning``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same library
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError(
            "bayesprune.integrations.lightning needs Lightning: pip install 'bayesprune[lightning]' "
            "(or pip install lightning)"
        ) from e

from ..noise import DEFAULT_KL_WEIGHTING
from ..removal import carry_optimizer_state, shrink_for_training
from .common import BMRSSchedule, example_from_batch

__all__ = ["BMRSPruning"]


class BMRSPruning(BMRSSchedule, pl.Callback):
    """Lightning callback: noise, KL in the loss, pruning each epoch, the shrunk network at the end.

    ``criterion``: a name of :data:`bayesprune.CRITERIA` or a criterion object; ``compression``:
    prune to this share of parameters instead.  ``network``: the attribute (dotted path) of the
    LightningModule holding the network to prune; by default its only child module with
    parameters.  ``example_inputs``: a small input batch of that network; if given, the noise is
    added in ``setup`` (before the optimizers exist), else from the first training batch
    (``example_from_batch``: a tensor, the first entry of an ``(x, y)`` batch, a dict) at its
    ``on_train_batch_start``, and the optimizers are built again from ``configure_optimizers``.
    ``kl_weighting``, ``num_train``: as :func:`bayesprune.kl`.  ``add_kl``: wrap the module's
    ``training_step`` so that the loss it returns (a tensor, or the ``"loss"`` of a dict) gets
    ``+ kl_term()`` (the KL is logged as ``bmrs_kl``); with ``False`` (needed for manual
    optimisation) add ``callback.kl_term()`` to the loss yourself.
    ``shrink_during_training``: after each pruning, replace the network by
    :func:`bayesprune.shrink_for_training`'s smaller copy, rebuild the optimizers and carry their
    state (moments, step, learning rates, scheduler state) to the kept entries.
    ``add_noise_options``: keyword options of :func:`bayesprune.add_noise`.

    After ``fit``: ``report`` (the last :class:`~bayesprune.PruneReport`), ``shrunk_model`` (the
    plain shrunk network in eval mode; its eval output is the masked network's), ``network``
    (the noisy, masked network, still in the LightningModule).
    """

    def __init__(self, criterion="bmrs_n", *, example_inputs=None, network: str | None = None,
                 kl_weighting: str = DEFAULT_KL_WEIGHTING, num_train: int | None = None, compression: float | None = None,
                 shrink_during_training: bool = False, prune_every_n_epochs: int = 1, add_kl: bool = True,
                 **add_noise_options):
        super().__init__(criterion, example_inputs=example_inputs, kl_weighting=kl_weighting, num_train=num_train,
                         compression=compression, **add_noise_options)
        if isinstance(prune_every_n_epochs, bool) or not isinstance(prune_every_n_epochs, int) or prune_every_n_epochs < 1:
            raise ValueError(f"prune_every_n_epochs must be an integer >= 1, got {prune_every_n_epochs!r}")
        self.network_name = network
        self.shrink_during_training = bool(shrink_during_training)
        self.prune_every_n_epochs = prune_every_n_epochs
        self.add_kl = bool(add_kl)
        self._wrapped_module = None

    # -- the network inside the LightningModule ---------------------------------------------------
    def _find_network(self, pl_module) -> str:
        if self.network_name is not None:
            try:
                pl_module.get_submodule(self.network_name)
            except AttributeError as e:
                raise ValueError(f"network={self.network_name!r}: the LightningModule has no such submodule") from e
            if not self.network_name:
                raise ValueError("network='' is the LightningModule itself: name the attribute holding the network")
            return self.network_name
        with_params = [n for n, m in pl_module.named_children() if any(True for _ in m.parameters())]
        if len(with_params) != 1:
            raise ValueError(
                "BMRSPruning needs the network inside the LightningModule as one attribute: "
                + (f"it has several child modules with parameters ({', '.join(with_params)}); pass network='name'"
                   if with_params else "it has no child module with parameters")
            )
        return with_params[0]

    def _set_network(self, pl_module, new: nn.Module) -> None:
        parent, _, attr = self.network_name.rpartition(".")
        setattr(pl_module.get_submodule(parent) if parent else pl_module, attr, new)
        self.network = new

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.network_name = self._find_network(pl_module)
        if self.add_kl and not pl_module.automatic_optimization:
            raise ValueError(
                "the LightningModule uses manual optimisation: BMRSPruning cannot add the KL to its loss; "
                "add callback.kl_term() to the loss yourself and pass add_kl=False"
            )
        if trainer.world_size > 1 and (self.example_inputs is None or self.shrink_during_training):
            raise ValueError(
                "on several devices BMRSPruning needs example_inputs (the noise must exist before the model is "
                "wrapped) and shrink_during_training=False"
            )
        self.network = None
        if self.example_inputs is not None:
            self.add_noise_to(pl_module.get_submodule(self.network_name), self.example_inputs)
        if self.add_kl:
            self._wrap_training_step(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.network is not None:
            return
        self.add_noise_to(pl_module.get_submodule(self.network_name), example_from_batch(batch))
        trainer.strategy.setup_optimizers(trainer)  # configure_optimizers again, now with the noise parameters

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.network is None or (trainer.current_epoch + 1) % self.prune_every_n_epochs:
            return
        self.prune_now(trainer.global_step)
        if self.shrink_during_training and self.report.structures_kept < self.report.structures_total:
            self._shrink_in_training(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.finish(trainer.global_step)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._wrapped_module is not None:
            self._wrapped_module.__dict__.pop("training_step", None)  # the class's training_step again
            self._wrapped_module = None

    # -- KL in the loss ---------------------------------------------------------------------------
    def _wrap_training_step(self, pl_module) -> None:
        step = type(pl_module).training_step.__get__(pl_module)

        @functools.wraps(step)
        def training_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if out is None or self.network is None:
                return out
            term = self.kl_term()
            pl_module.log("bmrs_kl", term.detach(), on_step=True, on_epoch=False, prog_bar=False)
            if torch.is_tensor(out):
                return out + term
            if isinstance(out, Mapping) and "loss" in out:
                return {**out, "loss": out["loss"] + term}
            raise TypeError(
                f"training_step returned {type(out).__name__}: BMRSPruning adds the KL to a loss tensor or to the "
                "'loss' entry of a dict; otherwise add callback.kl_term() yourself and pass add_kl=False"
            )

        pl_module.training_step = training_step
        self._wrapped_module = pl_module

    # -- removal during training ------------------------------------------------------------------
    def _shrink_in_training(self, trainer, pl_module) -> None:
        old_net, strategy = self.network, trainer.strategy
        old_opts, old_scheds = list(strategy.optimizers), list(strategy.lr_scheduler_configs)
        new_net = shrink_for_training(old_net)
        self._set_network(pl_module, new_net)
        strategy.setup_optimizers(trainer)  # configure_optimizers on the new parameters
        if len(strategy.optimizers) != len(old_opts) or len(strategy.lr_scheduler_configs) != len(old_scheds):
            raise RuntimeError("configure_optimizers returned a different number of optimizers or schedulers")
        for old, new in zip(old_opts, strategy.optimizers):
            if len(old.param_groups) != len(new.param_groups):
                raise RuntimeError("configure_optimizers returned a different number of parameter groups after shrink")
            carry_optimizer_state(old_net, old, new_net, new)
            for p in (p for g in new.param_groups for p in g["params"]):
                if p in old.state:  # parameters outside the network keep their own state
                    new.state[p] = old.state[p]
            for g_old, g_new in zip(old.param_groups, new.param_groups):
                g_new.update({k: v for k, v in g_old.items() if k != "params"})
        for old, new in zip(old_scheds, strategy.lr_scheduler_configs):
            new.scheduler.load_state_dict(old.scheduler.state_dict())

