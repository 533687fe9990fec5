"""Pruning criteria and the pruning report (docs/maths.md section s 2-3).

Every criterion gives each structure a *keep score* (higher = keep) and a rule:

| criterion | score | prune when (default) |
|---|---|---|
| ``bmrs_n`` | ``-dF_N`` | ``dF_N >= threshold`` (0) |
| ``bmrs_u`` | ``-dF_U`` (precision ``p``) | ``dF_U >= threshold`` (0) |
| ``snr`` | SNR | ``SNR <= threshold`` (1) |
| ``etheta`` | E[theta] | ``E[theta] <= threshold`` (0.1) |
| ``l2`` | L2 norm of incoming weights | needs ``compression`` or ``threshold`` |
| ``grad`` | L2 norm of their gradient | needs ``compression`` or ``threshold`` |

Target mode (``compression=c``): structures are removed lowest score first, over all layers,
until the share of parameters removed reaches ``c``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .noise import MultiplicativeNoise, noise_layers
from .reduction import delta_f_normal, delta_f_uniform
from .removal import count_parameters, remaining_parameters

__all__ = ["CRITERIA", "prune", "scores", "PruneReport", "LayerReport"]

CRITERIA = ("bmrs_n", "bmrs_u", "snr", "etheta", "l2", "grad")
_DEFAULT_THRESHOLDS = {"bmrs_n": 0.0, "bmrs_u": 0.0, "snr": 1.0, "etheta": 0.1}


@dataclass
class LayerReport:
    layer: str
    kept: int
    total: int


@dataclass
class PruneReport:
    criterion: str
    layers: list[LayerReport] = field(default_factory=list)
    structures_total: int = 0
    structures_kept: int = 0
    params_total: int = 0
    params_kept: int = 0

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
            f"{self.criterion}: structures removed {100 * self.structure_compression:.2f} %, "
            f"parameters removed {100 * self.param_compression:.2f} % "
            f"({self.params_kept}/{self.params_total} kept)"
        )
        return "\n".join(rows)


def _incoming_weight(model: nn.Module, noise: MultiplicativeNoise) -> torch.Tensor:
    return model.get_submodule(noise.layer_name).weight


def _score(model: nn.Module, noise: MultiplicativeNoise, criterion: str, precision: float, s: float) -> torch.Tensor:
    with torch.no_grad():
        noise.check_finite()
        if criterion == "bmrs_n":
            return -delta_f_normal(noise.mu, noise.sigma, noise.a, noise.b, s=s)
        if criterion == "bmrs_u":
            return -delta_f_uniform(noise.mu, noise.sigma, precision, noise.a, noise.b)
        if criterion == "snr":
            return noise.posterior().snr.double()
        if criterion == "etheta":
            return noise.expected_theta().double()
        w = _incoming_weight(model, noise)
        if criterion == "l2":
            return w.detach().double().flatten(1).norm(dim=1)
        if criterion == "grad":
            if w.grad is None:
                raise ValueError(
                    f"criterion 'grad' needs gradients: layer {noise.layer_name!r} has no .grad "
                    "(run loss.backward() before pruning)"
                )
            return w.grad.detach().double().flatten(1).norm(dim=1)
    raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")


def scores(model: nn.Module, criterion: str, precision: float = 8, s: float = 1e-6) -> list[torch.Tensor]:
    """Keep scores (float64, higher = keep), one tensor per noise layer in forward order."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    layers = noise_layers(model)
    if not layers:
        raise ValueError("model has no noise layers; call bayesprune.add_noise(model, ...) first")
    return [_score(model, n, criterion, precision, s) for n in layers]


def report(model: nn.Module, criterion: str = "", example_inputs=None) -> PruneReport:
    """Kept/total structures per layer and the parameter compression of the current masks."""
    layers = noise_layers(model)
    rep = PruneReport(criterion=criterion)
    for n in layers:
        kept = int((n.mask != 0).sum())
        rep.layers.append(LayerReport(n.layer_name, kept, n.num_structures))
    rep.structures_total = sum(r.total for r in rep.layers)
    rep.structures_kept = sum(r.kept for r in rep.layers)
    rep.params_total = count_parameters(model)
    rep.params_kept = remaining_parameters(model, example_inputs)
    return rep


def _set_masks(layers, keeps, monotone: bool) -> None:
    for n, keep in zip(layers, keeps):
        new = keep.to(n.mask.dtype).to(n.mask.device)
        n.mask.copy_(n.mask * new if monotone else new)


@torch.no_grad()
def prune(
    model: nn.Module,
    criterion: str = "bmrs_n",
    *,
    threshold: float | None = None,
    compression: float | None = None,
    precision: float = 8,
    s: float = 1e-6,
    monotone: bool = True,
    example_inputs=None,
) -> PruneReport:
    """Set the noise masks by ``criterion`` and report the result.

    ``threshold`` overrides the criterion's default rule (see module docstring);
    ``compression`` (in [0, 1]) switches to target mode.  ``precision`` is BMRS_U's p,
    ``s`` BMRS_N's spike width.  ``monotone=True`` never revives a removed structure (needed for
    physical removal during training); ``False`` overwrites masks like the reference code.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if compression is not None and threshold is not None:
        raise ValueError("give either threshold or compression, not both")
    if compression is not None and not 0.0 <= compression <= 1.0:
        raise ValueError(f"compression must be in [0, 1], got {compression}")
    if criterion == "bmrs_u" and not precision > 0:
        raise ValueError(f"BMRS_U precision p must be > 0, got {precision}")
    layers = noise_layers(model)
    sc = scores(model, criterion, precision=precision, s=s)
    if compression is None:
        if threshold is None:
            if criterion not in _DEFAULT_THRESHOLDS:
                raise ValueError(f"criterion {criterion!r} has no default threshold: pass compression= or threshold=")
            threshold = _DEFAULT_THRESHOLDS[criterion]
        if criterion in ("bmrs_n", "bmrs_u"):
            keeps = [-x < threshold for x in sc]  # prune when dF >= threshold
        else:
            keeps = [x > threshold for x in sc]
        _set_masks(layers, keeps, monotone)
    else:
        _prune_to_compression(model, layers, sc, compression, monotone, example_inputs)
    return report(model, criterion, example_inputs)


def _prune_to_compression(model, layers, sc, target, monotone, example_inputs) -> None:
    """Remove lowest-score structures until the parameter share removed reaches ``target``.

    Binary search over the number k of removed structures (the share is monotone in k).
    """
    old = [n.mask.clone() for n in layers]
    flat = torch.cat([s.cpu() for s in sc])
    alive = torch.cat([m.cpu() for m in old]) != 0 if monotone else torch.ones_like(flat, dtype=torch.bool)
    order = torch.argsort(torch.where(alive, flat, torch.full_like(flat, -torch.inf)), stable=True)
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
