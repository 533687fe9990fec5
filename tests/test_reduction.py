"""Independent-reference tests of the BMR log-evidence changes dF_N (BMRS_N) and dF_U (BMRS_U).

References (no code shared with ``bayesprune``):

* ``mp_dfn`` / ``mp_dfu``: docs/maths.md section 2 closed forms (product of Gaussians; posterior mass of
  [a', b']) with mpmath at 80 digits, masses as plain differences of ``erfc``;
* ``quad_dfn`` / ``quad_dfu``: ``dF = log E_q[p~/p]`` integrated numerically with scipy ``quad``,
  every integral of ``exp(concave quadratic)`` taken in offset coordinates about the point of
  [a, b] where its exponent peaks, with the exponent's offsets written as exact products and
  the interval split at ``+-L 2^k`` (``L`` the peak width); the large constant parts of the three
  log-integrals are all <= 0 (no cancellation), so quad is a valid double-precision reference;
* ``mpquad_dfn``: the same integral with ``mpmath.quad`` at 60 digits, for extreme points;
* the paper's Eq. 8 (poster form) in float64 at moderate s, and the Savage-Dickey limit.
"""

from __future__ import annotations

import functools
import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import special

from bayesprune.reduction import FLOAT32_MANTISSA_LOG, delta_f_normal, delta_f_uniform
from quadrature import mp_mass, quad_split  # tests/quadrature.py

A, B = -20.0, 0.0
MUS = sorted(set(np.linspace(A - 5, B + 5, 13).tolist() + [A - 1e-3, A + 1e-3, B - 1e-3, B + 1e-3, -19.5]
                 + [FLOAT32_MANTISSA_LOG, -4 * math.log(2), -8 * math.log(2)]))
LOG_SIGMAS = [-20.0, -12.0, -8.0, -5.0, -3.0, -1.0, 0.0, 2.0, 5.0]
_rng = np.random.default_rng(7)
RANDOM = list(zip(_rng.uniform(A - 5, B + 5, 30).tolist(), np.exp(_rng.uniform(-20, 5, 30)).tolist()))
POINTS = [(mu, math.exp(ls)) for mu in MUS for ls in LOG_SIGMAS] + RANDOM
SPIKES = [1e-6, 0.1]
PRECISIONS = [4, 8]
RTOL = 1e-6
# dF crosses 0 (that is where the pruning decision flips); there a relative error means nothing
# and an absolute 1e-12 on an O(1)-scaled log evidence is far below any decision's resolution.
TINY_ABS = 1e-12


def _close(got, ref, rtol=RTOL, atol=TINY_ABS):
    return abs(got - ref) <= rtol * abs(ref) + atol


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def mp_dfn(mu, sigma, s=1e-6, m=A, a=A, b=B):
    with mp.workdps(80):
        mu, sg, s, m = mp.mpf(mu), mp.mpf(sigma), mp.mpf(s), mp.mpf(m)
        tot = sg**2 + s**2
        sq, mq = sg * s / mp.sqrt(tot), (mu * s**2 + m * sg**2) / tot
        z = mp_mass((a - mu) / sg, (b - mu) / sg)
        zq = mp_mass((a - mq) / sq, (b - mq) / sq)
        zp = mp_mass((a - m) / s, (b - m) / s)
        return float(mp.log(b - a) + mp.log(zq) - mp.log(z) - mp.log(zp) - (mu - m) ** 2 / (2 * tot) - mp.log(2 * mp.pi * tot) / 2)


@functools.lru_cache(maxsize=None)
def mp_dfu(mu, sigma, precision, a=A, b=B):
    with mp.workdps(80):
        mu, sg = mp.mpf(mu), mp.mpf(sigma)
        a1, b1 = mp.mpf(FLOAT32_MANTISSA_LOG), mp.mpf(-precision * math.log(2))
        q = mp_mass((a1 - mu) / sg, (b1 - mu) / sg) / mp_mass((a - mu) / sg, (b - mu) / sg)
        return float(mp.log(q) - mp.log((b1 - a1) / (b - a)))


def _log_int_quad(dexp, lo, hi, scale):
    """log int_lo^hi exp(dexp(y)) dy for lo <= 0 <= hi, dexp concave with dexp(0) = 0 its max
    (up to rounding).  Returns (value, relative error estimate)."""
    total, err = quad_split(lambda y: math.exp(dexp(y)), lo, hi, scale, dexp)
    return math.log(total), err / total


def _gauss_log_int(mu, sigma, lo, hi):
    """log int_lo^hi exp(-(x-mu)^2/(2 sigma^2)) dx = -(p-mu)^2/(2 sigma^2) + log int exp(g(y))."""
    p = min(max(mu, lo), hi)
    dist = abs(p - mu)
    scale = sigma if dist <= sigma else sigma * sigma / dist
    li, rel = _log_int_quad(lambda y: -y * (y + 2 * (p - mu)) / (2 * sigma * sigma), lo - p, hi - p, scale)
    return p, li, rel


@functools.lru_cache(maxsize=None)
def quad_dfn(mu, sigma, s=1e-6, m=A, a=A, b=B):
    """log E_q[p~/p] = log((b-a) int q(x) N(x; m, s^2)/Zp~ dx) by quad, or None if unreliable."""
    p, log_i, e1 = _gauss_log_int(mu, sigma, a, b)  # posterior normaliser
    pm, log_ip, e2 = _gauss_log_int(m, s, a, b)  # reduced-prior normaliser
    tot = sigma * sigma + s * s
    mq = (mu * s * s + m * sigma * sigma) / tot
    sq = sigma * s / math.sqrt(tot)
    p2 = min(max(mq, a), b)
    dist = abs(p2 - mq)
    scale = sq if dist <= sq else sq * sq / dist
    vs, vm = 2 * sigma * sigma, 2 * s * s

    def dexp(y):  # h(p2 + y) - h(p2), h(x) = -(x-mu)^2/(2 sigma^2) - (x-m)^2/(2 s^2)
        return -y * (y + 2 * (p2 - mu)) / vs - y * (y + 2 * (p2 - m)) / vm

    log_j, e3 = _log_int_quad(dexp, a - p2, b - p2, scale)
    if max(e1, e2, e3) > 1e-10:
        return None
    # h(p2) + (p - mu)^2/(2 sigma^2) + (pm - m)^2/(2 s^2): each piece <= 0, no cancellation
    const = -(p2 - p) * (p2 + p - 2 * mu) / vs - (p2 - m) ** 2 / vm + (pm - m) * (pm + m - 2 * m) / vm
    return math.log(b - a) + const + log_j - log_i - log_ip


@functools.lru_cache(maxsize=None)
def quad_dfu(mu, sigma, precision, a=A, b=B):
    a1, b1 = FLOAT32_MANTISSA_LOG, -precision * math.log(2)
    p, log_i, e1 = _gauss_log_int(mu, sigma, a, b)
    p1, log_i1, e2 = _gauss_log_int(mu, sigma, a1, b1)
    if max(e1, e2) > 1e-10:
        return None
    log_q = -(p1 - p) * (p1 + p - 2 * mu) / (2 * sigma * sigma) + log_i1 - log_i
    return log_q - math.log((b1 - a1) / (b - a))


def mpquad_dfn(mu, sigma, s=1e-6, m=A, a=A, b=B):
    """log((b-a) int q(x) p~(x) dx) with mpmath.quad at 60 digits (densities written out)."""
    with mp.workdps(60):
        mu, sg, s, m = mp.mpf(mu), mp.mpf(sigma), mp.mpf(s), mp.mpf(m)

        def log_int(logf, c, w):
            p = min(max(c, mp.mpf(a)), mp.mpf(b))
            dist = abs(p - c)
            scale = w if dist <= w else w * w / dist

            def pts(end):
                out, k = [p], 0
                while scale * 2**k < abs(end - p) and k < 300:
                    out.append(p + mp.sign(end - p) * scale * 2**k)
                    k += 1
                return out + [end]

            peak = logf(p)
            f = lambda x: mp.exp(logf(x) - peak)  # noqa: E731
            return peak + mp.log(mp.quad(f, pts(mp.mpf(b))) - mp.quad(f, pts(mp.mpf(a))))

        log_z = log_int(lambda x: -(x - mu) ** 2 / (2 * sg**2), mu, sg) - mp.log(sg * mp.sqrt(2 * mp.pi))
        log_zp = log_int(lambda x: -(x - m) ** 2 / (2 * s**2), m, s) - mp.log(s * mp.sqrt(2 * mp.pi))

        def log_integrand(x):  # log q(x) + log p~(x) - log p(x)
            lq = -(x - mu) ** 2 / (2 * sg**2) - mp.log(sg * mp.sqrt(2 * mp.pi)) - log_z
            lpt = -(x - m) ** 2 / (2 * s**2) - mp.log(s * mp.sqrt(2 * mp.pi)) - log_zp
            return lq + lpt + mp.log(b - a)

        tot = sg**2 + s**2
        mq, sq = (mu * s**2 + m * sg**2) / tot, sg * s / mp.sqrt(tot)
        return float(log_int(log_integrand, mq, sq))


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------
def test_references_agree_with_each_other():
    used = 0
    for mu, sigma in POINTS:
        for s in SPIKES:
            qr = quad_dfn(mu, sigma, s)
            if qr is not None:
                used += 1
                assert _close(qr, mp_dfn(mu, sigma, s), 1e-9), (mu, sigma, s, qr, mp_dfn(mu, sigma, s))
        for prec in PRECISIONS:
            qr = quad_dfu(mu, sigma, prec)
            if qr is not None:
                used += 1
                assert _close(qr, mp_dfu(mu, sigma, prec), 1e-9), (mu, sigma, prec)
    assert used >= 0.9 * 4 * len(POINTS)


def _check(name, got, refs_of_point):
    worst = 0.0
    for i, (mu, sigma) in enumerate(POINTS):
        g = float(got[i])
        assert math.isfinite(g), (name, mu, sigma, g)
        for ref in refs_of_point(mu, sigma):
            if ref is None:
                continue
            assert _close(g, ref), (name, mu, sigma, g, ref)
            worst = max(worst, abs(g - ref) / max(abs(ref), 1e-300))
    print(f"max relative error of {name}: {worst:.3g}")


@pytest.mark.parametrize("s", SPIKES)
def test_delta_f_normal_matches_references(s):
    mu = torch.tensor([p[0] for p in POINTS], dtype=torch.float64)
    sigma = torch.tensor([p[1] for p in POINTS], dtype=torch.float64)
    got = delta_f_normal(mu, sigma, A, B, s=s)
    assert got.dtype == torch.float64 and got.shape == mu.shape
    _check(f"dF_N(s={s})", got.numpy(), lambda m_, s_: (mp_dfn(m_, s_, s), quad_dfn(m_, s_, s)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_delta_f_uniform_matches_references(precision):
    mu = torch.tensor([p[0] for p in POINTS], dtype=torch.float64)
    sigma = torch.tensor([p[1] for p in POINTS], dtype=torch.float64)
    got = delta_f_uniform(mu, sigma, precision, A, B)
    assert got.dtype == torch.float64 and got.shape == mu.shape
    _check(f"dF_U-{precision}", got.numpy(), lambda m_, s_: (mp_dfu(m_, s_, precision), quad_dfu(m_, s_, precision)))


def test_python_floats_are_not_rounded_to_float32():
    """Regression: torch.as_tensor(python float) is float32; mu = a + 1e-3 lost 1e-6 of it."""
    for mu, sigma in [(A + 1e-3, math.exp(-12)), (A - 1e-3, math.exp(-8)), (FLOAT32_MANTISSA_LOG, math.exp(-20))]:
        t = delta_f_normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
        assert delta_f_normal(mu, sigma).item() == t.item()
        assert _close(t.item(), mp_dfn(mu, sigma))
        u = delta_f_uniform(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64), 8)
        assert delta_f_uniform(mu, sigma, 8).item() == u.item()
        assert _close(u.item(), mp_dfu(mu, sigma, 8))


@pytest.mark.parametrize(
    "mu,sigma",
    [(A - 5, math.exp(-20)), (A + 1e-3, math.exp(-20)), (B + 5, math.exp(-20)), (A + 1e-3, math.exp(-12)),
     (-19.5, 0.3), (B + 5, math.exp(5)), (B + 1e-3, math.exp(5))],
)
def test_delta_f_normal_against_mpmath_integral(mu, sigma):
    ref = mpquad_dfn(mu, sigma)
    assert _close(ref, mp_dfn(mu, sigma), 1e-12)
    assert _close(delta_f_normal(mu, sigma).item(), ref), (delta_f_normal(mu, sigma).item(), ref)


def test_delta_f_normal_other_spike_location():
    """m inside (a, b) with a moderate spike: closed form and quad."""
    for mu, sigma in [(-10.0, 1.0), (-12.0, 0.1), (-3.0, 5.0), (-25.0, 2.0), (4.0, 0.5)]:
        got = delta_f_normal(mu, sigma, m=-10.0, s=0.5).item()
        assert _close(got, mp_dfn(mu, sigma, 0.5, -10.0))
        assert _close(got, quad_dfn(mu, sigma, 0.5, -10.0))


def _eq8(mu, sigma, s, m=A, a=A, b=B):
    """The paper's Eq. 8 (poster form), float64 with scipy's ndtr."""
    tot = sigma**2 + s**2
    sq2 = sigma**2 * s**2 / tot
    mq = sq2 * (mu / sigma**2 + m / s**2)
    sq = math.sqrt(sq2)

    def mass(c, w):
        return special.ndtr((b - c) / w) - special.ndtr((a - c) / w)

    zq, zqt, zpt = mass(mu, sigma), mass(mq, sq), mass(m, s)
    return (0.5 * math.log(sq2 / (2 * math.pi * s**2 * sigma**2)) + math.log(zqt * (b - a) / (zpt * zq))
            - 0.5 * (mu**2 / sigma**2 + m**2 / s**2 - mq**2 / sq2))


@pytest.mark.parametrize("mu", [-21.0, -20.0, -19.5, -18.0, -15.0, -10.0, -3.0, 0.0, 1.0])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_delta_f_normal_equals_paper_eq8(mu, sigma):
    got = delta_f_normal(mu, sigma, s=0.5).item()
    ref = _eq8(mu, sigma, 0.5)
    # Eq. 8 cancels terms of size m^2/s^2 = 1600 in doubles: ~1e-12 absolute
    assert _close(got, ref, 1e-6, 1e-10), (got, ref)


@pytest.mark.parametrize("mu", [-25.0, -20.5, -20.0, -19.5, -19.0, -15.0, -5.0, 1.0])
@pytest.mark.parametrize("sigma", [0.1, 1.0, 3.0])
def test_savage_dickey_limit(mu, sigma):
    """s -> 0: dF_N -> log((b - a) q(a)), q the density of x at the spike."""
    with mp.workdps(50):
        al, be = (A - mp.mpf(mu)) / sigma, (B - mp.mpf(mu)) / sigma
        sd = float(mp.log((B - A) * mp.npdf(al) / (sigma * mp_mass(al, be))))
    errs = [abs(delta_f_normal(mu, sigma, s=s).item() - sd) for s in (1e-3, 1e-5, 1e-7, 1e-9)]
    assert errs[-1] <= 1e-6 * max(1.0, abs(sd)), (errs, sd)
    for e_big, e_small in zip(errs, errs[1:]):  # converges (roughly linearly in s)
        assert e_small <= e_big + 1e-9


# ---------------------------------------------------------------------------------------------
# finiteness, dtypes, gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_on_grid(dtype):
    mu = torch.tensor([p[0] for p in POINTS], dtype=dtype, requires_grad=True)
    log_sigma = torch.tensor([math.log(p[1]) for p in POINTS], dtype=dtype, requires_grad=True)
    for name, fn in {
        "dF_N": lambda m, s: delta_f_normal(m, s),
        "dF_N(s=0.1)": lambda m, s: delta_f_normal(m, s, s=0.1),
        "dF_U-4": lambda m, s: delta_f_uniform(m, s, 4),
        "dF_U-8": lambda m, s: delta_f_uniform(m, s, 8),
    }.items():
        out = fn(mu, log_sigma.exp())
        assert out.dtype == torch.float64
        assert torch.isfinite(out).all(), name
        gm, gs = torch.autograd.grad(out.sum(), [mu, log_sigma])
        assert torch.isfinite(gm).all() and torch.isfinite(gs).all(), (name, dtype)
    if dtype == torch.float32:
        # float32 parameters: the value is dF at the float32-rounded parameters
        for i in range(0, len(POINTS), 7):
            m32, s32 = float(mu[i].detach()), float(log_sigma[i].detach().exp())
            assert _close(delta_f_normal(mu[i].detach(), log_sigma[i].detach().exp()).item(), mp_dfn(m32, s32))


@pytest.mark.parametrize("mu,log_sigma", [(-10.0, 0.0), (-19.5, math.log(0.3)), (-21.0, -0.5), (1.0, 1.0)])
def test_gradcheck(mu, log_sigma):
    m = torch.tensor([mu], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([log_sigma], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a_, b_: delta_f_normal(a_, b_.exp(), s=0.1), (m, ls))
    torch.autograd.gradcheck(lambda a_, b_: delta_f_uniform(a_, b_.exp(), 4), (m, ls))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError):
        delta_f_normal(0.0, 1.0, a=0.0, b=0.0)
    with pytest.raises(ValueError):
        delta_f_normal(0.0, 1.0, a=1.0, b=-1.0)
    with pytest.raises(ValueError):
        delta_f_normal(0.0, 1.0, s=0.0)
    with pytest.raises(ValueError):
        delta_f_uniform(0.0, 1.0, 4, a=0.0, b=-1.0)
    for p in (0, -1, -0.5):
        with pytest.raises(ValueError):
            delta_f_uniform(0.0, 1.0, p)
