"""From trained probes to the per-head table: rank on validation, report on test, with controls.

Heads are ranked on validation rows (holdout) or on the mean held-out-fold score (k-fold), and every reported
score comes from test rows that took no part in training or ranking, because the best of a thousand heads on the
data that chose it is biased upward.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from headlab.statistics import benjamini_hochberg
from probes.config import ControlConfig
from probes.data import ProbeProblem
from probes.mass_mean import MassMean
from probes.metrics import (
    auroc_interval,
    bootstrap_metric,
    bootstrap_weights,
    percentile_interval,
    permutation_pvalues,
    predictions,
    primary_metric,
    score_part,
)
from probes.newton import HeadFits
from probes.trust import assess


def evaluate(problem: ProbeProblem, fits: HeadFits, mass: MassMean | None, control: ControlConfig,
             layers: list[int], n_heads: int, seed: int) -> pd.DataFrame:
    """One row per (layer, head): ``layer``, ``head`` and every metric (see the columns' names)."""
    kind, n_classes = problem.kind, problem.n_classes
    metric = primary_metric(kind)
    test = problem.parts == problem.test_part
    y_test = problem.y[test]
    n_total = fits.scores.shape[2]
    table: dict[str, np.ndarray] = {
        "layer": np.repeat(np.asarray(layers), n_heads),
        "head": np.tile(np.arange(n_heads), len(layers)),
    }
    # ranking: validation part (holdout) or held-out folds (k-fold)
    rank_scores = []
    for f, part in problem.rank_on:
        rows = problem.parts == part
        rank_scores.append(score_part(fits.scores[f, rows], problem.y[rows], kind, n_classes,
                                      control.calibration_bins, primary_only=True)[metric])
    if len(rank_scores) == 1:
        table[f"val_{metric}"] = rank_scores[0]
    else:
        table[f"cv_{metric}_mean"] = np.mean(rank_scores, 0)
        table[f"cv_{metric}_std"] = np.std(rank_scores, 0, ddof=1)
    # reported: test part
    report = fits.scores[problem.report_fit, test]  # [test_rows, heads, outputs]
    table.update(score_part(report, y_test, kind, n_classes, control.calibration_bins))
    pred = predictions(report, kind)
    trust = assess(problem)
    if control.bootstrap and trust.intervals:
        groups = None if problem.groups is None else problem.groups[test]
        weights = bootstrap_weights(int(test.sum()), groups, control.bootstrap, seed)
        names = {"binary": ["accuracy"], "multiclass": ["accuracy", "macro_f1"], "regression": ["r2"]}[kind]
        for name in names:
            samples = bootstrap_metric(pred, y_test, name, n_classes, weights)
            table[f"{name}_ci_low"], table[f"{name}_ci_high"] = percentile_interval(samples, control.confidence)
    if kind == "binary":
        n1 = int(y_test.sum())
        table["auroc_ci_low"], table["auroc_ci_high"] = auroc_interval(table["auroc"], n1, len(y_test) - n1,
                                                                       control.confidence)
    if control.permutations:
        table["p_value"] = permutation_pvalues(pred, y_test, kind, n_classes, control.permutations, seed)
        table["p_value_bh"] = benjamini_hochberg(table["p_value"])
    if problem.control_fit is not None:
        control_scores = fits.scores[problem.control_fit, test]
        control_y = problem.fits[problem.control_fit].target[test]
        table[f"control_{metric}"] = score_part(control_scores, control_y, kind, n_classes,
                                                control.calibration_bins, primary_only=True)[metric]
        table["selectivity"] = (table[metric] - table[f"control_{metric}"] if trust.selectivity
                                else np.full(n_total, np.nan))
    if mass is not None:
        mass_pred = predictions(mass.scores[test], kind)
        table["mass_mean_accuracy"] = (mass_pred == y_test[:, None]).mean(0)
        table["mass_mean_std"] = mass.std[:, 0]
    table["converged"] = fits.converged.all(0)
    table["iterations"] = fits.iterations
    if fits.degenerate is not None:
        table["degenerate_dims"] = fits.degenerate
    frame = pd.DataFrame(table, index=pd.RangeIndex(n_total))
    frame["rank"] = frame[rank_column(frame, kind)].rank(ascending=False, method="first").astype(int)
    return frame


def rank_column(frame: pd.DataFrame, kind: str) -> str:
    metric = primary_metric(kind)
    return f"val_{metric}" if f"val_{metric}" in frame else f"cv_{metric}_mean"


def top_heads(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` heads ranked best on validation (their reported columns are test scores)."""
    return frame.sort_values("rank").head(k)
