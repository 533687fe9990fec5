"""Setting the noise masks by a criterion, and the report of the masks (docs/maths.md section 3).

``prune(model, criterion)`` scores every structure and applies the criterion's rule
(:mod:`bayesprune.criteria`); ``compression=c`` instead removes structures lowest score first,
over all layers, until the share of parameters removed reaches ``c``.  ``round_to=k`` then
keeps more structures, so that each layer, or each group of layers whose outputs are coupled
(a residual stage), keeps a multiple of k (kernel-friendly widths; :func:`round_masks`).  Every
decision is computed before any mask changes: when ``prune`` raises, every mask is as it was.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .criteria import Criterion, finite, get_criterion
from .noise import check_not_meta, noise_layers
from .counting import _analysis, _estimated_remaining, remaining_parameters
from .removal import _example, count_parameters

__all__ = ["prune", "report", "scores", "round_masks", "PruneReport", "LayerReport"]

#: the criterion of ``prune`` and ``round_masks`` when none is given
DEFAULT_CRITERION = "bmrs_n"


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
    #: ``round_to`` of ``prune`` and the kept counts before rounding (None: no rounding)
    round_to: int | None = None
    structures_kept_unrounded: int | None = None
    params_kept_unrounded: int | None = None
    #: heads every attention keeps after ``uniform_heads`` (then the ``*_unrounded`` counts are
    #: those before it, and ``rounding_cost`` its cost); None: not asked
    uniform_heads: int | None = None
    #: True after ``uniform_widths``: the layers at one place of same-width repeated blocks keep
    #: one width (the ``*_unrounded`` counts are those before it, as for ``round_to``)
    uniform_widths: bool = False

    @property
    def structure_compression(self) -> float:
        """Share of structures removed."""
        return 1 - self.structures_kept / self.structures_total if self.structures_total else 0.0

    @property
    def param_compression(self) -> float:
        """Share of parameters removed (weights and biases into and out of removed structures)."""
        return 1 - self.params_kept / self.params_total if self.params_total else 0.0

    @property
    def param_compression_unrounded(self) -> float:
        """Share of parameters the rule alone removed, before ``round_to`` kept more."""
        if self.params_kept_unrounded is None:
            return self.param_compression
        return 1 - self.params_kept_unrounded / self.params_total if self.params_total else 0.0

    @property
    def rounding_cost(self) -> float:
        """Share of the parameters that ``round_to`` kept on top of the rule (0 without rounding)."""
        return self.param_compression_unrounded - self.param_compression

    def to_dict(self) -> dict:
        d = asdict(self)
        d["structure_compression"] = self.structure_compression
        d["param_compression"] = self.param_compression
        if self.round_to is not None or self.uniform_heads is not None or self.uniform_widths:
            d["param_compression_unrounded"] = self.param_compression_unrounded
            d["rounding_cost"] = self.rounding_cost
        return d

    def __str__(self) -> str:
        rows = [f"{'layer':<30} {'kept':>6} / {'total':<6}"]
        rows += [f"{r.layer:<30} {r.kept:>6} / {r.total:<6}" for r in self.layers]
        rows.append(
            f"{self.rule or self.criterion}: structures removed {100 * self.structure_compression:.2f} %, "
            f"parameters removed {100 * self.param_compression:.2f} % "
            f"({self.params_kept}/{self.params_total} kept)"
        )
        steps = ([f"round_to={self.round_to}"] if self.round_to is not None else []) + (
            ["uniform_widths"] if self.uniform_widths else []) + (
            [f"uniform_heads ({self.uniform_heads} heads in every attention)"] if self.uniform_heads is not None else [])
        if steps:  # one line for all of them: the *_unrounded counts are those before the first
            rows.append(
                f"{' and '.join(steps)}: {self.structures_kept - self.structures_kept_unrounded} more structures and "
                f"{self.params_kept - self.params_kept_unrounded} more parameters kept; parameters removed "
                f"{100 * self.param_compression_unrounded:.2f} % without rounding, {100 * self.param_compression:.2f} % with "
                f"(cost {100 * self.rounding_cost:.2f} points)"
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
    criterion: str | Criterion = DEFAULT_CRITERION,
    *,
    compression: float | None = None,
    monotone: bool = True,
    round_to: int | None = None,
    uniform_heads: bool | int = False,
    uniform_widths: bool = False,
    example_inputs=None,
    **options,
) -> PruneReport:
    """Set the noise masks by ``criterion`` and report the result.

    ``criterion``: a name of :data:`bayesprune.CRITERIA` with its class's ``options`` (e.g.
    ``prune(model, "bmrs_u", precision=4)``, ``prune(model, "bmrs_n", prior_odds=1)``), or a
    criterion object (``prune(model, BMRSUniform(precision=4))``).  ``compression`` (in [0, 1])
    switches to target mode.  ``monotone=True`` never revives a removed structure (needed for
    physical removal during training); ``False`` overwrites masks like the reference code.
    ``round_to=k``: then keep, per layer or coupled group, the removed structures with the highest
    keep scores until a multiple of k remain (:func:`round_masks`); the report gives the counts
    without rounding too (``structures_kept_unrounded``, ``params_kept_unrounded``, ``rounding_cost``).
    ``uniform_heads=True`` (or a head count): then revive masked attention heads, highest keep
    scores first, until every attention keeps the same heads (:func:`bayesprune.heads.uniform_heads`;
    the report gives the counts before it in the same fields).
    ``uniform_widths=True``: then revive masked structures, highest keep scores first, until the
    layers at one place of the repeated blocks (:func:`block_role`, e.g. every
    ``model.layers.*.mlp`` of a transformer) that had one width keep one width, the largest the
    rule left among them: the shrunk model is then one a config with one ``intermediate_size``
    describes (:func:`bayesprune.heads.update_hf_config`); with ``round_to``, rounded after.
    ``round_to`` and ``uniform_widths`` leave attention heads alone; ``uniform_heads`` may be given
    with them (the heads first).
    ``example_inputs``: another input than the one given to ``add_noise``.
    """
    from . import heads as _heads

    round_to = _check_round_to(round_to)
    uniform_heads = _heads.check_uniform(uniform_heads)
    if not isinstance(uniform_widths, bool):
        raise ValueError(f"uniform_widths must be True or False, got {uniform_widths!r}")
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
    layouts = _heads.clear_uniform(layers)  # a layout set by an earlier uniform_heads no longer holds
    try:
        if keeps is not None:
            for n, keep in zip(layers, keeps):
                new = keep.to(n.mask.dtype).to(n.mask.device)
                n.mask.copy_(n.mask * new if monotone else new)
        else:
            _prune_to_compression(model, layers, sc, compression, monotone, example_inputs)
        if round_to is None and uniform_heads is None and not uniform_widths:
            return report(model, criterion=crit.name, rule=rule, example_inputs=example_inputs)
        unrounded = report(model, example_inputs=example_inputs)
        if uniform_heads is not None:
            rep_heads = _heads.revive_uniform(model, layers, sc, uniform_heads, old if monotone else None)
        if round_to is not None or uniform_widths:
            _round(model, layers, sc, round_to, old if monotone else None, example_inputs, uniform=uniform_widths)
        rep = report(model, criterion=crit.name, rule=rule, example_inputs=example_inputs)
        rep.round_to, rep.uniform_heads = round_to, (rep_heads if uniform_heads is not None else None)
        rep.uniform_widths = uniform_widths
        rep.structures_kept_unrounded = unrounded.structures_kept
        rep.params_kept_unrounded = unrounded.params_kept
        return rep
    except BaseException:
        for n, o in zip(layers, old):
            n.mask.copy_(o)
        _heads.clear_uniform(layers, layouts)
        raise


def _prune_to_compression(model, layers, sc, target, monotone, example_inputs) -> None:
    """Remove lowest-score structures until the parameter share removed reaches ``target``.

    Binary search over the number k of removed structures (the share is monotone in k), on the
    fast estimate first, then on the shrunk network's count where that falls short (the estimate
    never removes less than shrink does, so the k found is still the smallest).
    """
    old = [n.mask.clone() for n in layers]
    flat = torch.cat([s.cpu() for s in sc])
    alive = torch.cat([m.cpu() for m in old]) != 0 if monotone else torch.ones_like(flat, dtype=torch.bool)
    order = torch.argsort(torch.where(alive, flat, torch.full_like(flat, -math.inf)), stable=True)
    sizes = [len(s) for s in sc]
    total = count_parameters(model)

    def apply(k: int, count=_estimated_remaining) -> float:
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[order[:k]] = False
        for n, o, kp in zip(layers, old, torch.split(keep, sizes)):
            n.mask.copy_((o if monotone else torch.ones_like(o)) * kp.to(o.dtype).to(o.device))
        return 1 - count(model, example_inputs) / total

    def search(lo, hi, count):
        while lo < hi:
            mid = (lo + hi) // 2
            if apply(mid, count) >= target - 1e-12:
                hi = mid
            else:
                lo = mid + 1
        return lo

    lo = search(int((~alive).sum()) if monotone else 0, len(flat), _estimated_remaining)
    if lo < len(flat) and apply(lo, remaining_parameters) < target - 1e-12:
        lo = search(lo + 1, len(flat), remaining_parameters)  # shrink keeps more than estimated
    apply(lo)


def _check_round_to(round_to):
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer (structures per layer a multiple of it), got {round_to!r}")
    return int(round_to)


@torch.no_grad()
def round_masks(
    model: nn.Module,
    round_to: int,
    criterion: str | Criterion = DEFAULT_CRITERION,
    *,
    example_inputs=None,
    **options,
) -> PruneReport:
    """Keep more structures so that each layer keeps a multiple of ``round_to`` (in place).

    Kernels run fastest on widths that are multiples of their vector or tile size; a layer of 37
    channels costs about as much as one of 40 or 48.  Each layer, or each group of layers whose
    outputs are coupled (channels tied across residual additions, removed only together), keeps
    ceil(kept / k) * k structures, at most all it has: the extra ones are its removed structures
    with the highest keep scores of ``criterion`` (docs/maths.md section 3), the score of a coupled
    channel being the highest of its layers'.  A revived structure is revived in every layer of its
    group.  The width counted is the one :func:`bayesprune.shrink` leaves: masked structures that
    removal must keep (coupled to a layer without noise, or to a LayerNorm) count as kept.  A
    layer whose every structure is masked stays so (Torch-Pruning then keeps one zeroed unit).
    Attention heads (:class:`bayesprune.heads.HeadNoise`) are not rounded (``uniform_heads`` is
    their option).  Returns the report of the rounded masks, with the counts before rounding.
    """
    round_to = _check_round_to(round_to)
    if round_to is None:
        raise ValueError("round_to must be a positive integer, got None")
    crit = get_criterion(criterion, **options)
    layers = _layers(model)
    example_inputs = _example(model, example_inputs)
    sc = _scores(model, layers, crit)
    old = [n.mask.clone() for n in layers]
    try:
        unrounded = report(model, example_inputs=example_inputs)
        _round(model, layers, sc, round_to, None, example_inputs)
        rep = report(model, criterion=crit.name, rule=f"{crit.label}: masks rounded up to multiples of {round_to}",
                     example_inputs=example_inputs)
    except BaseException:
        for n, o in zip(layers, old):
            n.mask.copy_(o)
        raise
    rep.round_to = round_to
    rep.structures_kept_unrounded = unrounded.structures_kept
    rep.params_kept_unrounded = unrounded.params_kept
    return rep


def block_role(name: str) -> str:
    """The place of a layer in its repeated block: the block indices of ``name`` replaced by ``*``
    (``model.layers.3.mlp.act_fn`` -> ``model.layers.*.mlp.act_fn``); a last component stays, so
    the layers of one ``nn.Sequential`` (``features.3``, ``features.7``) keep roles of their own."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def _round(model, layers, sc, k, before, example_inputs, uniform: bool = False) -> None:
    """Revive masked structures, highest score first, until each coupled group keeps a multiple
    of ``k`` (None: any count); ``uniform``: first until the groups of the same :func:`block_role`
    and width keep the same count, the largest among them.  ``before``: the masks before this
    pruning step (monotone: only structures alive then may be revived, and they get their old
    mask value back); None: any, set to 1."""
    from .heads import HeadNoise

    heads = {li for li, n in enumerate(layers) if isinstance(n, HeadNoise)}  # uniform_heads' business
    an = _analysis(model, example_inputs)
    names = [n.layer_name for n in layers]
    start = [0]
    for n in layers:
        start.append(start[-1] + n.num_structures)
    where = {name: i for i, name in enumerate(names)}
    parent = list(range(start[-1]))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    masks = [n.mask.detach().cpu() for n in layers]
    kept = torch.cat([m != 0 for m in masks])
    for li, name in enumerate(names):
        for r in an.veto.get(name, ()):
            kept[start[li] + r] = True  # removal keeps it: it counts as kept
        for r, coupled in enumerate(an.coupled.get(name, ())):
            for other, j in coupled:
                if other is None:
                    kept[start[li] + r] = True  # tied to a layer without noise, which keeps it
                elif other in where:
                    a, b = find(start[li] + r), find(start[where[other]] + j)
                    if a != b:
                        parent[a] = b
    score = torch.cat([s.detach().cpu().double() for s in sc]).nan_to_num(nan=-math.inf).tolist()
    eligible = [True] * start[-1] if before is None else torch.cat([b.detach().cpu() != 0 for b in before]).tolist()
    kept = kept.tolist()
    layer_of = [li for li in range(len(names)) for _ in range(start[li + 1] - start[li])]
    members: dict[int, list[int]] = {}
    for i in range(start[-1]):
        members.setdefault(find(i), []).append(i)
    groups: dict[frozenset, list[list[int]]] = {}  # the channels of one coupled tensor: same set of layers
    for comp in members.values():
        if layer_of[comp[0]] not in heads:
            groups.setdefault(frozenset(layer_of[i] for i in comp), []).append(comp)
    revive = torch.zeros(start[-1], dtype=torch.bool)
    present_of = {key: sum(any(kept[i] for i in c) for c in comps) for key, comps in groups.items()}
    role_of = {key: (frozenset(block_role(names[li]) for li in key), len(comps)) for key, comps in groups.items()}
    widest: dict = {}
    for key, role in role_of.items():
        widest[role] = max(widest.get(role, 0), present_of[key])
    for key, comps in groups.items():
        present = widest[role_of[key]] if uniform else present_of[key]
        if not present:
            continue
        target = min(len(comps), -(-present // k) * k if k is not None else present)
        present = present_of[key]
        absent = [c for c in comps if not any(kept[i] for i in c) and any(eligible[i] for i in c)]
        absent.sort(key=lambda c: (-max(score[i] for i in c), c[0]))  # highest keep score first
        for c in absent[: target - present]:
            revive[c] = True
    for li, n in enumerate(layers):
        r = revive[start[li]:start[li + 1]].to(n.mask.device)
        value = torch.ones_like(n.mask) if before is None else before[li]
        n.mask.copy_(torch.where(r, value, n.mask))
