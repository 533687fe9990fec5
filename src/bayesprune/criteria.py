"""Pruning criteria as small objects, and the registry of their names (docs/maths.md sections 2-3).

Each criterion gives every structure a *keep score* (float64, higher = keep) and knows its
default rule and what its ``threshold`` means:

| name | class | keep score | removed when (default) |
|---|---|---|---|
| ``bmrs_n`` | :class:`BMRSNormal` | ``-dF_N`` | ``dF_N + log(prior_odds) >= 0`` (odds sqrt(2 pi)) |
| ``bmrs_u`` | :class:`BMRSUniform` | ``-dF_U`` (precision p) | ``dF_U + log(prior_odds) >= 0`` (odds 1) |
| ``snr`` | :class:`SNR` | SNR | ``SNR <= threshold`` (1) |
| ``etheta`` | :class:`ExpectedTheta` | E[theta] | ``E[theta] <= threshold`` (0.1) |
| ``l2`` | :class:`L2Norm` | L2 norm of the incoming weights | no default: a ``threshold`` or a target compression |
| ``grad`` | :class:`GradNorm` | L2 norm of their gradient | as ``l2`` |

BMRS rule: a structure is removed when its posterior odds of removal, ``BF * prior_odds`` with
``log BF = dF``, are at least 1; ``threshold = -log(prior_odds)`` is the same rule written in dF
(give one of the two).  Exact BMR is odds 1 (threshold 0).  The BMRS paper and its reference code
use odds sqrt(2 pi) (threshold ``reduction.REFERENCE_THRESHOLD`` = -0.919), the default of
:class:`BMRSNormal`: with odds 1 a structure whose posterior relaxed to the prior (dF between
-0.35 and -0.08) is kept, although the data do not need it.

A new criterion is one class here with the :func:`register` decorator.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from .noise import MultiplicativeNoise
from .reduction import LOG_REFERENCE_PRIOR_ODDS, REFERENCE_THRESHOLD, delta_f_normal, delta_f_uniform

__all__ = [
    "CRITERIA",
    "Criterion",
    "BMRSNormal",
    "BMRSUniform",
    "SNR",
    "ExpectedTheta",
    "L2Norm",
    "GradNorm",
    "get_criterion",
    "register",
]

_REGISTRY: dict[str, type["Criterion"]] = {}


def register(cls: type["Criterion"]) -> type["Criterion"]:
    """Class decorator: make ``cls`` available under ``cls.name`` (``prune(model, cls.name)``)."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"criterion name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def finite(option: str, value) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``option`` if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not (
        isinstance(value, torch.Tensor) and value.numel() == 1
    ):
        raise ValueError(f"{option} must be a finite number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{option} must be a finite number, got {v}")
    return v


@dataclass(frozen=True)
class Criterion:
    """Base class: :meth:`score` per structure, :meth:`keep` by the default rule, :attr:`rule`."""

    name: ClassVar[str] = ""
    #: short name for reports and tables
    label: ClassVar[str] = ""
    #: what ``threshold`` means for this criterion
    threshold_meaning: ClassVar[str] = ""

    def score(self, model: nn.Module, noise: MultiplicativeNoise) -> torch.Tensor:
        """Keep scores of ``noise``'s structures (float64, higher = keep)."""
        raise NotImplementedError

    def keep(self, score: torch.Tensor) -> torch.Tensor:
        """Boolean keep decision of the default rule for these scores."""
        raise NotImplementedError

    @property
    def rule(self) -> str:
        """The rule in words, e.g. ``"SNR: removed when SNR <= 1"``."""
        raise NotImplementedError

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.init)


@dataclass(frozen=True)
class _ScoreThreshold(Criterion):
    """Removed when score <= threshold."""

    threshold: float | None = None
    default_threshold: ClassVar[float | None] = None

    def __post_init__(self):
        thr = getattr(self, "threshold")
        if thr is None:
            thr = self.default_threshold
        object.__setattr__(self, "threshold", None if thr is None else finite("threshold", thr))

    def keep(self, score: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            raise ValueError(f"criterion {self.name!r} has no default threshold: pass compression= or threshold=")
        return score > self.threshold

    @property
    def rule(self) -> str:
        if self.threshold is None:
            return f"{self.label}: no default rule (give a threshold or a compression)"
        return f"{self.label}: removed when {self.label} <= {self.threshold:g}"


class _BMRS(Criterion):
    """Removed when dF + log(prior_odds) >= 0, i.e. dF >= threshold = -log(prior_odds)."""

    #: log prior odds of removal when neither prior_odds nor threshold is given
    default_log_prior_odds: ClassVar[float] = 0.0
    threshold_meaning: ClassVar[str] = "dF (log Bayes factor of removal): removed when dF >= threshold = -log(prior_odds)"

    def __post_init__(self):
        odds, thr = self.prior_odds, self.threshold
        if odds is not None and thr is not None:
            raise ValueError(f"{self.name}: give prior_odds or threshold, not both (threshold = -log(prior_odds))")
        if isinstance(thr, str):
            if thr != "reference":
                raise ValueError(f"threshold must be a finite number or 'reference', got {thr!r}")
            thr = REFERENCE_THRESHOLD
        if thr is not None:
            thr = finite("threshold", thr)
        elif odds is not None:
            odds = finite("prior_odds", odds)
            if not odds > 0:
                raise ValueError(f"prior_odds must be > 0, got {odds}")
            thr = -math.log(odds) + 0.0  # odds 1: threshold 0.0, not -0.0
        else:
            thr = 0.0 - self.default_log_prior_odds  # 0.0, not -0.0, for odds 1
        object.__setattr__(self, "threshold", thr)
        object.__setattr__(self, "prior_odds", math.exp(-thr) if -thr < 700 else math.inf)

    def _delta_f(self, noise: MultiplicativeNoise) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model, noise):
        return -self._delta_f(noise)

    def keep(self, score):
        return -score < self.threshold  # removed when dF >= threshold

    @property
    def rule(self) -> str:
        return (f"{self.label}: dF + log(prior odds {self.prior_odds:.4g}) >= 0 "
                f"(dF >= {self.threshold:.4g})")


@register
@dataclass(frozen=True)
class BMRSNormal(_BMRS):
    """BMRS_N: reduced prior a narrow normal N(a, s^2) (a spike at the lower bound), dF_N of
    :func:`bayesprune.delta_f_normal`.  Default prior odds sqrt(2 pi), the paper's."""

    prior_odds: float | None = None
    threshold: float | str | None = None
    s: float = 1e-6
    name: ClassVar[str] = "bmrs_n"
    label: ClassVar[str] = "BMRS_N"
    default_log_prior_odds: ClassVar[float] = LOG_REFERENCE_PRIOR_ODDS

    def __post_init__(self):
        super().__post_init__()
        s = finite("s", self.s)
        if not s > 0:
            raise ValueError(f"the spike width s must be > 0, got {s}")
        object.__setattr__(self, "s", s)

    def _delta_f(self, noise):
        return delta_f_normal(noise.mu, noise.sigma, noise.a, noise.b, s=self.s)


@register
@dataclass(frozen=True)
class BMRSUniform(_BMRS):
    """BMRS_U-p: reduced prior log-uniform on [log 2^-23, log 2^-p], dF_U of
    :func:`bayesprune.delta_f_uniform` (smaller p removes more).  Default prior odds 1, the
    paper's (its reference code computes dF_U exactly)."""

    precision: float = 8
    prior_odds: float | None = None
    threshold: float | str | None = None
    name: ClassVar[str] = "bmrs_u"
    label: ClassVar[str] = "BMRS_U"

    def __post_init__(self):
        super().__post_init__()
        p = finite("precision", self.precision)
        if not p > 0:
            raise ValueError(f"BMRS_U precision must be > 0 (the paper uses 4 and 8), got {p}")
        object.__setattr__(self, "precision", p)

    def _delta_f(self, noise):
        return delta_f_uniform(noise.mu, noise.sigma, self.precision, noise.a, noise.b)

    @property
    def rule(self) -> str:
        return super().rule.replace("BMRS_U", f"BMRS_U-{self.precision:g}", 1)


@register
@dataclass(frozen=True)
class SNR(_ScoreThreshold):
    """Signal-to-noise ratio E[theta] / sd[theta] of the posterior."""

    name: ClassVar[str] = "snr"
    label: ClassVar[str] = "SNR"
    default_threshold: ClassVar[float] = 1.0
    threshold_meaning: ClassVar[str] = "SNR: removed when SNR <= threshold"

    def score(self, model, noise):
        return noise.posterior().snr.double()


@register
@dataclass(frozen=True)
class ExpectedTheta(_ScoreThreshold):
    """Posterior mean E[theta] of the noise variable."""

    name: ClassVar[str] = "etheta"
    label: ClassVar[str] = "E[θ]"
    default_threshold: ClassVar[float] = 0.1
    threshold_meaning: ClassVar[str] = "E[theta]: removed when E[theta] <= threshold"

    def score(self, model, noise):
        return noise.expected_theta().double()


def _incoming_weight(model: nn.Module, noise: MultiplicativeNoise) -> torch.Tensor:
    if getattr(noise, "head_dim", None) is not None:  # bayesprune.heads.HeadNoise
        raise ValueError(f"criteria 'l2' and 'grad' score a layer's weight rows; {noise.layer_name!r} holds attention-head "
                         "noise: use bmrs_n, bmrs_u, snr or etheta")
    return model.get_submodule(noise.layer_name).weight


@register
@dataclass(frozen=True)
class L2Norm(_ScoreThreshold):
    """L2 norm of each structure's incoming weights (no default rule)."""

    name: ClassVar[str] = "l2"
    label: ClassVar[str] = "L2"
    threshold_meaning: ClassVar[str] = "L2 norm of the incoming weights: removed when norm <= threshold"

    def score(self, model, noise):
        return _incoming_weight(model, noise).detach().double().flatten(1).norm(dim=1)


@register
@dataclass(frozen=True)
class GradNorm(_ScoreThreshold):
    """L2 norm of the gradient of each structure's incoming weights (run ``loss.backward()`` first)."""

    name: ClassVar[str] = "grad"
    label: ClassVar[str] = "Grad"
    threshold_meaning: ClassVar[str] = "L2 norm of the weights' gradient: removed when norm <= threshold"

    def score(self, model, noise):
        w = _incoming_weight(model, noise)
        if w.grad is None:
            raise ValueError(
                f"criterion 'grad' needs gradients: layer {noise.layer_name!r} has no .grad "
                "(run loss.backward() before pruning)"
            )
        return w.grad.detach().double().flatten(1).norm(dim=1)


#: the registered criteria's names (the CLI's and the tables')
CRITERIA: tuple[str, ...] = tuple(_REGISTRY)


def get_criterion(criterion: str | Criterion, **options) -> Criterion:
    """The :class:`Criterion` named ``criterion`` (a registry name) built with ``options``, or
    ``criterion`` itself if it is one already (then ``options`` must be empty)."""
    if isinstance(criterion, Criterion):
        if options:
            raise ValueError(
                f"options {', '.join(sorted(options))} go to the criterion object, not to prune: "
                f"e.g. {type(criterion).__name__}({', '.join(f'{k}=...' for k in sorted(options))})"
            )
        return criterion
    cls = _REGISTRY.get(criterion) if isinstance(criterion, str) else None
    if cls is None:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(_REGISTRY)}")
    bad = sorted(set(options) - set(cls.options()))
    if bad:
        raise ValueError(
            f"criterion {criterion!r} ({cls.__name__}) has no option {', '.join(map(repr, bad))}; "
            f"its options: {', '.join(cls.options()) or 'none'}"
        )
    return cls(**options)
