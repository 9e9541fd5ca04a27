"""The probes' per-row objective and the linear algebra of its Newton steps (see :mod:`probes.newton`)."""

from __future__ import annotations

import numpy as np
import torch


def loss_and_grad(z: np.ndarray, y: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row loss ``[..., rows]`` and its gradient in the scores ``[..., rows, outputs]`` (float32).

    ``z [..., rows, outputs]``; ``y`` is ``[rows]`` (binary 0/1 or regression targets) or one-hot
    ``[rows, outputs]`` (multiclass). Binary: ``softplus(z) - y z``; multiclass: ``logsumexp(z) - z_y``;
    regression: ``(z - y)^2 / 2``. Computed with torch's vectorised float32 kernels (7x numpy's float64 here).
    """
    zt = torch.from_numpy(np.asarray(z, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.float32))
    if kind == "binary":
        zz = zt[..., 0]
        loss = torch.nn.functional.softplus(zz) - yt * zz
        grad = (torch.sigmoid(zz) - yt)[..., None]
    elif kind == "multiclass":
        lse = torch.logsumexp(zt, -1)
        loss = lse - (zt * yt).sum(-1)
        grad = torch.exp(zt - lse[..., None]) - yt
    else:
        loss = 0.5 * (zt[..., 0] - yt) ** 2
        grad = zt - yt[..., None]
    return loss.numpy(), grad.numpy()


def curvature(z: np.ndarray, q: np.ndarray, kind: str) -> np.ndarray:
    """Second derivative of the per-row loss along ``q``: ``[..., rows]``."""
    zt = torch.from_numpy(np.asarray(z, np.float32))
    qt = torch.from_numpy(np.asarray(q, np.float32))
    if kind == "binary":
        p = torch.sigmoid(zt[..., 0])
        return (p * (1 - p) * qt[..., 0] ** 2).numpy()
    if kind == "multiclass":
        p = torch.softmax(zt, -1)
        pq = (p * qt).sum(-1)
        return ((p * qt * qt).sum(-1) - pq * pq).numpy()
    return (qt[..., 0] ** 2).numpy()


def damped_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of symmetric positive semi-definite ``matrix [..., n, n]``; where it is singular or the inverse is not
    finite (a constant feature with no L2 penalty, float32 rounding of a near-colinear Gram), the Levenberg-style
    damped ``(M + lambda I)^-1`` with the smallest ``lambda = 10^k * 1e-10 * mean diag(M)`` that inverts cleanly."""
    matrix = np.asarray(matrix, dtype=np.float64)
    try:
        inverse = np.linalg.inv(matrix)
        if np.isfinite(inverse).all():
            return inverse
    except np.linalg.LinAlgError:
        pass
    if matrix.ndim > 2:
        return np.stack([damped_inverse(m) for m in matrix])
    eye = np.eye(matrix.shape[-1])
    base = max(float(np.trace(matrix)) / matrix.shape[-1], 1e-12)
    for power in range(-10, 3):
        try:
            inverse = np.linalg.inv(matrix + base * 10.0**power * eye)
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(inverse).all():
            return inverse
    return np.linalg.pinv(matrix)
