"""Reference integration shared by test_distributions.py and test_reduction.py (mpmath, scipy)."""

from __future__ import annotations

import math
import warnings

import mpmath as mp
from scipy import integrate


def mp_mass(l, h):
    """Phi(h) - Phi(l) at mpmath's working precision, from the tail on the side of the interval."""
    s2 = mp.sqrt(2)
    if l > 0:
        return (mp.erfc(l / s2) - mp.erfc(h / s2)) / 2
    if h < 0:
        return (mp.erfc(-h / s2) - mp.erfc(-l / s2)) / 2
    return 1 - (mp.erfc(-l / s2) + mp.erfc(h / s2)) / 2


def quad_split(f, lo, hi, scale, g):
    """int_lo^hi f(y) dy (lo <= 0 <= hi) with scipy quad, split at +-scale*2^k around 0.

    ``g`` is the (concave, maximal at 0) log-density; pieces where it is below -900 are dropped.
    Returns (value, absolute error estimate), the error inf where quad warned (unsure of itself:
    the mpmath references cover those points)."""
    total, err, warned = 0.0, 0.0, False
    for sign, end in ((1.0, hi), (-1.0, lo)):
        start, width = 0.0, scale
        while sign * start < sign * end:
            stop = sign * min(sign * end, sign * start + width)
            if g(start) < -900:
                break
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", integrate.IntegrationWarning)
                v, e = integrate.quad(f, min(start, stop), max(start, stop), epsabs=0, epsrel=1e-13, limit=200)
            warned = warned or bool(caught)
            total, err = total + v, err + e
            start, width = stop, (width if start == 0.0 else 2 * abs(stop))
    return total, (math.inf if warned else err)
