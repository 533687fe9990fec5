"""Independent-reference tests of the truncated log-normal posterior and the log-uniform prior.

References (none of them shares code or algorithm with ``bayesprune.distributions``):

* ``mp_ref``: docs/maths.md section 1 closed forms evaluated with mpmath at 80 digits, masses as plain
  differences of ``erfc``/``ncdf`` (no log-space tricks; 80 digits absorb the cancellation of
  ``E[theta^2] - E[theta]^2`` and of the entropy's ``log Z`` against ``alpha phi(alpha)/2Z``);
* ``quad_ref``: scipy ``quad`` of the truncated-normal density, in offset coordinates
  ``y = x - p`` (``p`` the point of [a, b] nearest to mu) with the exponent written as
  ``-y (y + 2 (p - mu)) / (2 sigma^2)`` (exact in doubles) and the interval split geometrically
  at ``p +- L 2^k``, ``L = min(sigma, sigma^2 / dist(mu, [a, b]))`` (the width of the peak), so
  quad sees the peak at every scale; the variance as ``E[(theta - E theta)^2]`` through
  ``expm1`` (no cancellation);
* ``mpquad_ref``: the same integrals with ``mpmath.quad`` at 60 digits, for the extreme points.
"""

from __future__ import annotations

import functools
import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import integrate
from torch.distributions import kl_divergence

from bayesprune.distributions import LogUniform, TruncatedLogNormal, sample_log_theta
from quadrature import mp_mass, quad_split  # tests/quadrature.py

A, B = -20.0, 0.0
MUS = sorted(set(np.linspace(A - 5, B + 5, 13).tolist() + [A - 1e-3, A + 1e-3, B - 1e-3, B + 1e-3, -19.5]))
LOG_SIGMAS = [-20.0, -12.0, -8.0, -5.0, -3.0, -1.0, 0.0, 2.0, 5.0]
_rng = np.random.default_rng(20240601)
RANDOM = list(zip(_rng.uniform(A - 5, B + 5, 30).tolist(), np.exp(_rng.uniform(-20, 5, 30)).tolist()))
POINTS = [(mu, math.exp(ls)) for mu in MUS for ls in LOG_SIGMAS] + RANDOM
QUANTITIES = ("mean", "var", "snr", "kl")
RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def _mp_log_mass(l, h):
    if l > 0 or h < 0:
        return mp.log(mp_mass(l, h))
    s2 = mp.sqrt(2)
    return mp.log1p(-(mp.erfc(-l / s2) + mp.erfc(h / s2)) / 2)  # Z ~ 1: keep log Z's digits


@functools.lru_cache(maxsize=None)
def mp_ref(mu: float, sigma: float, a: float = A, b: float = B) -> dict:
    with mp.workdps(80):
        mu, s = mp.mpf(mu), mp.mpf(sigma)
        al, be = (a - mu) / s, (b - mu) / s
        z = mp_mass(al, be)
        e1 = mp.exp(mu + s**2 / 2) * mp_mass(al - s, be - s) / z
        e2 = mp.exp(2 * mu + 2 * s**2) * mp_mass(al - 2 * s, be - 2 * s) / z
        var = e2 - e1**2
        ent = mp.log(s * mp.sqrt(2 * mp.pi * mp.e) * z) + (al * mp.npdf(al) - be * mp.npdf(be)) / (2 * z)
        return {
            "mean": float(e1),
            "var": float(var),
            "snr": float(e1 / mp.sqrt(var)),
            "kl": float(mp.log(b - a) - ent),
            "logz": float(_mp_log_mass(al, be)),
        }


def _peak(mu, sigma, a=A, b=B):
    p = min(max(mu, a), b)
    dist = abs(p - mu)
    return p, (sigma if dist <= sigma else sigma * sigma / dist)


@functools.lru_cache(maxsize=None)
def quad_ref(mu: float, sigma: float, a: float = A, b: float = B):
    """scipy quad reference, or None where quad reports an error above 1e-10 relative."""
    p, scale = _peak(mu, sigma, a, b)
    c2 = 2 * (p - mu)
    inv = 1 / (2 * sigma * sigma)

    def g(y):
        return -y * (y + c2) * inv

    lo, hi = a - p, b - p
    i0, e0 = quad_split(lambda y: math.exp(g(y)), lo, hi, scale, g)
    c, ec = quad_split(lambda y: math.expm1(y) * math.exp(g(y)), lo, hi, scale, g)
    c /= i0
    v, ev = quad_split(lambda y: (math.expm1(y) - c) ** 2 * math.exp(g(y)), lo, hi, scale, g)
    eg, eeg = quad_split(lambda y: g(y) * math.exp(g(y)), lo, hi, scale, g)
    # c = E[e^y] - 1 enters the mean as e^p (1 + c): its error counts relative to 1 + c
    if max(e0 / i0, ec / (i0 * (1 + c)), ev / v, eeg / abs(eg)) > 1e-10:
        return None
    mean = math.exp(p) * (1 + c)
    var = math.exp(2 * p) * v / i0
    return {
        "mean": mean,
        "var": var,
        "snr": mean / math.sqrt(var),
        "kl": math.log(b - a) + eg / i0 - math.log(i0),
    }


def mpquad_ref(mu: float, sigma: float, a: float = A, b: float = B) -> dict:
    """mpmath.quad (60 digits; 40 leave the tiny variances at ~5e-10) of the same offset-coordinate integrals; variance as
    E[(theta - E theta)^2]."""
    with mp.workdps(60):
        p, scale = _peak(mu, sigma, a, b)
        p, scale, mu_, s = mp.mpf(p), mp.mpf(scale), mp.mpf(mu), mp.mpf(sigma)

        def g(y):
            return -y * (y + 2 * (p - mu_)) / (2 * s * s)

        def pts(end):
            sgn = 1 if end > 0 else -1
            out, k = [mp.mpf(0)], 0
            while scale * 2**k < abs(end) and k < 200:
                out.append(sgn * scale * 2**k)
                k += 1
            return out + [mp.mpf(end)]

        def integ(f):
            return mp.quad(f, pts(b - p)) - mp.quad(f, pts(a - p))

        i0 = integ(lambda y: mp.exp(g(y)))
        c = integ(lambda y: mp.expm1(y) * mp.exp(g(y))) / i0
        mean = mp.exp(p) * (1 + c)
        # theta - E theta = e^p (expm1(y) - c): no cancellation of e^p against E theta
        var = mp.exp(2 * p) * integ(lambda y: (mp.expm1(y) - c) ** 2 * mp.exp(g(y))) / i0
        ent = -integ(lambda y: g(y) * mp.exp(g(y))) / i0 + mp.log(i0)
        return {"mean": float(mean), "var": float(var), "snr": float(mean / mp.sqrt(var)), "kl": float(mp.log(b - a) - ent)}


def ours(points, dtype):
    mu = torch.tensor([p[0] for p in points], dtype=dtype)
    sigma = torch.tensor([p[1] for p in points], dtype=dtype)
    q = TruncatedLogNormal(mu, sigma, A, B)
    out = {
        "mean": q.mean,
        "var": q.variance,
        "snr": q.snr,
        "kl": kl_divergence(q, LogUniform(A, B)),
        "logz": q.log_normalizer(),
    }
    for k, v in out.items():
        assert v.dtype == dtype, k
    return {k: v.double().numpy() for k, v in out.items()}


def _relerr(got, ref):
    return abs(got - ref) / abs(ref) if ref != 0 else abs(got)


# ---------------------------------------------------------------------------------------------
# accuracy on the grid and on random points
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours64():
    return ours(POINTS, torch.float64)


def test_references_agree_with_each_other():
    """The two independent references (80-digit closed forms, scipy quad) agree to 1e-9, so a
    failure below is ours, not theirs; quad must be usable on most of the grid."""
    used = 0
    for mu, sigma in POINTS:
        qr = quad_ref(mu, sigma)
        if qr is None:
            continue
        used += 1
        mr = mp_ref(mu, sigma)
        for k in QUANTITIES:
            # KL -> 0 for very wide sigma (q nearly uniform); quad's KL is a difference of O(1)
            # terms there, good to ~1e-15 absolute only
            tiny_abs = 1e-13 if k == "kl" else 0.0
            assert abs(qr[k] - mr[k]) <= 1e-9 * abs(mr[k]) + tiny_abs, (k, mu, sigma, qr[k], mr[k])
    assert used >= 0.9 * len(POINTS)


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_float64_matches_references(ours64, quantity):
    worst = 0.0
    for i, (mu, sigma) in enumerate(POINTS):
        got = float(ours64[quantity][i])
        assert math.isfinite(got), (quantity, mu, sigma, got)
        refs = [mp_ref(mu, sigma)[quantity]]
        qr = quad_ref(mu, sigma)
        if qr is not None:
            refs.append(qr[quantity])
        for ref in refs:
            # KL is the only one that can cross 0 (at sigma ~ (b - a)/sqrt(2 pi e)); an absolute
            # 1e-12 there is far below any use of it.  E, Var, SNR are strictly positive.
            tiny_abs = 1e-12 if quantity == "kl" else 0.0
            assert abs(got - ref) <= RTOL * abs(ref) + tiny_abs, (quantity, mu, sigma, got, ref)
            worst = max(worst, _relerr(got, ref))
    print(f"max relative error of {quantity} (float64): {worst:.3g}")


def test_log_normalizer_matches_mpmath(ours64):
    for i, (mu, sigma) in enumerate(POINTS):
        ref = mp_ref(mu, sigma)["logz"]
        got = float(ours64["logz"][i])
        # log Z is exactly representable as ~0 only through log1p; allow 1e-300 absolute
        assert abs(got - ref) <= RTOL * abs(ref) + 1e-300, (mu, sigma, got, ref)


def test_float32_finite_and_accurate():
    """float32 parameters: every quantity finite; against the reference at the float32-rounded
    parameters the error is that of the final cast, except for a variance below float32's range,
    which may only become a subnormal or 0."""
    pts32 = [(float(np.float32(mu)), float(np.float32(s))) for mu, s in POINTS]
    got = ours(pts32, torch.float32)
    tiny32 = float(torch.finfo(torch.float32).tiny)
    sub32 = 2.0**-149
    for quantity in QUANTITIES:
        for i, (mu, sigma) in enumerate(pts32):
            g = float(got[quantity][i])
            assert math.isfinite(g), (quantity, mu, sigma, g)
            ref = mp_ref(mu, sigma)[quantity]
            if quantity == "var" and ref < tiny32:
                # underflow allowed, but only where the true value is below float32's normal range
                assert 0.0 <= g and abs(g - ref) <= sub32, (mu, sigma, g, ref)
                continue
            assert abs(g - ref) <= RTOL * abs(ref) + (1e-6 if quantity == "kl" else 0.0), (quantity, mu, sigma, g, ref)
            if quantity != "kl":
                assert g > 0


@pytest.mark.parametrize(
    "mu,sigma",
    [(A - 5, math.exp(-20)), (A - 1e-3, math.exp(-20)), (B + 5, math.exp(-20)), (A - 5, math.exp(-12)),
     (A + 1e-3, math.exp(-20)), (B + 5, math.exp(5)), (-19.5, 0.3)],
)
def test_extreme_points_against_mpmath_quadrature(mu, sigma):
    """Where double-precision closed forms are useless, numerical integration at 40 digits."""
    ref = mpquad_ref(mu, sigma)
    got = ours([(mu, sigma)], torch.float64)
    for k in QUANTITIES:
        tiny_abs = 1e-12 if k == "kl" else 0.0  # see test_float64_matches_references
        assert abs(got[k][0] - ref[k]) <= RTOL * abs(ref[k]) + tiny_abs, (k, got[k][0], ref[k])
        assert _relerr(ref[k], mp_ref(mu, sigma)[k]) < 1e-12


def test_math_md_point_near_lower_bound():
    """docs/maths.md: the reference implementation gives E[theta] < 0 and SNR NaN at (-19.5, 0.3)."""
    for dtype in (torch.float64, torch.float32):
        q = TruncatedLogNormal(torch.tensor(-19.5, dtype=dtype), torch.tensor(0.3, dtype=dtype))
        mu32, s32 = (float(np.float32(-19.5)), float(np.float32(0.3))) if dtype == torch.float32 else (-19.5, 0.3)
        ref = mp_ref(mu32, s32)
        assert abs(ref["mean"] - 3.64e-9) < 0.005e-9 and abs(ref["snr"] - 3.49) < 0.005
        assert q.mean.item() > 0 and abs(q.mean.item() - ref["mean"]) <= RTOL * ref["mean"]
        assert abs(q.snr.item() - ref["snr"]) <= RTOL * ref["snr"]


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_on_grid(dtype):
    mu = torch.tensor([p[0] for p in POINTS], dtype=dtype, requires_grad=True)
    log_sigma = torch.tensor([math.log(p[1]) for p in POINTS], dtype=dtype, requires_grad=True)
    for name, fn in {
        "mean": lambda q: q.mean,
        "variance": lambda q: q.variance,
        "snr": lambda q: q.snr,
        "kl": lambda q: kl_divergence(q, LogUniform(A, B)),
        "log_normalizer": lambda q: q.log_normalizer(),
    }.items():
        q = TruncatedLogNormal(mu, log_sigma.exp(), A, B)
        gm, gs = torch.autograd.grad(fn(q).sum(), [mu, log_sigma])
        assert torch.isfinite(gm).all() and torch.isfinite(gs).all(), (name, dtype)


@pytest.mark.parametrize("mu,log_sigma", [(-10.0, 0.0), (-19.5, math.log(0.3)), (-1.0, -1.0), (-21.0, 0.5), (1.0, 1.5)])
def test_gradcheck_mean_and_kl(mu, log_sigma):
    mu = torch.tensor([mu], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([log_sigma], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda m, s: TruncatedLogNormal(m, s.exp()).mean, (mu, ls))
    torch.autograd.gradcheck(lambda m, s: kl_divergence(TruncatedLogNormal(m, s.exp()), LogUniform()), (mu, ls))
    torch.autograd.gradcheck(lambda m, s: TruncatedLogNormal(m, s.exp()).snr, (mu, ls))


def _mp_kl(mu, log_sigma, a=A, b=B):
    s = mp.exp(log_sigma)
    al, be = (a - mu) / s, (b - mu) / s
    z = mp_mass(al, be)
    ent = mp.log(s * mp.sqrt(2 * mp.pi * mp.e) * z) + (al * mp.npdf(al) - be * mp.npdf(be)) / (2 * z)
    return mp.log(b - a) - ent


def test_kl_gradient_matches_mpmath_derivative_on_grid():
    """The analytic KL gradient (distributions._LogSpaceEntropy) against mpmath's numerical
    derivative of the 80-digit closed form, in (mu, log sigma), on the whole grid and the random
    points, tails and bounds included: relative error <= 1e-6 (absolute 1e-12 where the
    gradient vanishes)."""
    mu = torch.tensor([p[0] for p in POINTS], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([math.log(p[1]) for p in POINTS], dtype=torch.float64, requires_grad=True)
    kl = kl_divergence(TruncatedLogNormal(mu, ls.exp()), LogUniform(A, B))
    gm, gs = torch.autograd.grad(kl.sum(), [mu, ls])
    bad = []
    with mp.workdps(80):
        for i, (m, sig) in enumerate(POINTS):
            m_, l_ = mp.mpf(m), mp.log(mp.mpf(sig))
            rm = float(mp.diff(lambda t: _mp_kl(t, l_), m_))
            rs = float(mp.diff(lambda t: _mp_kl(m_, t), l_))
            for got, ref, what in ((gm[i].item(), rm, "mu"), (gs[i].item(), rs, "log_sigma")):
                if not abs(got - ref) <= 1e-6 * abs(ref) + 1e-12:
                    bad.append((m, sig, what, got, ref))
    assert not bad, bad[:5]


def test_gradient_of_mean_matches_mpmath_derivative_near_bound():
    """d E[theta] / d mu and / d sigma at the docs/maths.md point against mpmath's numerical
    derivative of the 80-digit closed form."""
    mu = torch.tensor(-19.5, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    gm, gs = torch.autograd.grad(TruncatedLogNormal(mu, sigma).mean, [mu, sigma])
    with mp.workdps(40):
        def e1(m, s):
            al, be = (A - m) / s, (B - m) / s
            return mp.exp(m + s**2 / 2) * mp_mass(al - s, be - s) / mp_mass(al, be)

        rm = mp.diff(lambda m: e1(m, mp.mpf("0.3")), mp.mpf("-19.5"))
        rs = mp.diff(lambda s: e1(mp.mpf("-19.5"), s), mp.mpf("0.3"))
    assert _relerr(gm.item(), float(rm)) < 1e-6 and _relerr(gs.item(), float(rs)) < 1e-6


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mu,sigma",
    [(-10.0, 1.0), (-19.5, 0.3), (-20.0, 1e-3), (-22.0, 1.0), (3.0, 2.0), (-10.0, math.exp(3.0)), (-25.0, math.exp(5.0)), (-1.0, 0.5)],
)
def test_rsample_mean_matches_expectation(mu, sigma):
    torch.manual_seed(0)
    n = 200_000
    q = TruncatedLogNormal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    th = q.rsample((n,))
    assert th.shape == (n,) and th.dtype == torch.float64
    assert torch.isfinite(th).all()
    assert (th >= math.exp(A) * (1 - 1e-12)).all() and (th <= math.exp(B) * (1 + 1e-12)).all()
    ref = mp_ref(mu, sigma)
    se = math.sqrt(ref["var"] / n)
    assert abs(th.mean().item() - ref["mean"]) <= 4 * se, (th.mean().item(), ref["mean"], se)


def test_rsample_pathwise_gradient_unbiased():
    """Per-draw gradients of theta w.r.t. (mu, sigma): their mean is d E[theta] within 4 SE."""
    torch.manual_seed(1)
    n = 100_000
    mu = torch.full((n,), -1.0, dtype=torch.float64, requires_grad=True)
    sigma = torch.full((n,), 0.5, dtype=torch.float64, requires_grad=True)
    th = TruncatedLogNormal(mu, sigma).rsample()
    gm, gs = torch.autograd.grad(th.sum(), [mu, sigma])
    assert torch.isfinite(gm).all() and torch.isfinite(gs).all()
    m0 = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    s0 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    em, es = torch.autograd.grad(TruncatedLogNormal(m0, s0).mean, [m0, s0])
    for g, e in ((gm, em), (gs, es)):
        se = g.std().item() / math.sqrt(n)
        assert abs(g.mean().item() - e.item()) <= 4 * se, (g.mean().item(), e.item(), se)
    # and the gradient of samples.mean() is the same estimator
    m1 = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    s1 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(TruncatedLogNormal(m1, s1).rsample((n,)).mean(), [m1, s1])
    for g, e, full in zip(g1, (em, es), (gm, gs)):
        assert abs(g.item() - e.item()) <= 5 * full.std().item() / math.sqrt(n)


@pytest.mark.parametrize("mu,log_sigma", [(A - 5, -20.0), (B + 5, 5.0), (A, -20.0), (B + 5, -20.0), (A - 5, 5.0)])
def test_float32_sampling_at_extremes(mu, log_sigma):
    torch.manual_seed(2)
    m = torch.tensor(mu, dtype=torch.float32, requires_grad=True)
    ls = torch.tensor(log_sigma, dtype=torch.float32, requires_grad=True)
    th = TruncatedLogNormal(m, ls.exp()).rsample((10_000,))
    assert th.dtype == torch.float32 and torch.isfinite(th).all()
    lo, hi = np.float32(math.exp(A)), np.float32(math.exp(B))
    assert (th >= lo * (1 - 1e-6)).all() and (th <= hi * (1 + 1e-6)).all()
    gm, gs = torch.autograd.grad(th.mean(), [m, ls])
    assert torch.isfinite(gm) and torch.isfinite(gs)
    u = torch.rand(1000, dtype=torch.float32)
    x = sample_log_theta(m, ls.exp(), u, A, B)
    assert torch.isfinite(x).all() and (x >= A).all() and (x <= B).all()


def test_sample_log_theta_is_the_inverse_cdf():
    """x(u) is the u-quantile of the truncated normal (Phi-differences by mpmath); for mu < a,
    where the interval is mirrored (alpha > 0), the (1-u)-quantile: the convention the fused
    noise backward (cdf = 1 - u when flipped) relies on."""
    u = torch.tensor([1e-6, 0.01, 0.3, 0.5, 0.9, 0.999999], dtype=torch.float64)
    for mu, sigma in [(-10.0, 2.0), (-21.0, 0.5), (2.0, 1.0), (-19.5, 0.3), (5.0, 0.3)]:  # last: log Z ~ -142
        x = sample_log_theta(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64), u, A, B)
        with mp.workdps(50):
            al = (A - mp.mpf(mu)) / sigma
            z = mp_mass(al, (B - mp.mpf(mu)) / sigma)
            for ui, xi in zip(u.tolist(), x.tolist()):
                cdf = mp_mass(al, (mp.mpf(xi) - mu) / sigma) / z
                want = 1 - ui if A - mu > 0 else ui
                assert abs(float(cdf) - want) <= 1e-7 * max(want, 1e-3), (mu, sigma, ui, xi, float(cdf))


def test_sample_log_theta_mixed_batch_equals_each_structure_alone():
    """Structures whose mass underflows (log Z < -80: the log-space Newton path, run only on
    their draws) next to ordinary ones: each column equals the same column sampled alone."""
    g = torch.Generator().manual_seed(4)
    mu = torch.tensor([-10.0, 5.0, -0.2, 0.6, -24.0], dtype=torch.float64)
    sigma = torch.tensor([2.0, 0.3, 0.05, 0.02, 0.3], dtype=torch.float64)  # columns 1, 3, 4 deep
    u = torch.rand(64, 5, generator=g, dtype=torch.float64)
    joint = sample_log_theta(mu, sigma, u, A, B)
    for j in range(5):
        alone = sample_log_theta(mu[j:j + 1], sigma[j:j + 1], u[:, j:j + 1], A, B)
        torch.testing.assert_close(joint[:, j:j + 1], alone, rtol=1e-12, atol=1e-12)  # alone: maybe the fast path
    assert torch.isfinite(joint).all()


# ---------------------------------------------------------------------------------------------
# density and KL by quadrature
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu,sigma", [(-10.0, 1.0), (-19.5, 0.3), (2.0, 3.0), (-22.0, 0.7)])
def test_log_prob_integrates_to_one_and_kl_is_expected_log_ratio(mu, sigma):
    q = TruncatedLogNormal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64), validate_args=False)
    p = LogUniform(A, B, validate_args=False)

    def dens_x(x):  # q's density of x = log theta, via the Jacobian d theta / dx = theta
        th = torch.tensor(math.exp(x), dtype=torch.float64)
        return math.exp(q.log_prob(th).item()) * th.item()

    def kl_integrand(x):
        th = torch.tensor(math.exp(x), dtype=torch.float64)
        lq, lp = q.log_prob(th).item(), p.log_prob(th).item()
        return math.exp(lq) * th.item() * (lq - lp)

    pts = sorted({min(max(mu + k * sigma, A), B) for k in (-3, -1, 0, 1, 3)} - {A, B})
    mass, err = integrate.quad(dens_x, A, B, points=pts or None, epsabs=0, epsrel=1e-12, limit=200)
    assert abs(mass - 1) < 1e-9, mass
    kl, _ = integrate.quad(kl_integrand, A, B, points=pts or None, epsabs=0, epsrel=1e-12, limit=200)
    got = kl_divergence(q, p).item()
    assert abs(got - kl) <= RTOL * abs(kl) + 1e-12, (got, kl)
    # density outside the support
    assert q.log_prob(torch.tensor(math.exp(A - 1), dtype=torch.float64)).item() == -math.inf
    assert p.log_prob(torch.tensor(math.exp(B + 1))).item() == -math.inf


def test_loguniform_moments_and_kl_bounds():
    p = LogUniform(A, B)
    e = integrate.quad(lambda x: math.exp(x) / (B - A), A, B)[0]
    e2 = integrate.quad(lambda x: math.exp(2 * x) / (B - A), A, B)[0]
    assert _relerr(p.mean.item(), e) < 1e-6 and _relerr(p.variance.item(), e2 - e * e) < 1e-6
    # q with bounds outside p's: KL is +inf
    q = TruncatedLogNormal(torch.tensor(-1.0), torch.tensor(1.0), a=-30.0, b=0.0)
    assert kl_divergence(q, p).item() == math.inf


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b", [(0.0, 0.0), (1.0, -1.0)])
def test_bad_bounds_raise(a, b):
    with pytest.raises(ValueError):
        TruncatedLogNormal(torch.tensor(0.0), torch.tensor(1.0), a=a, b=b)
    with pytest.raises(ValueError):
        LogUniform(a, b)


@pytest.mark.parametrize(
    "mu,sigma",
    # inside, near each bound, mirrored (mu < a), above b, wide, a deep tail (log-space path), and
    # far from both bounds (both weights skipped: t^2 - z^2 > 160; -0.5/0.2 skips the lower one only)
    [(-10.0, 1.0), (-19.5, 0.3), (-0.5, 0.2), (-21.0, 0.5), (1.5, 1.0), (-10.0, 20.0), (-24.0, 0.3), (3.0, 0.2),
     (-10.0, 0.05)],
)
def test_draw_theta_implicit_gradient_matches_autograd_through_the_sampler(mu, sigma):
    """The fused draw's backward (implicit reparameterisation, u fixed) equals autograd through
    the explicit inverse-CDF sampler ``exp(sample_log_theta(...)) * mask`` in float64."""
    from bayesprune.distributions import draw_theta

    g = torch.Generator().manual_seed(11)
    u = torch.rand(400, 1, generator=g, dtype=torch.float64)
    w = torch.randn(400, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    grads = []
    for fused in (True, False):
        m = torch.tensor([mu, mu + 0.1, mu], dtype=torch.float64, requires_grad=True)
        s = torch.tensor([sigma, sigma * 1.5, sigma], dtype=torch.float64, requires_grad=True)
        if fused:
            theta = draw_theta(m, s, mask, u, A, B)
        else:
            theta = torch.exp(sample_log_theta(m, s, u, A, B)) * mask
        grads.append(torch.autograd.grad((w * theta).sum(), [m, s]))
    (fm, fs), (am, as_) = grads
    for got, want in ((fm, am), (fs, as_)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
    assert fm[2] == 0 and fs[2] == 0  # a masked structure gets no gradient


@pytest.mark.parametrize("a,b,mu,sigma", [(-math.inf, 0.0, -0.5, 0.3), (-20.0, math.inf, -19.5, 0.3), (-math.inf, math.inf, 0.0, 1.0)])
def test_draw_theta_gradient_with_infinite_bounds_matches_finite_differences(a, b, mu, sigma):
    """An infinite bound contributes nothing (phi(+-inf) = 0); autograd through the sampler is
    NaN there, so the reference is a central difference of the sampler at fixed u (float64)."""
    from bayesprune.distributions import draw_theta

    g = torch.Generator().manual_seed(3)
    u = torch.rand(300, 1, generator=g, dtype=torch.float64)
    w = torch.randn(300, 2, generator=g, dtype=torch.float64)
    m0 = torch.tensor([mu, mu + 0.1], dtype=torch.float64)
    s0 = torch.tensor([sigma, sigma * 1.5], dtype=torch.float64)
    m, s = m0.clone().requires_grad_(), s0.clone().requires_grad_()
    gm, gs = torch.autograd.grad((w * draw_theta(m, s, torch.ones(2, dtype=torch.float64), u, a, b)).sum(), [m, s])

    def f(mm, ss):
        return (w * torch.exp(sample_log_theta(mm, ss, u, a, b))).sum(0)

    h = 1e-6
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = h
        fd_m = (f(m0 + e, s0) - f(m0 - e, s0))[i] / (2 * h)
        fd_s = (f(m0, s0 + e) - f(m0, s0 - e))[i] / (2 * h)
        assert gm[i].item() == pytest.approx(fd_m.item(), rel=1e-5, abs=1e-8)
        assert gs[i].item() == pytest.approx(fd_s.item(), rel=1e-5, abs=1e-8)


def test_entropy_inside_fast_path_equals_the_general_path(monkeypatch):
    """When every mu lies in [a, b] the entropy takes a short path; with one mu outside in the
    same batch the general path runs.  Values and gradients of the inside entries agree."""
    from bayesprune.distributions import _LogSpaceEntropy

    calls = []
    inside = _LogSpaceEntropy._inside
    monkeypatch.setattr(_LogSpaceEntropy, "_inside", staticmethod(lambda *args: calls.append(1) or inside(*args)))
    g = torch.Generator().manual_seed(2)
    mu = torch.cat([torch.rand(200, generator=g, dtype=torch.float64) * 20 - 20, torch.tensor([A, B, -1e-12])])
    log_sigma = torch.rand(203, generator=g, dtype=torch.float64) * 25 - 20  # sigma e^-20 .. e^5
    outputs = []
    for extra_mu in (None, 0.5):  # None: all inside (fast path); 0.5 > b: general path
        m = mu.clone() if extra_mu is None else torch.cat([mu, torch.tensor([extra_mu], dtype=torch.float64)])
        s = log_sigma.exp() if extra_mu is None else torch.cat([log_sigma.exp(), torch.tensor([0.3], dtype=torch.float64)])
        m.requires_grad_(True)
        s.requires_grad_(True)
        h = TruncatedLogNormal(m, s, A, B).log_space_entropy()
        gm, gs = torch.autograd.grad(h.sum(), [m, s])
        outputs.append((h[:203], gm[:203], gs[:203]))
    assert calls == [1]  # the fast path ran once, for the all-inside batch
    for fast, general in zip(*outputs):
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("mu,sigma,exps", [(-10.0, 0.05, 0), (-0.5, 0.2, 1), (-10.0, 1.0, 2)])
def test_draw_theta_backward_skips_bounds_far_from_every_draw(monkeypatch, mu, sigma, exps):
    """A bound more than sqrt(160 + z^2) sd from every draw has weight < e^-80 and its exp is not
    computed (the backward's ``exp_`` calls are counted); the gradients themselves are checked
    against autograd through the sampler by the test above, on the same (mu, sigma)."""
    from bayesprune.distributions import draw_theta

    u = torch.rand(400, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    m = torch.tensor([mu, mu], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([sigma, sigma], dtype=torch.float64, requires_grad=True)
    theta = draw_theta(m, s, torch.ones(2, dtype=torch.float64), u, A, B)
    calls = []
    exp_ = torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda self: calls.append(1) or exp_(self))
    theta.sum().backward()
    assert len(calls) == exps
    assert torch.isfinite(m.grad).all() and torch.isfinite(s.grad).all()
