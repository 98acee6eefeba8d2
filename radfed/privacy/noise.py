"""Exact sampling of the discrete Gaussian, the noise of the site's DP statistics.

``N_Z(0, sigma^2)`` gives each integer ``x`` a probability proportional to
``exp(-x^2 / (2 sigma^2))``. Added to an integer query of L2 sensitivity ``D`` it gives
``D^2 / (2 sigma^2)``-zero-concentrated DP, as the continuous Gaussian does, and its variance
is at most ``sigma^2`` (Canonne, Kamath and Steinke, 2020, Thm. 4 and Cor. 9). Unlike a
rounded floating-point Gaussian, it is sampled exactly: rational arithmetic and uniform
integers from the operating system's entropy (``secrets``), so neither floating-point
artefacts nor a seed the server could know weaken the guarantee. The algorithm is theirs
(Algorithms 1 to 3: Bernoulli(exp(-gamma)) by series, discrete Laplace by geometric
sampling, then rejection).
"""

from __future__ import annotations

import math
import secrets
from fractions import Fraction
from typing import Protocol

__all__ = ["IntegerSource", "discrete_gaussian", "discrete_gaussians"]


class IntegerSource(Protocol):
    """Uniform integers: ``randrange(n)`` in ``0..n-1`` (``secrets.SystemRandom``)."""

    def randrange(self, stop: int, /) -> int: ...


_SYSTEM = secrets.SystemRandom()


def _bernoulli(p: Fraction, rng: IntegerSource) -> bool:
    """True with probability ``p`` in [0, 1], exactly."""
    return rng.randrange(p.denominator) < p.numerator


def _bernoulli_exp_below_one(gamma: Fraction, rng: IntegerSource) -> bool:
    """True with probability ``exp(-gamma)``, ``gamma`` in [0, 1]."""
    k = 1
    while _bernoulli(gamma / k, rng):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(gamma: Fraction, rng: IntegerSource) -> bool:
    """True with probability ``exp(-gamma)``, ``gamma >= 0``."""
    while gamma > 1:
        gamma -= 1
        if not _bernoulli_exp_below_one(Fraction(1), rng):
            return False
    return _bernoulli_exp_below_one(gamma, rng)


def _geometric_exp(x: Fraction, rng: IntegerSource) -> int:
    """A geometric count with ``P(k) ~ exp(-x k)``, ``x > 0``."""
    s, t = x.numerator, x.denominator
    while True:
        u = rng.randrange(t)
        if _bernoulli_exp(Fraction(u, t), rng):
            break
    v = 0
    while _bernoulli_exp(Fraction(1), rng):
        v += 1
    return (v * t + u) // s


def _discrete_laplace(scale: int, rng: IntegerSource) -> int:
    """``P(x) ~ exp(-|x| / scale)`` over the integers."""
    while True:
        negative = _bernoulli(Fraction(1, 2), rng)
        magnitude = _geometric_exp(Fraction(1, scale), rng)
        if not (negative and magnitude == 0):
            return -magnitude if negative else magnitude


def discrete_gaussian(sigma: float | Fraction, rng: IntegerSource | None = None) -> int:
    """One draw of ``N_Z(0, sigma^2)``; ``sigma`` is taken as the exact decimal it prints as.
    ``rng`` is the operating system's entropy unless given (tests only).

    Raises:
        ValueError: ``sigma`` is not a finite number > 0.
    """
    if isinstance(sigma, float) and not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    exact = Fraction(str(sigma)) if isinstance(sigma, float) else Fraction(sigma)
    if exact <= 0:
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    source = _SYSTEM if rng is None else rng
    variance = exact * exact
    t = math.isqrt(math.floor(variance)) + 1
    while True:
        candidate = _discrete_laplace(t, source)
        bias = (abs(candidate) - variance / t) ** 2 / (2 * variance)
        if _bernoulli_exp(bias, source):
            return candidate


def discrete_gaussians(
    count: int, sigma: float | Fraction, rng: IntegerSource | None = None
) -> list[int]:
    """``count`` independent draws of ``N_Z(0, sigma^2)``."""
    return [discrete_gaussian(sigma, rng) for _ in range(count)]
