"""Statistics shared by probes and head-function detection: multiple-testing correction and a one-sided paired
test."""

from __future__ import annotations

import numpy as np


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg (1995) adjusted p-values: ``p_(k) * m / k`` made monotone from the largest down, capped at 1.

    A test is significant at false discovery rate ``q`` when its adjusted p-value is below ``q``. Source:
    Benjamini & Hochberg 1995, "Controlling the false discovery rate", J. R. Stat. Soc. B 57.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    flat = p.ravel()
    order = np.argsort(flat)
    ranked = flat[order] * flat.size / np.arange(1, flat.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(adjusted)
    out[order] = np.minimum(adjusted, 1)
    return out.reshape(p.shape)


def paired_greater_p(differences: np.ndarray) -> np.ndarray:
    """One-sided one-sample t-test that the mean of ``differences [samples, ...]`` is above 0, per column.

    ``t = mean / (sd / sqrt(n))`` with ``n - 1`` degrees of freedom; ``p = P(T_{n-1} >= t)``. Samples are the
    independent units (sequences, tokens); NaN samples (units without a matched pair) are left out. Where every
    difference is equal the test degenerates: ``p = 0`` for a positive constant, ``1`` otherwise; fewer than two
    samples give ``p = 1``.
    """
    import warnings

    from scipy.stats import t as student

    d = np.asarray(differences, dtype=np.float64)
    n = np.sum(~np.isnan(d), axis=0)
    with warnings.catch_warnings():  # columns with < 2 samples are answered below (p = 1)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.where(n > 0, d, 0.0), axis=0) if d.size else np.zeros(d.shape[1:])
        sd = np.nanstd(d, axis=0, ddof=1) if d.shape[0] > 1 else np.zeros(d.shape[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(np.maximum(n, 1)))
        p = student.sf(t, np.maximum(n - 1, 1))
    flat = ~(sd > 0)  # zero spread (or undefined)
    p = np.where(flat, np.where(mean > 0, 0.0, 1.0), p)
    return np.where(n >= 2, p, 1.0)


def monte_carlo_p(observed: float, reference: np.ndarray | list[float]) -> float:
    """``(1 + #{|r| >= |observed|}) / (1 + n)``: the two-sided Monte Carlo p-value of ``observed`` among ``n``
    reference draws under the null (Davison & Hinkley 1997, eq. 4.11; North et al. 2002). Under exchangeability
    ``P(p <= k / (n + 1)) = k / (n + 1)`` exactly, so ``p <= alpha`` is a level-``alpha`` test. The smallest value it
    can take is :func:`min_attainable_p`."""
    ref = np.abs(np.asarray(reference, dtype=np.float64))
    return float((1 + np.count_nonzero(ref >= abs(observed))) / (1 + ref.size))


def min_attainable_p(n_reference: int) -> float:
    """``1 / (n + 1)``: the smallest Monte Carlo p-value ``n`` reference draws allow. A check with
    ``min_attainable_p(n) > alpha`` can never pass, whatever the data."""
    return 1.0 / (1 + int(n_reference))


def draws_for(alpha: float) -> int:
    """The fewest reference draws ``n`` with ``1 / (n + 1) <= alpha`` (19 for 0.05, 99 for 0.01)."""
    return max(1, int(np.ceil(1.0 / alpha - 1 - 1e-9)))


def sign_flip_p(differences: np.ndarray, draws: int, seed: int, chunk: int = 4096) -> np.ndarray:
    """One-sided Monte Carlo sign-flip test that the mean of ``differences [samples, ...]`` is above 0, per column:
    ``p = (1 + #{flipped means >= observed mean}) / (1 + draws)``, each draw multiplying every sample by an
    independent random sign (the randomisation test of a paired design: Fisher 1935; Good 2005, "Permutation,
    Parametric and Bootstrap Tests of Hypotheses", ch. 3). Exact at level ``alpha`` for samples symmetric about 0
    under the null; the smallest value is :func:`min_attainable_p` of ``draws``. All draws share the sign vectors."""
    d = np.asarray(differences, dtype=np.float64)
    flat = d.reshape(d.shape[0], -1)
    rng = np.random.default_rng(seed)
    observed = flat.mean(0)
    reached = np.zeros(flat.shape[1], dtype=np.int64)
    for start in range(0, int(draws), chunk):
        signs = rng.choice([-1.0, 1.0], size=(min(chunk, int(draws) - start), flat.shape[0]))
        null = signs @ flat / flat.shape[0]  # [draws, columns]
        reached += np.count_nonzero(null >= observed - 1e-12 * np.abs(observed), axis=0)
    return ((1 + reached) / (1 + int(draws))).reshape(d.shape[1:])
