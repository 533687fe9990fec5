"""Distributions over the multiplicative noise theta (docs/maths.md section 1).

Everything lives in log space, ``x = log(theta)``, truncated to ``[a, b]`` (defaults -20, 0):

* posterior ``q(x) = N(x; mu, sigma^2) / Z`` on ``[a, b]`` with ``alpha = (a - mu)/sigma``,
  ``beta = (b - mu)/sigma`` and ``Z = Phi(beta) - Phi(alpha)``;
* prior ``p(x) = 1 / (b - a)`` (log-uniform in theta).

Pruned structures live where ``Z`` and every difference of ``Phi`` underflow (``mu`` near or below
``a``, tiny ``sigma``).  All moments are therefore computed from a split of the log-mass,
``log Z = -d^2/2 + r`` (``d`` the distance of ``mu`` to the interval in units of sigma, ``r``
moderate, from Mills ratios via ``erfcx``), so that the ``d^2``-sized terms cancel algebraically
instead of numerically.  Moment formulas run in float64 internally (they are per structure, so
this is cheap) and are cast back to the parameters' dtype.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints, register_kl
from torch.special import erfcx, log_ndtr, ndtri

__all__ = [
    "TruncatedLogNormal",
    "LogUniform",
    "log_mass",
    "log_mass_parts",
    "DEFAULT_A",
    "DEFAULT_B",
]

DEFAULT_A = -20.0
DEFAULT_B = 0.0

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_SQRT_PI_2 = 0.5 * math.log(math.pi / 2)
_SQRT_HALF = math.sqrt(0.5)
_LN2 = math.log(2.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 (Maechler 2012), with NaN-free gradients in both branches."""
    near = x > -_LN2
    x_near = torch.where(near, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _log_mills(t: torch.Tensor) -> torch.Tensor:
    """log R(t), the Mills ratio R(t) = Q(t)/phi(t) = sqrt(pi/2) erfcx(t/sqrt 2); for t >= 0."""
    return _LOG_SQRT_PI_2 + torch.log(erfcx(t * _SQRT_HALF))


def _one_minus_t_mills(t: torch.Tensor) -> torch.Tensor:
    """1 - t R(t) for t >= 0 without cancellation: direct below 1e3, asymptotic series above."""
    small = t < 1e3
    ts = torch.where(small, t, torch.ones_like(t))
    tl = torch.where(small, torch.full_like(t, 1e3), t)
    direct = 1.0 - ts * torch.exp(_log_mills(ts))
    inv2 = 1.0 / (tl * tl)
    series = inv2 * (1.0 - inv2 * (3.0 - 15.0 * inv2))
    return torch.where(small, direct, series)


def log_mass_parts(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``log(Phi(beta) - Phi(alpha)) = -d^2/2 + r`` for ``alpha < beta``.

    ``d = max(alpha, -beta, 0)`` is the distance of 0 to ``[alpha, beta]``; ``r`` stays moderate
    however far the interval lies in a tail, so callers can cancel the ``d^2`` terms exactly.
    Upper tail (``alpha > 0``): ``Q(alpha) - Q(beta)`` with ``log Q(t) = -t^2/2 - log sqrt(2 pi)
    + log R(t)``; the lower tail is its mirror image; an interval around 0 uses ``erf``.
    """
    hi = alpha > 0
    lo = beta < 0
    mid = ~(hi | lo)
    one = torch.ones_like(alpha)
    # tail case, oriented so that the interval is [l, h] with 0 < l < h
    l = torch.where(hi, alpha, torch.where(lo, -beta, one))
    h = torch.where(hi, beta, torch.where(lo, -alpha, 2 * one))
    log_rl = _log_mills(l)
    log_ratio = -(h - l) * (h + l) / 2 + _log_mills(h) - log_rl  # log Q(h) - log Q(l)
    r_tail = -_HALF_LOG_2PI + log_rl + _log1mexp(log_ratio)
    r_mid = _log_mass_mid(torch.where(mid, alpha, -one), torch.where(mid, beta, one))
    d = torch.where(mid, torch.zeros_like(alpha), l)
    r = torch.where(mid, r_mid, r_tail)
    return d, r


def _log_mass_mid(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log(Phi(beta) - Phi(alpha)) for alpha <= 0 <= beta: no cancellation, the two erf values
    have opposite signs; when Z is close to 1, log Z = log1p(-(Q(beta) + Phi(alpha))) keeps its
    relative accuracy (log of the erf difference would round log Z ~ -1e-20 to 0)."""
    tails = 0.5 * (torch.erfc(beta * _SQRT_HALF) + torch.erfc(-alpha * _SQRT_HALF))
    small_tails = tails < 0.5
    return torch.where(
        small_tails,
        torch.log1p(-torch.where(small_tails, tails, torch.zeros_like(tails))),
        torch.log(0.5 * (torch.erf(beta * _SQRT_HALF) - torch.erf(alpha * _SQRT_HALF))),
    )


def log_mass(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log(Phi(beta) - Phi(alpha)), stable in both tails."""
    d, r = log_mass_parts(alpha, beta)
    return r - d * d / 2


def _shifted_log_mgf(alpha, beta, d0, r0, t):
    """K(t) = t^2/2 + log Z(alpha - t, beta - t) - log Z(alpha, beta): the cumulant generating
    function of the standardised truncated normal, with the quadratic terms cancelled exactly."""
    dt, rt = log_mass_parts(alpha - t, beta - t)
    new_hi = alpha - t > 0
    new_lo = beta - t < 0
    # t^2/2 - dt^2/2 + d0^2/2 written case by case (see module docstring)
    quad = torch.where(
        new_hi,
        t * alpha,
        torch.where(new_lo, t * beta + (d0 - beta) * (d0 + beta) / 2, t * t / 2 + d0 * d0 / 2),
    )
    return quad + rt - r0


def _one_sided_cumulants(alpha: torch.Tensor):
    """Cumulants kappa_2..kappa_5 of N(0,1) truncated to [alpha, inf).

    alpha <= -20: untruncated.  -20 < alpha <= 30: moments of y = z - alpha from
    E[y^(k+1)] = k E[y^(k-1)] - alpha E[y^k], E[y] = lambda - alpha (lambda = 1/R(alpha)).
    alpha > 30: asymptotic series of v = alpha*y, density ~ exp(-v - v^2/(2 alpha^2)).
    """
    # recursion branch
    ar = alpha.clamp(-20.0, 30.0)
    pos = ar > 0
    a_pos = torch.where(pos, ar, torch.ones_like(ar))
    a_neg = torch.where(pos, -torch.ones_like(ar), ar)
    log_r_neg = log_mass(a_neg, torch.full_like(ar, math.inf)) + a_neg * a_neg / 2 + _HALF_LOG_2PI
    m1_pos = _one_minus_t_mills(a_pos) / torch.exp(_log_mills(a_pos))
    m1_neg = torch.exp(-log_r_neg) - a_neg
    m = [torch.ones_like(ar), torch.where(pos, m1_pos, m1_neg)]
    for k in range(1, 5):
        m.append(k * m[k - 1] - ar * m[k])
    # asymptotic branch
    big = alpha > 30
    ab = torch.where(big, alpha, torch.full_like(alpha, 31.0))
    eps = 1.0 / (2 * ab * ab)

    def s(k):
        return sum((-eps) ** j * (math.factorial(k + 2 * j) / math.factorial(j)) for j in range(9))

    s0 = s(0)
    mb = [torch.ones_like(ab)] + [s(k) / s0 / ab**k for k in range(1, 6)]
    m = [torch.where(big, mb[k], m[k]) for k in range(6)]
    m1, m2, m3, m4, m5 = m[1:]
    c2 = m2 - m1 * m1
    c3 = m3 - 3 * m1 * m2 + 2 * m1**3
    c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
    c5 = m5 - 5 * m1 * m4 + 10 * m1**2 * m3 - 10 * m1**3 * m2 + 4 * m1**5
    k2, k3, k4, k5 = c2, c3, c4 - 3 * c2 * c2, c5 - 10 * c3 * c2
    untrunc = alpha <= -20
    zero = torch.zeros_like(alpha)
    return (
        torch.where(untrunc, torch.ones_like(alpha), k2),
        torch.where(untrunc, zero, k3),
        torch.where(untrunc, zero, k4),
        torch.where(untrunc, zero, k5),
    )


def _entropy_frame(mu, sigma, a, b):
    """alpha, beta oriented so that the tail case is al > 0 (H is invariant under x -> -x)."""
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    lo = beta < 0
    al = torch.where(lo, -beta, alpha)
    be = torch.where(lo, -alpha, beta)
    return al, be, lo


def _g_series(t: torch.Tensor) -> torch.Tensor:
    """t (1 - t R(t)) - R(t) for t > 0: direct below 100, its asymptotic series above
    (-2/t^3 + 12/t^5 - 90/t^7 + 840/t^9; the direct form loses a factor t^2 to cancellation)."""
    small = t < 100.0
    ts = torch.where(small, t, torch.ones_like(t))
    tl = torch.where(small, torch.full_like(t, 100.0), t)
    direct = ts * _one_minus_t_mills(ts) - torch.exp(_log_mills(ts))
    i2 = 1.0 / (tl * tl)
    series = i2 / tl * (-2.0 + i2 * (12.0 + i2 * (-90.0 + 840.0 * i2)))
    return torch.where(small, direct, series)


class _LogSpaceEntropy(torch.autograd.Function):
    """H(mu, sigma) of N(mu, sigma^2) truncated to [a, b], with its analytic gradient.

    H = log sigma + 1/2 + log sqrt(2 pi) + L(alpha, beta), L = log Z + (alpha phi(alpha) -
    beta phi(beta))/(2Z).  With lambda_t = phi(t)/Z:
    ``dL/dalpha = (lambda_a/2)(alpha lambda_a - beta lambda_b - 1 - alpha^2)``,
    ``dL/dbeta = (lambda_b/2)(1 + beta^2 - alpha lambda_a + beta lambda_b)``, and
    ``dH/dmu = -(L_a + L_b)/sigma``, ``dH/dsigma = (1 - alpha L_a - beta L_b)/sigma``.
    In a tail, ``alpha lambda_a - 1 - alpha^2`` cancels to O(1/alpha^3); it is computed as
    ``(g(alpha) + (1 + alpha^2) R(alpha) rho) / (R(alpha)(1 - rho))`` with ``rho = Q(beta)/Q(alpha)``
    and ``g`` from :func:`_g_series`.  One backward pass costs a few operations, where autograd
    through the forward's ~100 operations cost as many again (training-step overhead).
    """

    @staticmethod
    def forward(ctx, mu, sigma, a, b):
        al, be, lo = _entropy_frame(mu, sigma, a, b)
        tail = al > 0
        if not bool(tail.any()):
            # every mu inside [a, b] (the usual case in training): the interval case alone,
            # a fifth of the operations of the general case below, which it equals there
            return _LogSpaceEntropy._inside(ctx, al, be, sigma)
        d, r = log_mass_parts(al, be)
        log_lam = lambda t: -(t - d) * (t + d) / 2 - _HALF_LOG_2PI - r  # noqa: E731  log(phi(t)/Z)
        lam_b = torch.exp(log_lam(be))
        t_b = be / 2 * lam_b
        lam_a_mid = torch.exp(log_lam(al))
        t_a_mid = al / 2 * lam_a_mid
        # tail: d^2/2 - T_a = (al/2)(al - lambda_a), lambda_a = 1/(R(al)(1 - rho))
        al_t = torch.where(tail, al, torch.ones_like(al))
        be_t = torch.where(tail, be, 2 * torch.ones_like(be))
        log_ra = _log_mills(al_t)
        ra = torch.exp(log_ra)
        log_rho = -(be_t - al_t) * (be_t + al_t) / 2 + _log_mills(be_t) - log_ra
        rho = torch.exp(log_rho)
        one_m_rho = -torch.expm1(log_rho)
        num = _one_minus_t_mills(al_t) + al_t * ra * rho
        quad_tail = -(al_t / 2) * num / (ra * one_m_rho)
        quad = torch.where(tail, quad_tail, -t_a_mid)
        h = torch.log(sigma) + 0.5 + _HALF_LOG_2PI + r - quad - t_b
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # A = al lambda_a - 1 - al^2, cancellation-free in the tail
            a_mid = al * lam_a_mid - 1 - al * al
            lam_a_tail = 1.0 / (ra * one_m_rho)
            a_tail = (_g_series(al_t) + (1 + al_t * al_t) * ra * rho) * lam_a_tail
            lam_a = torch.where(tail, lam_a_tail, lam_a_mid)
            big_a = torch.where(tail, a_tail, a_mid)
            bl_b = be * lam_b  # 0 where lam_b underflows (be finite)
            g_al = lam_a / 2 * (big_a - bl_b)
            # 1 + be^2 - al lambda_a: directly around 0 (there al^2 may dwarf it), via A in the tail
            rest = torch.where(tail, (be - al) * (be + al) - big_a, 1 + be * be - al * lam_a)
            g_be = lam_b / 2 * (rest + bl_b)
            sign = 1.0 - 2.0 * lo.to(mu.dtype)  # d(al, be)/d(alpha, beta) swaps and negates when mirrored
            ctx.save_for_backward(-sign * (g_al + g_be) / sigma, (1 - al * g_al - be * g_be) / sigma)
        return h

    @staticmethod
    def _inside(ctx, alpha, beta, sigma):
        """H and its gradient where alpha <= 0 <= beta everywhere (d = 0, no mirroring)."""
        r = _log_mass_mid(alpha, beta)
        lam_a = torch.exp(-alpha * alpha / 2 - _HALF_LOG_2PI - r)  # phi(alpha)/Z
        lam_b = torch.exp(-beta * beta / 2 - _HALF_LOG_2PI - r)
        al_a = alpha * lam_a
        bl_b = beta * lam_b
        h = torch.log(sigma) + 0.5 + _HALF_LOG_2PI + r + (al_a - bl_b) / 2
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g_al = lam_a / 2 * (al_a - 1 - alpha * alpha - bl_b)
            g_be = lam_b / 2 * (1 + beta * beta - al_a + bl_b)
            ctx.save_for_backward(-(g_al + g_be) / sigma, (1 - alpha * g_al - beta * g_be) / sigma)
        return h

    @staticmethod
    def backward(ctx, grad):
        d_mu, d_sigma = ctx.saved_tensors
        return grad * d_mu, grad * d_sigma, None, None


class TruncatedLogNormal(Distribution):
    """theta = exp(x), x ~ N(mu, sigma^2) truncated to [a, b]: the BMRS variational posterior.

    ``mean`` is E[theta], ``variance`` Var[theta], ``snr`` E[theta]/sd[theta] (docs/maths.md section 1).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, a: float = DEFAULT_A, b: float = DEFAULT_B, validate_args=None):
        if not a < b:
            raise ValueError(f"TruncatedLogNormal needs bounds a < b, got a={a}, b={b}")
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        self.a, self.b = float(a), float(b)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(math.exp(self.a), math.exp(self.b))

    def expand(self, batch_shape, _instance=None):
        return TruncatedLogNormal(
            self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.a, self.b
        )

    # ---- float64 helpers -------------------------------------------------------------------
    def _std64(self):
        mu = self.loc.double()
        sigma = self.scale.double()
        alpha = (self.a - mu) / sigma
        beta = (self.b - mu) / sigma
        return mu, sigma, alpha, beta

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.loc.dtype)

    def log_normalizer(self) -> torch.Tensor:
        """log Z = log(Phi(beta) - Phi(alpha))."""
        _, _, alpha, beta = self._std64()
        return self._out(log_mass(alpha, beta))

    def _log_moments(self):
        """(log E[theta], v) with v = log(E[theta^2] / E[theta]^2), both float64."""
        mu, sigma, alpha, beta = self._std64()
        d0, r0 = log_mass_parts(alpha, beta)
        k1 = _shifted_log_mgf(alpha, beta, d0, r0, sigma)
        k2 = _shifted_log_mgf(alpha, beta, d0, r0, 2 * sigma)
        v_direct = k2 - 2 * k1
        # small sigma: v = K(2s) - 2K(s) = sum_n kappa_n s^n (2^n - 2)/n!, from the near bound
        near_low = alpha.abs() <= beta.abs()
        edge = torch.where(near_low, alpha, -beta)
        c2, c3, c4, c5 = _one_sided_cumulants(edge)
        sgn = torch.where(near_low, torch.ones_like(alpha), -torch.ones_like(alpha))
        v_series = sigma**2 * (c2 + sgn * c3 * sigma + (7 / 12) * c4 * sigma**2 + 0.25 * sgn * c5 * sigma**3)
        use_series = sigma * torch.sqrt(c2.clamp_min(0)) < 3e-3
        v = torch.where(use_series, v_series, v_direct)
        return mu + k1, v

    # ---- moments ---------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """E[theta] = exp(mu + sigma^2/2) (Phi(beta - sigma) - Phi(alpha - sigma)) / Z."""
        log_m, _ = self._log_moments()
        return self._out(torch.exp(log_m))

    @property
    def log_mean(self) -> torch.Tensor:
        return self._out(self._log_moments()[0])

    @property
    def variance(self) -> torch.Tensor:
        """Var[theta] = E[theta]^2 (E[theta^2]/E[theta]^2 - 1), the bracket as expm1."""
        log_m, v = self._log_moments()
        return self._out(torch.exp(2 * log_m + torch.log(torch.expm1(v))))

    @property
    def snr(self) -> torch.Tensor:
        """SNR = E[theta] / sd[theta] = (E[theta^2]/E[theta]^2 - 1)^(-1/2)."""
        _, v = self._log_moments()
        return self._out(torch.expm1(v).rsqrt())

    def log_space_entropy(self) -> torch.Tensor:
        """H[q(x)] = log sigma + log sqrt(2 pi e) + log Z + (alpha phi(alpha) - beta phi(beta))/(2Z),
        in float64, with the analytic gradient of :class:`_LogSpaceEntropy`."""
        return _LogSpaceEntropy.apply(self.loc.double(), self.scale.double(), self.a, self.b)

    # ---- sampling and density --------------------------------------------------------------
    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        return torch.exp(sample_log_theta(self.loc, self.scale, u, self.a, self.b))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(theta) = log phi((x - mu)/sigma) - log sigma - log Z - x, x = log theta in [a, b]."""
        if self._validate_args:
            self._validate_sample(value)
        x = torch.log(value)
        z = (x - self.loc) / self.scale
        lp = -z * z / 2 - _HALF_LOG_2PI - torch.log(self.scale) - self.log_normalizer() - x
        inside = (x >= self.a) & (x <= self.b)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


def sample_log_theta(mu, sigma, u, a: float = DEFAULT_A, b: float = DEFAULT_B) -> torch.Tensor:
    """Reparameterised draw of x = log theta ~ N(mu, sigma^2) on [a, b] from uniforms ``u``
    (see :func:`_sample_standardised`)."""
    return _sample_standardised(mu, sigma, u, a, b)[0]


#: below this p (and only there) ``2p - 1`` loses digits of p: ndtri; above, sqrt(2) erfinv(2p - 1)
_NDTRI_TAIL = 0.01
_SQRT2 = math.sqrt(2.0)


def _fast_ndtri(p: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Phi^-1(p) = sqrt(2) erfinv(2p - 1) for p >= 0.01 (exact argument for p >= 1/4 by Sterbenz'
    lemma, rounding of at most half an ulp of 1 below, which moves z by < 3 ulp at p = 0.01), and
    ``ndtri`` on the draws below (about 1 %): on CPU erfinv is ~9x faster than ndtri.  ``inplace``:
    ``p`` (no autograd) may be overwritten by the result."""
    tail = p < _NDTRI_TAIL
    if p.requires_grad:  # autograd through both branches: each evaluated where its gradient is finite
        return torch.where(tail, ndtri(torch.where(tail, p, 0.5)), torch.erfinv(torch.where(tail, 0.5, p) * 2.0 - 1.0) * _SQRT2)
    idx = tail.nonzero(as_tuple=True)
    count = idx[0].numel()
    if 4 * count > p.numel():  # mostly tails (an interval far in a tail): ndtri alone is cheaper
        return ndtri(p)
    tails = ndtri(p[idx]) if count else None
    z = (p.mul_(2.0) if inplace else p * 2.0).sub_(1.0).erfinv_().mul_(_SQRT2)
    if count:
        z.index_put_(idx, tails)
    return z


def _sample_standardised(mu, sigma, u, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, z)``: a reparameterised draw of x = log theta ~ N(mu, sigma^2) on [a, b] from uniforms ``u``.

    Inverse CDF in log space: the interval is mirrored to the side of the mean where its CDF
    values are representable, ``log P = logaddexp(log Phi(l), log u + log Z)`` (computed as
    ``m + log(e^(log Phi(l) - m) + u e^(log Z - m))``, ``m`` the larger of the two per structure),
    and ``z = Phi^-1(P)`` (:func:`_fast_ndtri`); where ``P`` underflows (< e^-80) Newton steps on
    ``log_ndtr`` replace it.  Differentiable in ``mu`` and ``sigma``; ``x`` is clipped to [a, b]
    and ``z = (x - mu)/sigma`` is its standardised value (before the clip).
    """
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    flip = alpha > 0
    any_flip = bool(flip.any())
    l = torch.where(flip, -beta, alpha) if any_flip else alpha
    h = torch.where(flip, -alpha, beta) if any_flip else beta
    log_pl = log_ndtr(l)
    log_ph = log_ndtr(h)
    log_z = log_ph + _log1mexp((log_pl - log_ph).clamp_max(0))
    one_minus = 1.0 - torch.finfo(u.dtype).eps
    tiny = torch.finfo(u.dtype).tiny
    if bool((log_z > -80.0).all()):
        # fast path, every interval has representable mass: P = Phi(l) + u Z
        p = torch.addcmul(torch.exp(log_pl), u, torch.exp(log_z))
        z = _fast_ndtri(p.clamp_(tiny, one_minus) if not p.requires_grad else p.clamp(tiny, one_minus), inplace=True)
    else:
        m = torch.maximum(log_pl, log_z)  # per structure: logaddexp without its per-draw exp and log1p
        logp = torch.log(torch.addcmul(torch.exp(log_pl - m), u.clamp_min(tiny), torch.exp(log_z - m))) + m
        logp = torch.minimum(logp, log_ph)
        z = _fast_ndtri(torch.exp(logp.clamp_min(-80.0)).clamp_max(one_minus))
        deep = logp < -80.0
        lp = logp[deep]  # Newton only on the draws that need it (log_ndtr and erfcx are costly)
        t = -2 * lp
        zn = -torch.sqrt(t - torch.log(t) - math.log(2 * math.pi))
        for _ in range(3):
            # Newton on log Phi(z) = lp; Phi(z)/phi(z) = R(-z), the Mills ratio
            zn = zn - (log_ndtr(zn) - lp) * torch.exp(_log_mills(-zn))
        z = z.masked_scatter(deep, zn)
    z = torch.clamp(z, l, h) if z.requires_grad else z.clamp_(l, h)
    if any_flip:
        z = torch.where(flip, -z, z)
    x = torch.addcmul(mu, sigma, z)
    return (x.clamp(a, b) if x.requires_grad else x.clamp_(a, b)), z


def _largest_square(z: torch.Tensor) -> torch.Tensor:
    """max z^2 over all draws (one reduction): a bound's weight is skipped only where it is below
    e^-80 for every draw of every structure (:func:`_implicit_coefficients`)."""
    lo, hi = torch.aminmax(z)
    return torch.maximum(lo * lo, hi * hi)


def _implicit_coefficients(mu, sigma, x, z, u, a: float, b: float, z2max):
    """``(dx/dmu, dx/dsigma)`` per draw, the implicit reparameterisation gradient of the truncated
    normal with ``u`` fixed (docs/maths.md section 1; see :class:`_ThetaDraw`), 0 where the draw was
    clipped to [a, b].  ``dx/dmu`` is None when it is 1 for every draw (no bound within
    sqrt(160) sd of any draw, so no draw was clipped either).  ``z2max``: max z^2 over the draws."""
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    need_a = math.isfinite(a) and bool((z2max - alpha * alpha > -160.0).any())
    need_b = math.isfinite(b) and bool((z2max - beta * beta > -160.0).any())
    if not (need_a or need_b):  # every draw lies > sqrt(160) sd inside both bounds (none clipped)
        return None, z
    flip = alpha > 0  # the draw was mirrored: F = 1 - u
    if bool(flip.any()):
        one_minus_f, f = (lambda: torch.where(flip, u, 1.0 - u)), (lambda: torch.where(flip, 1.0 - u, u))
    else:  # no structure mirrored (the usual case): F = u
        one_minus_f, f = (lambda: 1.0 - u), (lambda: u)
    half_z = z * 0.5
    dmu = dsigma = None
    for need, t, factor in ((need_a, alpha, one_minus_f), (need_b, beta, f)):
        if need:  # w = phi(t)/phi(z) * factor (1 - F for a, F for b); exponent (z - t)(z + t)/2
            w = (z - t).mul_(half_z + t * 0.5).clamp_(-80.0, 80.0).exp_().mul_(factor())
            dmu = (1.0 - w) if dmu is None else dmu.sub_(w)
            dsigma = torch.addcmul(z if dsigma is None else dsigma, t, w, value=-1.0)
    lo, hi = torch.aminmax(x)
    if bool(lo > a) and bool(hi < b):  # no draw clipped (one reduction instead of the masks below)
        return dmu, dsigma
    inside = (x > a) & (x < b)  # zero where the draw was clipped
    zero = torch.zeros((), dtype=dmu.dtype, device=dmu.device)
    return torch.where(inside, dmu, zero), torch.where(inside, dsigma, zero)


class _ThetaDraw(torch.autograd.Function):
    """theta = exp(x) * mask with x ~ N(mu, sigma^2) on [a, b] drawn from uniforms ``u``.

    The backward uses the implicit reparameterisation gradient of the truncated normal (u fixed,
    F = CDF): ``dx/dmu = 1 - w_a - w_b``, ``dx/dsigma = z - alpha w_a - beta w_b`` with
    ``w_a = phi(alpha)(1-F)/phi(z)``, ``w_b = phi(beta) F/phi(z)``, and the ratios
    ``phi(t)/phi(z) = exp((z - t)(z + t)/2)`` (the product form keeps its digits when z and t are
    large and close), computed by :func:`_implicit_coefficients` in the backward.  A bound whose
    exponent stays below -80 for every draw (``t^2 - z^2 > 160`` for every structure's t and the largest
    z^2 of all draws; e^-80 ~ 2e-35)
    has weight 0 to working precision and is skipped; in training the lower bound almost always is (|alpha| > 15).  Otherwise the exponent
    is clipped to [-80, 80], because ``exp`` of huge negative arguments (|alpha| ~ 1e3 when sigma
    is small) takes a slow path on CPU, ~13x slower than in range.
    """

    @staticmethod
    def forward(ctx, mu, sigma, mask, u, a, b):
        with torch.no_grad():
            x, z = _sample_standardised(mu, sigma, u, a, b)
            theta = torch.exp(x).mul_(mask)
        ctx.save_for_backward(mu, sigma, theta, x, z, u, _largest_square(z))
        ctx.bounds = (a, b)
        return theta

    @staticmethod
    def backward(ctx, grad_theta):
        mu, sigma, theta, x, z, u, z2max = ctx.saved_tensors
        dmu, dsigma = _implicit_coefficients(mu, sigma, x, z, u, *ctx.bounds, z2max)
        g = grad_theta * theta  # d theta / d x = theta
        grad_mu = grad_sigma = None
        if ctx.needs_input_grad[0]:
            grad_mu = (g if dmu is None else g * dmu).sum_to_size(mu.shape)
        if ctx.needs_input_grad[1]:
            grad_sigma = (g * dsigma).sum_to_size(sigma.shape)
        return grad_mu, grad_sigma, None, None, None, None


def draw_theta(mu, sigma, mask, u, a: float = DEFAULT_A, b: float = DEFAULT_B) -> torch.Tensor:
    """``theta * mask``, theta = exp(x) with x drawn by :func:`sample_log_theta` from ``u``.

    ``mu``, ``sigma``, ``mask`` hold one entry per structure, shaped to broadcast against ``u``
    (one uniform per draw: per element, or per (example, structure)).  Differentiable in ``mu``
    and ``sigma`` through the implicit reparameterisation gradient.
    """
    return _ThetaDraw.apply(mu, sigma, mask, u, a, b)


def draw_theta_parts(mu, sigma, mask, u, a: float = DEFAULT_A, b: float = DEFAULT_B, *, coefficients: bool = True):
    """``(theta * mask, dx/dmu, dx/dsigma)`` of :func:`draw_theta`'s draws, without autograd.

    For fused callers that apply their own chain rule (the noise layers): with ``g = dL/dx =
    dL/dtheta * theta`` per draw, ``dL/dmu = sum g dx/dmu`` and ``dL/dsigma = sum g dx/dsigma``
    over the draws of a structure.  ``dx/dmu`` is None when it is 1 for every draw; both are None
    with ``coefficients=False`` (no gradient wanted).
    """
    with torch.no_grad():
        x, z = _sample_standardised(mu, sigma, u, a, b)
        theta = torch.exp(x).mul_(mask)
        if not coefficients:
            return theta, None, None
        dmu, dsigma = _implicit_coefficients(mu, sigma, x, z, u, a, b, _largest_square(z))
    return theta, dmu, dsigma


def kl_log_uniform(mu: torch.Tensor, sigma: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """KL(q || p) = log(b - a) - H[q(x)] of TruncatedLogNormal(mu, sigma, a, b) against
    LogUniform(a, b), in float64 with the analytic gradient (docs/maths.md section 1), without
    building the distribution objects (the KL term of every training step)."""
    return math.log(b - a) - _LogSpaceEntropy.apply(mu.double(), sigma.double(), float(a), float(b))


class LogUniform(Distribution):
    """Log-uniform prior: log theta ~ U(a, b), p(theta) = 1 / ((b - a) theta)."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, a: float = DEFAULT_A, b: float = DEFAULT_B, batch_shape=torch.Size(), validate_args=None):
        if not a < b:
            raise ValueError(f"LogUniform needs bounds a < b, got a={a}, b={b}")
        self.a, self.b = float(a), float(b)
        super().__init__(torch.Size(batch_shape), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(math.exp(self.a), math.exp(self.b))

    @property
    def mean(self):
        return torch.full(self.batch_shape, (math.exp(self.b) - math.exp(self.a)) / (self.b - self.a))

    @property
    def variance(self):
        w = self.b - self.a
        m = (math.exp(self.b) - math.exp(self.a)) / w
        return torch.full(self.batch_shape, (math.exp(2 * self.b) - math.exp(2 * self.a)) / (2 * w) - m * m)

    def rsample(self, sample_shape=torch.Size()):
        u = torch.rand(self._extended_shape(sample_shape))
        return torch.exp(self.a + (self.b - self.a) * u)

    def log_prob(self, value):
        x = torch.log(value)
        lp = -math.log(self.b - self.a) - x
        inside = (x >= self.a) & (x <= self.b)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


@register_kl(TruncatedLogNormal, LogUniform)
def kl_truncated_lognormal_loguniform(q: TruncatedLogNormal, p: LogUniform) -> torch.Tensor:
    """KL(q || p) = log(b - a) - H[q(x)] (docs/maths.md section 1; invariant under theta = e^x).

    Finite only when q's bounds lie within p's; otherwise +inf.
    """
    if q.a < p.a or q.b > p.b:
        return torch.full_like(q.loc, math.inf)
    if (q.a, q.b) == (p.a, p.b):
        return kl_log_uniform(q.loc, q.scale, q.a, q.b).to(q.loc.dtype)
    kl = math.log(p.b - p.a) - q.log_space_entropy()
    return kl.to(q.loc.dtype)
