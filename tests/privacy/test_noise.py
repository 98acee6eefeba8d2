"""The discrete Gaussian sampler of DP statistics, against its exact distribution."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from scipy.stats import chisquare

from radfed.privacy.noise import discrete_gaussian, discrete_gaussians


def _pmf(sigma: float, support: range) -> list[float]:
    """The exact probabilities of N_Z(0, sigma^2) on ``support`` (normalised over a range
    wide enough that the mass outside is below 1e-12)."""
    wide = range(-int(40 * sigma) - 10, int(40 * sigma) + 11)
    total = sum(math.exp(-(x * x) / (2 * sigma * sigma)) for x in wide)
    return [math.exp(-(x * x) / (2 * sigma * sigma)) / total for x in support]


@pytest.mark.parametrize("sigma", [0.6, 2.0, 4.5])
def test_draws_follow_the_exact_discrete_gaussian(sigma: float) -> None:
    # Prepare
    rng = random.Random(11)
    count = 20_000

    # Execute
    draws = discrete_gaussians(count, sigma, rng)

    # Assert: a chi-square goodness of fit against the exact pmf (tails pooled) does not
    # reject, and the variance is the pmf's (at most sigma^2)
    edge = max(1, math.ceil(3 * sigma))
    support = range(-edge, edge + 1)
    probabilities = _pmf(sigma, support)
    seen = Counter(min(max(d, -edge - 1), edge + 1) for d in draws)
    observed = [seen[x] for x in support] + [seen[-edge - 1] + seen[edge + 1]]
    expected = [p * count for p in probabilities] + [(1 - sum(probabilities)) * count]
    assert chisquare(observed, expected).pvalue > 1e-3
    variance = sum(d * d for d in draws) / count
    exact = sum(p * x * x for p, x in zip(_pmf(sigma, support), support, strict=True))
    assert variance == pytest.approx(exact, rel=0.05)
    assert exact <= sigma * sigma + 1e-9


def test_the_default_source_is_fresh_entropy_not_a_seed() -> None:
    # Two runs of the sampler without a source: a server that knew a seed could subtract
    # the noise; the operating system's entropy gives different draws each time
    first, second = discrete_gaussians(64, 3.0), discrete_gaussians(64, 3.0)
    assert first != second


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan])
def test_a_sigma_that_is_not_positive_and_finite_is_refused(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        discrete_gaussian(sigma)
