"""Depth statistics of the stage map and the ordering test (does depth grow with stage?).

* **relative depth** of layer ``l`` (0-based) in an ``L``-layer model: ``(l + 0.5) / L``, the layer's centre on
  ``[0, 1]``, comparable across depths (a 2-layer toy has heads at 0.25 and 0.75).
* **ordering test**: Spearman's rho between the stage rank (KR=0 < ICI=1 < LR=2 < EP=3) and relative depth over the
  observations (detected (head, role) pairs), and whether the per-stage mean depths are non-decreasing in stage
  order.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from roles.stages.taxonomy import STAGE_ORDER


def relative_depth(layer: int | np.ndarray, n_layers: int | np.ndarray) -> float | np.ndarray:
    """``(layer + 0.5) / n_layers``: the centre of 0-based ``layer`` on ``[0, 1]``."""
    return (np.asarray(layer) + 0.5) / np.asarray(n_layers)


def depth_stats(depths: pd.Series | np.ndarray) -> dict[str, float | int | None]:
    """Count, mean, median, quartiles, min and max of relative depths (``None`` when there are none)."""
    values = np.asarray(depths, dtype=float)
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "q25": None, "q75": None, "min": None, "max": None}
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def bootstrap_rho(rank: np.ndarray, depth: np.ndarray, resamples: int, seed: int) -> list[float]:
    """``[2.5%, 97.5%]`` percentiles of Spearman's rho over observations resampled with replacement (resamples
    without spread in either variable are skipped)."""
    from scipy.stats import spearmanr

    generator = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = generator.integers(0, len(rank), len(rank))
        if np.ptp(rank[pick]) > 0 and np.ptp(depth[pick]) > 0:
            values.append(spearmanr(rank[pick], depth[pick]).statistic)
    if not values:
        return [float("nan"), float("nan")]
    low, high = np.quantile(values, [0.025, 0.975])
    return [float(low), float(high)]


def ordering_test(rows: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Does depth grow with stage (KR < ICI < LR < EP)? ``rows``: detected heads with ``stage``, ``relative_depth``.

    Returns ``rho`` and ``p_value`` (Spearman, stage rank vs depth), ``rho_ci`` (95% percentile bootstrap interval
    over the detected heads, ``resamples`` draws with replacement; the heads were detected on fixed prompts, so the
    interval covers the choice of heads, not of prompts), ``n`` observations, ``stages_present``, ``stage_means``,
    ``monotone`` (means non-decreasing in stage order), ``holds`` (rho > 0 and monotone; ``None`` when untestable:
    fewer than 2 stages or 3 observations, or no spread in depth) and ``significant`` (holds with two-sided
    p < 0.05; a direction alone can come from a rho near 0).
    """
    from scipy.stats import spearmanr

    rank = rows["stage"].map({s: i for i, s in enumerate(STAGE_ORDER)}).to_numpy(dtype=float)
    depth = rows["relative_depth"].to_numpy(dtype=float)
    present = [s for s in STAGE_ORDER if (rows["stage"] == s).any()]
    means = {s: float(rows.loc[rows["stage"] == s, "relative_depth"].mean()) for s in present}
    ordered = [means[s] for s in present]
    monotone = all(a <= b for a, b in itertools.pairwise(ordered)) if len(present) >= 2 else None
    rho = p_value = None
    if len(present) >= 2 and len(rows) >= 3 and np.ptp(depth) > 0:
        result = spearmanr(rank, depth)
        rho, p_value = float(result.statistic), float(result.pvalue)
    holds = None if rho is None else bool(rho > 0 and monotone)
    significant = None if holds is None else bool(holds and p_value < 0.05)
    return {
        "rho": rho,
        "rho_ci": None if rho is None else bootstrap_rho(rank, depth, resamples, seed),
        "p_value": p_value,
        "n": len(rows),
        "stages_present": present,
        "stage_means": means,
        "monotone": monotone,
        "holds": holds,
        "significant": significant,
    }
