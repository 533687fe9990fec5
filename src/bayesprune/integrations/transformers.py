"""BMRS pruning for the Hugging Face ``Trainer`` (docs/integrations.md; the maths in docs/maths.md).

A ``TrainerCallback`` cannot change the loss, so two pieces work together::

    callback = BMRSPruningCallback("bmrs_n")
    trainer = BMRSTrainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    small = callback.shrunk_model

:class:`BMRSTrainer` (a ``Trainer``) puts the noise on the model when it is built (before its
optimizer exists) and adds ``callback.kl_term()`` to the training loss in ``compute_loss``;
:class:`BMRSPruningCallback` prunes at the end of every ``prune_every_n_epochs``-th epoch (or
every ``prune_every_n_steps`` optimizer steps) and shrinks at the end of training.

Needs ``transformers`` and ``accelerate`` (the extra ``bayesprune[transformers]``).
"""

from __future__ import annotations

try:
    import transformers as hf
except ImportError as e:
    raise ImportError(
        "bayesprune.integrations.transformers needs Hugging Face transformers: "
        "pip install 'bayesprune[transformers]' (or pip install transformers accelerate)"
    ) from e

import torch

from ..criteria import finite
from ..noise import DEFAULT_KL_WEIGHTING, noise_layers
from .common import BMRSSchedule, example_from_batch

__all__ = ["BMRSPruningCallback", "BMRSTrainer"]


def _positive_int_or_none(option: str, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{option} must be an integer >= 1 or None, got {value!r}")
    return value


class BMRSPruningCallback(BMRSSchedule, hf.TrainerCallback):
    """Prunes during ``Trainer.train`` and leaves the shrunk plain model; use with :class:`BMRSTrainer`.

    ``criterion``: a name of :data:`bayesprune.CRITERIA` or a criterion object; ``compression``:
    prune to this share of parameters instead.  ``example_inputs``: a small batch of the model's
    forward arguments (a dict, e.g. ``{"input_ids": ..., "attention_mask": ...}``); by default
    the first two training examples through the Trainer's data collator, without the label
    columns.  ``prune_every_n_epochs`` (default 1) or ``prune_every_n_steps`` (optimizer steps;
    then epochs are not used).  ``kl_weighting``, ``num_train``: as :func:`bayesprune.kl`.
    ``add_noise_options``: keyword options of :func:`bayesprune.add_noise`.

    After ``train``: ``report`` (the last :class:`~bayesprune.PruneReport`), ``shrunk_model``
    (plain, eval mode; its eval output is the masked model's), ``network`` (the trainer's noisy,
    masked model).
    """

    def __init__(self, criterion="bmrs_n", *, example_inputs=None, kl_weighting: str = DEFAULT_KL_WEIGHTING,
                 num_train: int | None = None, compression: float | None = None, prune_every_n_epochs: int | None = 1,
                 prune_every_n_steps: int | None = None, **add_noise_options):
        super().__init__(criterion, example_inputs=example_inputs, kl_weighting=kl_weighting, num_train=num_train,
                         compression=compression, **add_noise_options)
        self.prune_every_n_steps = _positive_int_or_none("prune_every_n_steps", prune_every_n_steps)
        self.prune_every_n_epochs = None if prune_every_n_steps else _positive_int_or_none(
            "prune_every_n_epochs", prune_every_n_epochs)
        self._trainer_attached = False
        self._epochs_done = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._trainer_attached:
            raise RuntimeError(
                "BMRSPruningCallback needs BMRSTrainer: a plain Trainer would train without the KL term and "
                "without noise; build the trainer with BMRSTrainer(..., callbacks=[callback])"
            )
        self._epochs_done = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epochs_done += 1
        if self.prune_every_n_epochs and self._epochs_done % self.prune_every_n_epochs == 0:
            self.prune_now(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.prune_every_n_steps and state.global_step % self.prune_every_n_steps == 0:
            self.prune_now(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.finish(state.global_step)


class BMRSTrainer(hf.Trainer):
    """A ``Trainer`` whose training loss is the model's loss plus the KL term of the BMRS callback.

    Give the :class:`BMRSPruningCallback` in ``callbacks``; the noise goes on ``model`` here, so
    let the Trainer build the optimizer (``optimizers=`` built before would miss the noise
    parameters).  Evaluation losses are the model's own (no KL).  Under gradient accumulation the
    KL enters once per optimizer step.  The noise parameters get no weight decay; ``noise_lr``:
    their learning rate (default: the Trainer's ``learning_rate``), a group of their own.
    """

    def __init__(self, *args, noise_lr: float | None = None, **kwargs):
        if noise_lr is not None and not finite("noise_lr", noise_lr) > 0:
            raise ValueError(f"noise_lr must be > 0, got {noise_lr}")
        self.noise_lr = noise_lr
        super().__init__(*args, **kwargs)
        found = [c for c in self.callback_handler.callbacks if isinstance(c, BMRSPruningCallback)]
        if len(found) != 1:
            raise ValueError(f"BMRSTrainer needs exactly one BMRSPruningCallback in callbacks, got {len(found)}")
        if self.model_init is not None:
            raise ValueError("BMRSTrainer does not support model_init: pass model= (the noise goes on it once)")
        if self.optimizer is not None:
            raise ValueError(
                "BMRSTrainer got an optimizer built before the noise parameters existed: leave optimizers= "
                "out (or give optimizer_cls_and_kwargs)"
            )
        self.bmrs = found[0]
        example = self.bmrs.example_inputs
        if example is None:
            example = self._first_examples()
        self.bmrs.add_noise_to(self.model, example)
        self.bmrs._trainer_attached = True

    def _first_examples(self):
        ds = self.train_dataset
        if ds is None or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
            raise ValueError("no example input: give BMRSPruningCallback(example_inputs=...) or a train_dataset with items")
        batch = self.data_collator([ds[i] for i in range(min(2, len(ds)))])
        example = example_from_batch(batch, drop=tuple(self.label_names or ()))
        device = self.args.device
        if isinstance(example, dict):
            return {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
        return example.to(device)

    def _noise_parameters(self) -> set[int]:
        return {id(p) for m in noise_layers(self.model) for p in m.parameters(recurse=False)}

    def get_decay_parameter_names(self, model) -> list[str]:
        """The Trainer's weight-decayed parameters, less the noise parameters."""
        noise = self._noise_parameters()
        names = super().get_decay_parameter_names(model)
        return [n for n, p in model.named_parameters() if n in names and id(p) not in noise]

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the noise parameters in a group of their own at ``noise_lr``."""
        opt = super().create_optimizer(model)
        if self.noise_lr is not None:
            noise = self._noise_parameters()
            moved = [p for g in opt.param_groups for p in g["params"] if id(p) in noise]
            for g in opt.param_groups:
                g["params"] = [p for p in g["params"] if id(p) not in noise]
            opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
            opt.add_param_group({"params": moved, "lr": self.noise_lr, "weight_decay": 0.0})
        return opt

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return out
        term = self.bmrs.kl_term()
        # the Trainer divides the loss by the accumulation steps unless compute_loss scaled it already
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if scaled:
            term = term / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if return_outputs:
            loss, outputs = out
            return loss + term, outputs
        return out + term
