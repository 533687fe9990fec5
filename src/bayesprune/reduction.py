"""Bayesian model reduction for structured pruning (docs/maths.md section 2).

For a reduced prior p~ the change in log evidence follows from the posterior alone,
``dF = log E_q[p~(x) / p(x)]`` (the log Bayes factor of the reduced model).  A structure is
removed when its posterior odds of removal are at least 1: ``BF * prior_odds >= 1``, i.e.
``dF + log(prior_odds) >= 0``, or ``dF >= threshold`` with ``threshold = -log(prior_odds)``
(docs/maths.md section 2; the criteria objects of :mod:`bayesprune.criteria` hold the rule).  Both functions work in float64 and use the split
``log Z = -d^2/2 + r`` of :func:`bayesprune.distributions.log_mass_parts` so that the
``1e14``-sized terms of the paper's form cancel algebraically.
"""

from __future__ import annotations

import math

import torch

from .distributions import DEFAULT_A, DEFAULT_B, log_mass_parts

__all__ = ["delta_f_normal", "delta_f_uniform", "FLOAT32_MANTISSA_LOG", "REFERENCE_THRESHOLD", "LOG_REFERENCE_PRIOR_ODDS"]

#: log of the prior odds of removal that the reference implementation (and the BMRS paper) use:
#: its dF_N is the exact one + 0.5 log(2 pi) (it drops the 2 pi of the Gaussian normaliser, which
#: gives the reduced prior a total mass of sqrt(2 pi)), so its rule "dF >= 0" is exact BMR with
#: prior odds sqrt(2 pi) : 1 (docs/maths.md section 2).
LOG_REFERENCE_PRIOR_ODDS = 0.5 * math.log(2 * math.pi)
#: the same rule as a dF threshold: ``prune(model, "bmrs_n", threshold=REFERENCE_THRESHOLD)``
#: reproduces the reference implementation's decisions.
REFERENCE_THRESHOLD = -LOG_REFERENCE_PRIOR_ODDS

#: a' of BMRS_U: log 2^-23, the float32 mantissa resolution.
FLOAT32_MANTISSA_LOG = -23 * math.log(2.0)


def _check_bounds(a: float, b: float) -> None:
    if not a < b:
        raise ValueError(f"the log-space bounds need a < b, got a={a}, b={b}")


def _as_f64(x, device=None) -> torch.Tensor:
    """float64 tensor of ``x`` without a detour through the default dtype (a Python float given
    to ``torch.as_tensor`` would be rounded to float32 first, costing ~1e-6 absolute in mu)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device if device is not None else x.device, dtype=torch.float64)
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _dist(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return torch.where(x < a, a - x, torch.where(x > b, x - b, torch.zeros_like(x)))


def delta_f_normal(mu, sigma, a: float = DEFAULT_A, b: float = DEFAULT_B, m: float | None = None, s: float = 1e-6) -> torch.Tensor:
    """dF of BMRS_N: reduced prior N(m, s^2) truncated to [a, b] (a spike at m = a by default).

    ``dF = log(b-a) + log Z~q - log Z - log Z~p + log N(mu; m, sigma^2 + s^2)`` with
    ``s~q^2 = sigma^2 s^2/(sigma^2 + s^2)``, ``m~q = s~q^2 (mu/sigma^2 + m/s^2)`` (docs/maths.md section 2,
    equal to the paper's Eq. 8).  Returns float64.
    """
    _check_bounds(a, b)
    if not s > 0:
        raise ValueError(f"the spike width s must be > 0, got {s}")
    m = a if m is None else float(m)
    mu = _as_f64(mu)
    sigma = _as_f64(sigma, mu.device)
    var, s2 = sigma * sigma, s * s
    tot = var + s2
    sq = sigma * s / torch.sqrt(tot)
    # a - mq and b - mq with mq = (mu s^2 + m sigma^2)/tot, formed from the differences so that
    # an offset of mq from a bound far below the ulp of the bound itself (mu - a tiny relative
    # to sigma^2/s^2) is not rounded away
    a_mq = ((a - mu) * s2 + (a - m) * var) / tot
    b_mq = ((b - mu) * s2 + (b - m) * var) / tot
    d0, r0 = log_mass_parts((a - mu) / sigma, (b - mu) / sigma)
    dq, rq = log_mass_parts(a_mq / sq, b_mq / sq)
    dp, rp = log_mass_parts(torch.tensor((a - m) / s, dtype=torch.float64), torch.tensor((b - m) / s, dtype=torch.float64))
    # 2E = d0^2 - dq^2 - (mu - m)^2/(sigma^2 + s^2).  For mu outside [a, b] with nearest bound x*,
    # write u = x* - mu (so d0 = |u|/sigma) and v = x* - m, mu - m = v - u:
    #   d0^2 - (mu - m)^2/tot = (u^2 s^2/sigma^2 + 2uv - v^2)/tot            (exact).
    # If mq lies past x* on mu's side as well, dq = |x* - mq|/sq and the identity
    # (x-mu)^2/sigma^2 + (x-m)^2/s^2 = (x-mq)^2/sq^2 + (mu-m)^2/tot at x = x* collapses 2E to
    # -v^2/s^2.  Otherwise (mq inside, the usual case mu > b, m = a) the form above has no
    # catastrophic cancellation: mq <= x* means |u| s^2 <= |v| sigma^2, so the positive term is
    # at most half of the negative ones (the old ((x*-mq)^2 - Dq^2)/sq^2 - v^2/s^2 cancelled
    # two ~1e14 terms for mu > b, s = 1e-6).
    below, above = mu < a, mu > b
    x_star = torch.where(below, torch.full_like(mu, a), torch.full_like(mu, b))
    same_side = torch.where(below, a_mq > 0, b_mq < 0)
    u = x_star - mu
    v = x_star - m
    two_e_same = -(v * v) / s2
    two_e_other = ((u * s) ** 2 / var + u * (2 * v) - v * v) / tot - dq * dq
    two_e_out = torch.where(same_side, two_e_same, two_e_other)
    two_e_in = -(dq * dq) - (mu - m) ** 2 / tot
    two_e = torch.where(below | above, two_e_out, two_e_in)
    return (
        math.log(b - a)
        + (rq - r0 - rp)
        + dp * dp / 2
        + two_e / 2
        - 0.5 * torch.log(2 * math.pi * tot)
    )


def delta_f_uniform(mu, sigma, precision: float, a: float = DEFAULT_A, b: float = DEFAULT_B, a_reduced: float = FLOAT32_MANTISSA_LOG) -> torch.Tensor:
    """dF of BMRS_U-p: reduced prior log-uniform on [a', b'] = [log 2^-23, log 2^-p].

    ``dF = log q([a', b']) - log((b' - a')/(b - a))``, ``q([a', b'])`` the posterior mass of the
    reduced interval.  Smaller p prunes more.  Returns float64.
    """
    _check_bounds(a, b)
    if not precision > 0:
        raise ValueError(f"BMRS_U precision p must be > 0 (the paper uses 4 and 8), got {precision}")
    b_red = -float(precision) * math.log(2.0)
    if not (a <= a_reduced < b_red <= b):
        raise ValueError(
            f"BMRS_U needs a <= a' < b' <= b; got a={a}, a'={a_reduced:.4g}, "
            f"b'=log 2^-{precision}={b_red:.4g}, b={b}"
        )
    mu = _as_f64(mu)
    sigma = _as_f64(sigma, mu.device)
    d0, r0 = log_mass_parts((a - mu) / sigma, (b - mu) / sigma)
    d1, r1 = log_mass_parts((a_reduced - mu) / sigma, (b_red - mu) / sigma)
    big_d0, big_d1 = _dist(mu, a, b), _dist(mu, a_reduced, b_red)
    log_q = -(big_d1 - big_d0) * (big_d1 + big_d0) / (2 * sigma * sigma) + r1 - r0
    return log_q - math.log((b_red - a_reduced) / (b - a))
