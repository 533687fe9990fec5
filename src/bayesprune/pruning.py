"""Setting the noise masks by a criterion, and the report of the masks (docs/maths.md section 3).

``prune(model, criterion)`` scores every structure and applies the criterion's rule
(:mod:`bayesprune.criteria`); ``compression=c`` instead removes structures lowest score first,
over all layers, until the share of parameters removed reaches ``c``.  Every decision is
computed before any mask changes: when ``prune`` raises, every mask is as it was.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .criteria import Criterion, finite, get_criterion
from .noise import check_not_meta, noise_layers
from .removal import _example, count_parameters, remaining_parameters

__all__ = ["prune", "report", "scores", "PruneReport", "LayerReport"]


@dataclass
class LayerReport:
    layer: str
    kept: int
    total: int


@dataclass
class PruneReport:
    """Kept/total structures per layer and parameters kept; ``rule`` names what decided."""

    criterion: str
    layers: list[LayerReport] = field(default_factory=list)
    structures_total: int = 0
    structures_kept: int = 0
    params_total: int = 0
    params_kept: int = 0
    rule: str = ""

    @property
    def structure_compression(self) -> float:
        """Share of structures removed."""
        return 1 - self.structures_kept / self.structures_total if self.structures_total else 0.0

    @property
    def param_compression(self) -> float:
        """Share of parameters removed (weights and biases into and out of removed structures)."""
        return 1 - self.params_kept / self.params_total if self.params_total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["structure_compression"] = self.structure_compression
        d["param_compression"] = self.param_compression
        return d

    def __str__(self) -> str:
        rows = [f"{'layer':<30} {'kept':>6} / {'total':<6}"]
        rows += [f"{r.layer:<30} {r.kept:>6} / {r.total:<6}" for r in self.layers]
        rows.append(
            f"{self.rule or self.criterion}: structures removed {100 * self.structure_compression:.2f} %, "
            f"parameters removed {100 * self.param_compression:.2f} % "
            f"({self.params_kept}/{self.params_total} kept)"
        )
        return "\n".join(rows)


def _layers(model: nn.Module):
    layers = noise_layers(model)
    if not layers:
        raise ValueError("model has no noise layers; call bayesprune.add_noise(model, example_inputs) first")
    check_not_meta(layers, "pruning")
    return layers


def _scores(model, layers, crit: Criterion) -> list[torch.Tensor]:
    with torch.no_grad():
        out = []
        for n in layers:
            n.check_finite()
            out.append(crit.score(model, n))
        return out


def scores(model: nn.Module, criterion: str | Criterion = "bmrs_n", **options) -> list[torch.Tensor]:
    """Keep scores (float64, higher = keep), one tensor per noise layer in forward order.

    ``criterion``: a registry name (``options`` go to its class) or a :class:`Criterion`."""
    crit = get_criterion(criterion, **options)
    return _scores(model, _layers(model), crit)


def report(model: nn.Module, *, criterion: str = "", rule: str = "", example_inputs=None) -> PruneReport:
    """Kept/total structures per layer and the parameter compression of the current masks.

    ``example_inputs``: another input than the one given to ``add_noise`` (which is the default)."""
    layers = noise_layers(model)
    check_not_meta(layers, "the report")
    rep = PruneReport(criterion=criterion, rule=rule)
    for n in layers:
        kept = int((n.mask != 0).sum())
        rep.layers.append(LayerReport(n.layer_name, kept, n.num_structures))
    rep.structures_total = sum(r.total for r in rep.layers)
    rep.structures_kept = sum(r.kept for r in rep.layers)
    rep.params_total = count_parameters(model)
    rep.params_kept = remaining_parameters(model, example_inputs)
    return rep


@torch.no_grad()
def prune(
    model: nn.Module,
    criterion: str | Criterion = "bmrs_n",
    *,
    compression: float | None = None,
    monotone: bool = True,
    example_inputs=None,
    **options,
) -> PruneReport:
    """Set the noise masks by ``criterion`` and report the result.

    ``criterion``: a name of :data:`bayesprune.CRITERIA` with its class's ``options`` (e.g.
    ``prune(model, "bmrs_u", precision=4)``, ``prune(model, "bmrs_n", prior_odds=1)``), or a
    criterion object (``prune(model, BMRSUniform(precision=4))``).  ``compression`` (in [0, 1])
    switches to target mode.  ``monotone=True`` never revives a removed structure (needed for
    physical removal during training); ``False`` overwrites masks like the reference code.
    ``example_inputs``: another input than the one given to ``add_noise``.
    """
    crit = get_criterion(criterion, **options)
    if compression is not None:
        if options.get("threshold") is not None or options.get("prior_odds") is not None:
            raise ValueError("give either threshold or compression, not both (prior_odds is a threshold too)")
        compression = finite("compression", compression)
        if not 0.0 <= compression <= 1.0:
            raise ValueError(f"compression must be in [0, 1], got {compression}")
    layers = _layers(model)
    example_inputs = _example(model, example_inputs)  # before any change: a missing input raises here
    sc = _scores(model, layers, crit)
    old = [n.mask.clone() for n in layers]
    if compression is None:
        keeps = [crit.keep(x) for x in sc]
        rule = crit.rule
    else:
        keeps = None
        rule = f"{crit.label}: lowest scores removed first until {100 * compression:g} % of the parameters are"
    try:
        if keeps is not None:
            for n, keep in zip(layers, keeps):
                new = keep.to(n.mask.dtype).to(n.mask.device)
                n.mask.copy_(n.mask * new if monotone else new)
        else:
            _prune_to_compression(model, layers, sc, compression, monotone, example_inputs)
        return report(model, criterion=crit.name, rule=rule, example_inputs=example_inputs)
    except BaseException:
        for n, o in zip(layers, old):
            n.mask.copy_(o)
        raise


def _prune_to_compression(model, layers, sc, target, monotone, example_inputs) -> None:
    """Remove lowest-score structures until the parameter share removed reaches ``target``.

    Binary search over the number k of removed structures (the share is monotone in k).
    """
    old = [n.mask.clone() for n in layers]
    flat = torch.cat([s.cpu() for s in sc])
    alive = torch.cat([m.cpu() for m in old]) != 0 if monotone else torch.ones_like(flat, dtype=torch.bool)
    order = torch.argsort(torch.where(alive, flat, torch.full_like(flat, -math.inf)), stable=True)
    sizes = [len(s) for s in sc]
    total = count_parameters(model)

    def apply(k: int) -> float:
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[order[:k]] = False
        for n, o, kp in zip(layers, old, torch.split(keep, sizes)):
            n.mask.copy_((o if monotone else torch.ones_like(o)) * kp.to(o.dtype).to(o.device))
        return 1 - remaining_parameters(model, example_inputs) / total

    lo, hi = 0, len(flat)
    if monotone:
        lo = int((~alive).sum())
    while lo < hi:
        mid = (lo + hi) // 2
        if apply(mid) >= target - 1e-12:
            hi = mid
        else:
            lo = mid + 1
    apply(lo)
