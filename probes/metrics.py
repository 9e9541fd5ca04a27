"""Held-out metrics for every head at once, with intervals, calibration and permutation p-values.

Scores are ``[rows, heads, outputs]``: a logit (binary), one logit per class (multiclass) or a prediction
(regression). Every function is vectorised over heads; intervals and permutations go through small matrix
products (row-weight matrices times per-row indicators) rather than Python loops.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from scipy.stats import norm, rankdata


def predictions(scores: np.ndarray, kind: str) -> np.ndarray:
    """``[rows, heads]``: class ids (binary: logit > 0; multiclass: argmax) or regression predictions."""
    if kind == "binary":
        return (scores[..., 0] > 0).astype(np.int64)
    if kind == "multiclass":
        return scores.argmax(-1)
    return scores[..., 0]


def probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    """``[rows, heads, classes]`` class probabilities (sigmoid or softmax of the logits)."""
    if kind == "binary":
        p = expit(scores[..., 0].astype(np.float64))  # 1 / (1 + e^-z) without overflow warnings
        return np.stack([1 - p, p], -1)
    z = scores.astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def accuracy(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of rows whose predicted class is the label: ``[heads]``."""
    return (pred == y[:, None]).mean(0)


def auroc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under the ROC curve per head via the Mann-Whitney U statistic (ties get average ranks):
    ``AUC = (sum of positive ranks - n1 (n1 + 1) / 2) / (n1 n0)``. ``scores [rows, heads]``, ``y`` 0/1."""
    ranks = rankdata(scores, axis=0)
    n1 = float(y.sum())
    n0 = len(y) - n1
    return (ranks[y == 1].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def auroc_interval(auc: np.ndarray, n1: int, n0: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Hanley & McNeil (1982, Radiology 143) standard error of the AUC, as a normal interval clipped to [0, 1]:
    ``SE^2 = [A(1-A) + (n1-1)(Q1-A^2) + (n0-1)(Q2-A^2)] / (n1 n0)``, ``Q1 = A/(2-A)``, ``Q2 = 2A^2/(1+A)``."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    half = norm.ppf(0.5 + confidence / 2) * np.sqrt(np.maximum(var, 0))
    return np.clip(auc - half, 0, 1), np.clip(auc + half, 0, 1)


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Macro-F1 from per-class counts ``[..., classes]``: mean over classes that occur in labels or predictions of
    ``2 tp / (2 tp + fp + fn)`` (scikit-learn's ``f1_score(average="macro")``)."""
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.where(present, denom, 1), 0.0)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def _class_counts(pred: np.ndarray, y: np.ndarray, n_classes: int, weights: np.ndarray | None = None):
    """Per-class true positives, false positives and false negatives ``[(resamples,) heads, classes]``.
    ``weights [resamples, rows]`` counts each row that many times (bootstrap)."""
    tp, fp, fn = [], [], []
    for c in range(n_classes):
        is_pred = (pred == c).astype(np.float32)  # [rows, heads]
        is_true = (y == c).astype(np.float32)[:, None]
        parts = (is_pred * is_true, is_pred * (1 - is_true), (1 - is_pred) * is_true)
        if weights is None:
            parts = [p.sum(0) for p in parts]
        else:
            parts = [weights @ p for p in parts]
        tp.append(parts[0])
        fp.append(parts[1])
        fn.append(parts[2])
    return np.stack(tp, -1), np.stack(fp, -1), np.stack(fn, -1)


def macro_f1(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-averaged F1 per head: ``[heads]``."""
    return _f1_from_counts(*_class_counts(pred, y, n_classes))


def r2(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficient of determination per head: ``1 - sum (y - yhat)^2 / sum (y - mean y)^2``."""
    ss_tot = ((y - y.mean()) ** 2).sum()
    return 1 - ((pred - y[:, None]) ** 2).sum(0) / max(ss_tot, 1e-300)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """Expected calibration error per head (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural
    Networks"): rows are binned by confidence ``max_k p_k`` into equal-width bins and
    ``ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b|``. ``probs [rows, heads, classes]``."""
    rows, heads, _ = probs.shape
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == y[:, None]).astype(np.float64)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1) + np.arange(heads) * bins
    conf_sum = np.bincount(which.ravel(), confidence.ravel(), heads * bins).reshape(heads, bins)
    acc_sum = np.bincount(which.ravel(), correct.ravel(), heads * bins).reshape(heads, bins)
    return np.abs(acc_sum - conf_sum).sum(1) / rows


def bootstrap_weights(n: int, groups: np.ndarray | None, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, rows]`` float32: how often each row is drawn in each bootstrap resample. With groups, whole
    groups are resampled (cluster bootstrap), so correlated rows do not shrink the interval."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float32)
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_row.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)
    return counts[:, group_of_row].astype(np.float32)


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval over axis 0."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def bootstrap_metric(pred: np.ndarray, y: np.ndarray, metric: str, n_classes: int, weights: np.ndarray
                     ) -> np.ndarray:
    """``metric`` (``accuracy``, ``macro_f1`` or ``r2``) on every resample: ``[resamples, heads]``.
    ``weights [resamples, rows]`` from :func:`bootstrap_weights`."""
    total = weights.sum(1, keepdims=True)
    if metric == "r2":
        err = ((pred - y[:, None]) ** 2).astype(np.float32)
        wy = weights @ y.astype(np.float32)
        ss_tot = weights @ (y.astype(np.float32) ** 2) - wy**2 / total[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1 - (weights @ err) / ss_tot[:, None]
    if metric == "macro_f1":
        return _f1_from_counts(*_class_counts(pred, y, n_classes, weights))
    return (weights @ (pred == y[:, None]).astype(np.float32)) / total


def permutation_pvalues(pred: np.ndarray, y: np.ndarray, kind: str, n_classes: int, permutations: int,
                        seed: int) -> np.ndarray:
    """Per-head p-value of beating chance: the held-out labels are permuted ``permutations`` times with the
    predictions fixed, and ``p = (1 + #{permuted statistic >= observed}) / (1 + permutations)`` (Phipson & Smyth
    2010). The statistic is accuracy (classification) or ``-sum (y - yhat)^2`` (regression, i.e. R^2). The probe
    never saw these rows, so this tests held-out association, not fit."""
    rng = np.random.default_rng(seed + 104729)
    perms = np.stack([rng.permutation(len(y)) for _ in range(permutations)])  # [perms, rows]
    y_perm = y[perms]
    if kind == "regression":
        # sum (y_p - yhat)^2 = sum y^2 + sum yhat^2 - 2 y_p . yhat: only the cross term changes
        observed = y.astype(np.float64) @ pred
        permuted = y_perm.astype(np.float32) @ pred.astype(np.float32)
    else:
        observed = (pred == y[:, None]).sum(0).astype(np.float64)
        permuted = np.zeros((permutations, pred.shape[1]), np.float32)
        for c in range(n_classes):
            permuted += (y_perm == c).astype(np.float32) @ (pred == c).astype(np.float32)
    exceed = (permuted >= observed[None, :] - 1e-6 * np.maximum(1, np.abs(observed))[None, :]).sum(0)
    return (1 + exceed) / (1 + permutations)


def primary_metric(kind: str) -> str:
    return "r2" if kind == "regression" else "accuracy"


def score_part(scores: np.ndarray, y: np.ndarray, kind: str, n_classes: int, calibration_bins: int,
               primary_only: bool = False) -> dict[str, np.ndarray]:
    """Every point metric of one fit on one part (or only the primary one): ``{name: [heads]}``."""
    pred = predictions(scores, kind)
    if kind == "regression":
        return {"r2": r2(pred, y)}
    out = {"accuracy": accuracy(pred, y)}
    if primary_only:
        return out
    if kind == "binary":
        out["auroc"] = auroc(scores[..., 0], y)
    else:
        out["macro_f1"] = macro_f1(pred, y, n_classes)
    out["ece"] = expected_calibration_error(probabilities(scores, kind), y, calibration_bins)
    return out
