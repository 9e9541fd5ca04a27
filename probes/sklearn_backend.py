"""The reference backend: one scikit-learn model per (layer, head), as in the Inference-Time Intervention code.

It minimises the same objective as the headlab backends (see :mod:`probes.config`):
``LogisticRegression(C=1/(l2 * n))`` (L2), ``l1_ratio = l1 / (l1 + l2)`` with ``C = 1/((l1 + l2) n)`` (elastic
net / L1, saga solver), or ``Ridge(alpha=l2 * n)`` for regression, on ``StandardScaler`` output when standardising,
with the class weights passed as sample weights. Slow (one model per head), which is why it is the cross-check.
"""

from __future__ import annotations

import warnings

import numpy as np

from probes.config import ProbeConfig
from probes.data import HeadMajor, ProbeProblem, check_finite, standardisation_scale
from probes.newton import HeadFits


def sklearn_model(kind: str, probe: ProbeConfig, n_train: int):
    """The scikit-learn estimator equivalent to ``probe`` on ``n_train`` rows."""
    from sklearn.linear_model import LogisticRegression, Ridge

    if kind == "regression":
        return Ridge(alpha=probe.l2 * n_train)
    if probe.l1 > 0:
        strength = probe.l1 + probe.l2
        return LogisticRegression(C=1.0 / (strength * n_train), l1_ratio=probe.l1 / strength, solver="saga",
                                  max_iter=5000, tol=1e-6)
    return LogisticRegression(C=1.0 / (probe.l2 * n_train), max_iter=1000)


def fit_sklearn(hm: HeadMajor, problem: ProbeProblem, probe: ProbeConfig, layers: list[int],
                n_heads_per_layer: int) -> HeadFits:
    """Fit every fit of ``problem`` for every head with scikit-learn, one head at a time."""
    from sklearn.exceptions import ConvergenceWarning

    n_fits, n_heads, d, k = len(problem.fits), hm.n_heads, hm.d_head, problem.outputs
    weight = np.zeros((n_fits, n_heads, d, k), np.float32)
    bias = np.zeros((n_fits, n_heads, k), np.float32)
    scores = np.zeros((n_fits, hm.rows, n_heads, k), np.float32)
    converged = np.ones((n_fits, n_heads), bool)
    iterations = np.zeros(n_heads, np.int64)
    order = hm.order
    for h0 in range(0, n_heads, hm.block_size):
        block = hm.block(h0, min(h0 + hm.block_size, n_heads))  # [block, rows, d], sorted rows
        check_finite(block.sum(1), layers, n_heads_per_layer, h0)
        for b in range(block.shape[0]):
            x = np.empty_like(block[b])
            x[order] = block[b]  # back to cache row order
            for f, fit in enumerate(problem.fits):
                train = problem.train_mask(fit)
                mean = x[train].mean(0) if probe.standardize else np.zeros(d, np.float32)
                std = standardisation_scale(x[train].std(0))[0] if probe.standardize else np.ones(d)
                model = sklearn_model(problem.kind, probe, int(train.sum()))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    model.fit((x[train] - mean) / std, fit.target[train],
                              sample_weight=problem.sample_weight[train])
                converged[f, h0 + b] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
                coef = np.atleast_2d(model.coef_).T / std[:, None]  # [d, k] raw space
                intercept = np.atleast_1d(model.intercept_) - mean @ coef
                weight[f, h0 + b], bias[f, h0 + b] = coef, intercept
                scores[f, :, h0 + b] = x @ coef + intercept
                iterations[h0 + b] = max(iterations[h0 + b], int(np.max(getattr(model, "n_iter_", 0))))
    return HeadFits(weight, bias, scores, iterations, converged)
