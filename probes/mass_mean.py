"""Mass-mean probes: the difference of class means as a direction, and as a classifier.

Marks & Tegmark (2023), "The Geometry of Truth": the mass-mean direction ``theta = mu_+ - mu_-`` (mean activation of
one class minus the other) often transfers and steers better than a logistic-regression direction. Li et al. (2023),
"Inference-Time Intervention", steer along it, scaled by the activations' standard deviation along the direction:
``z_h <- z_h + alpha * sigma_h * theta_h / |theta_h|``.

As a classifier (binary): ``score = x . theta - theta . (mu_+ + mu_-) / 2``. For multiclass the analogue is the
nearest class mean, ``score_k = x . mu_k - |mu_k|^2 / 2``, and the directions are ``mu_k - mu`` (one against all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MassMean:
    """Mass-mean directions and classifier scores for every head."""

    direction: np.ndarray  # [heads, directions, d_head], unit norm (binary: 1 direction; multiclass: one per class)
    norm: np.ndarray  # [heads, directions]: |theta| before normalising
    std: np.ndarray  # [heads, directions]: std of the training activations along each unit direction
    scores: np.ndarray  # [rows, heads, outputs] classifier scores, cache row order


def mass_mean_block(x: np.ndarray, y: np.ndarray, rows: int, kind: str, n_classes: int):
    """Mass-mean probe of one block of heads.

    ``x [block, all_rows, d]`` (training rows first), ``y [all_rows]`` class ids, ``rows``: how many leading rows to
    compute the means on. Returns unit directions ``[block, D, d]``, norms and stds ``[block, D]`` and scores
    ``[block, all_rows, outputs]``.
    """
    xt = x[:, :rows]  # [B, R, d]
    onehot = np.eye(n_classes, dtype=np.float32)[y[:rows]]  # [R, C]
    counts = onehot.sum(0)
    means = np.matmul(xt.transpose(0, 2, 1), onehot).transpose(0, 2, 1) / counts[None, :, None]  # [B, C, d]
    overall = np.matmul(np.full((1, rows), 1.0 / rows, np.float32), xt)  # [B, 1, d]
    if kind == "binary":
        theta = (means[:, 1] - means[:, 0])[:, None]  # [B, 1, d]
        weight = theta.transpose(0, 2, 1)  # [B, d, 1]
        bias = -(theta[:, 0] * (means[:, 1] + means[:, 0]) / 2).sum(-1)[:, None]  # [B, 1]
    else:
        theta = means - overall  # [B, C, d]
        weight = means.transpose(0, 2, 1)  # [B, d, C]
        bias = -0.5 * (means * means).sum(-1)  # [B, C]
    norm = np.linalg.norm(theta, axis=-1)  # [B, D]
    unit = theta / np.maximum(norm, 1e-30)[..., None]
    projected = np.matmul(xt, unit.transpose(0, 2, 1).astype(np.float32))  # [B, R, D]
    std = projected.std(1)
    scores = np.matmul(x, weight.astype(np.float32)) + bias[:, None, :]  # [B, all_rows, outputs]
    return unit, norm, std, scores
