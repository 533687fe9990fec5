"""What the training-loop callbacks share: their options, the noise, the KL term, pruning and the
final shrink (docs/integrations.md; the maths in docs/maths.md sections 1-3).

Framework-free: the Lightning and Hugging Face callbacks call these at their own hooks.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from ..criteria import Criterion, finite, get_criterion
from ..noise import DEFAULT_KL_WEIGHTING, KL_WEIGHTINGS, MultiplicativeNoise, add_noise, kl, noise_layers
from ..pruning import PruneReport, prune
from ..removal import count_parameters, shrink

__all__ = ["BMRSSchedule", "example_from_batch", "NOISE_OPTIONS"]

#: options of add_noise and of MultiplicativeNoise a callback passes on
NOISE_OPTIONS = tuple(
    [n for n, p in inspect.signature(add_noise).parameters.items() if p.kind is p.KEYWORD_ONLY]
    + [n for n in inspect.signature(MultiplicativeNoise).parameters if n not in ("num_structures", "dim", "sharing")]
)


def example_from_batch(batch, n: int = 2, drop=()):
    """The network's input in the first ``n`` rows of a training ``batch``: a tensor itself, the
    first entry of a tuple/list (``(x, y)``), a mapping without the keys in ``drop`` (labels)."""
    if torch.is_tensor(batch):
        return batch[:n]
    if isinstance(batch, (tuple, list)) and batch:
        return example_from_batch(batch[0], n, drop)
    if isinstance(batch, Mapping):
        return {k: v[:n] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items() if k not in drop}
    raise TypeError(
        f"cannot find the network's input in a training batch of type {type(batch).__name__} "
        "(a tensor, an (inputs, targets) tuple or a dict is understood): pass example_inputs"
    )


class BMRSSchedule:
    """Noise on a network, the KL term of its loss, pruning by a criterion and the final shrink.

    ``criterion``: a name of :data:`bayesprune.CRITERIA` or a criterion object (e.g.
    ``BMRSUniform(precision=4)``); ``compression``: prune to this share of parameters instead
    of the criterion's rule.  ``kl_weighting`` / ``num_train``: as :func:`bayesprune.kl`.
    ``add_noise_options``: keyword options of :func:`bayesprune.add_noise`.
    """

    def __init__(self, criterion, *, example_inputs=None, kl_weighting: str = DEFAULT_KL_WEIGHTING, num_train: int | None = None,
                 compression: float | None = None, **add_noise_options):
        self.criterion: Criterion = get_criterion(criterion)
        if compression is not None:
            compression = finite("compression", compression)
            if not 0.0 <= compression <= 1.0:
                raise ValueError(f"compression must be in [0, 1], got {compression}")
        elif getattr(self.criterion, "threshold", 0.0) is None:
            raise ValueError(
                f"criterion {self.criterion.name!r} has no default threshold: give compression=, or a criterion "
                f"object with a threshold (e.g. {type(self.criterion).__name__}(threshold=...))"
            )
        if kl_weighting not in KL_WEIGHTINGS:
            raise ValueError(f"unknown kl_weighting {kl_weighting!r}; valid: {', '.join(KL_WEIGHTINGS)}")
        if kl_weighting == "elbo" and (num_train is None or num_train < 1):
            raise ValueError("kl_weighting='elbo' needs num_train, the number of training examples")
        bad = sorted(set(add_noise_options) - set(NOISE_OPTIONS))
        if bad:
            raise ValueError(f"unknown option {', '.join(map(repr, bad))}; noise options: {', '.join(NOISE_OPTIONS)}")
        self.example_inputs = example_inputs
        self.kl_weighting, self.num_train, self.compression = kl_weighting, num_train, compression
        self.add_noise_options = add_noise_options
        #: the network carrying the noise (set when the noise is added)
        self.network: nn.Module | None = None
        #: the last :class:`~bayesprune.PruneReport`
        self.report: PruneReport | None = None
        #: the shrunk plain network (no noise, E[theta] folded, eval mode) after training
        self.shrunk_model: nn.Module | None = None
        #: parameters of the network when the noise was added (``compression`` is a share of these)
        self.params_initial: int | None = None
        self._pruned_at: int | None = None

    def add_noise_to(self, network: nn.Module, example_inputs) -> None:
        """Noise on ``network`` (in place) by :func:`bayesprune.add_noise`."""
        if noise_layers(network):
            raise ValueError("the network already has noise layers: give a network without them (bayesprune.remove_noise)")
        add_noise(network, example_inputs, **self.add_noise_options)
        self.network = network
        self.params_initial = count_parameters(network)
        self.report, self.shrunk_model, self._pruned_at = None, None, None

    def kl_term(self) -> torch.Tensor:
        """The KL term added to the training loss: ``bayesprune.kl(network, kl_weighting, num_train)``."""
        if self.network is None:
            raise RuntimeError("no noise yet: the KL term exists once training has started")
        return kl(self.network, self.kl_weighting, num_train=self.num_train)

    def prune_now(self, step: int) -> PruneReport:
        """Set the masks by the criterion (or to ``compression``); never revives a structure.

        ``compression`` is a share of :attr:`params_initial`: on a network already shrunk during
        training (``P`` parameters left of ``P0``) the target is ``1 - (1 - compression) P0 / P``
        of the current ones (0 once reached).  The report counts the current network."""
        target = self.compression
        if target is not None:
            target = min(1.0, max(0.0, 1.0 - (1.0 - target) * self.params_initial / count_parameters(self.network)))
        self.report = prune(self.network, self.criterion, compression=target)
        self._pruned_at = step
        return self.report

    def finish(self, step: int) -> nn.Module:
        """Prune unless that was done at ``step`` already, then :func:`bayesprune.shrink`."""
        if self.network is None:
            raise RuntimeError("training ended before the noise was added (no training batch ran)")
        if self._pruned_at != step:
            self.prune_now(step)
        self.shrunk_model = shrink(self.network).eval()
        return self.shrunk_model
