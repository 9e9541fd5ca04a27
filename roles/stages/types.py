"""The survey's claim at the level it states it: head *types* of the four stages run shallow to deep.

Zheng et al. 2024 place head types, not single heads, in stages, and say the shallow-to-deep order "reflects only the
majority of cases" (``source/main.tex``, section "How do attention heads work together?"). A statistic over heads
lets one type with many heads (63 probe-found truthfulness heads, say) decide alone. Here each role (one headlab
measurement of one survey type) with at least one detected head is one observation:

* **type depth**: the median relative depth ``(layer + 0.5) / L`` of the role's detected heads, with a 95% percentile
  bootstrap interval over those heads (the heads were detected on fixed prompts, so it covers the choice of heads).
* **statistic**: Kendall's tau-b between the stage index (KR 0, ICI 1, LR 2, EP 3) and the type depth (Kendall 1938;
  tau-b corrects for ties, as in ``scipy.stats.kendalltau``).
* **null**: every distinct assignment of the same multiset of stage labels to the types (an exact permutation test,
  one-sided, larger tau = more shallow-to-deep). p = #{assignments with tau >= observed} / #assignments. Because the
  tie counts of both variables are fixed under the permutation, tau-b's denominator is too, so the numerator
  ``S = sum_{i<j} sign(s_i - s_j) sign(d_i - d_j)`` orders the assignments exactly as tau-b does. Beyond
  ``EXACT_LIMIT`` assignments, ``MONTE_CARLO_DRAWS`` random ones (p = (1 + hits) / (1 + draws)).
* **smallest attainable p** (``min_p``): the p of the best arrangement of these labels; with one type per stage it is
  1/24 ~ 0.042, with three types 1/6. When it exceeds alpha no outcome could be significant.
* **majority claim**: the share of detected heads lying in their stage's third of depth (KR shallow ``[0, 1/3)``,
  ICI and LR middle ``[1/3, 2/3)``, EP deep ``[2/3, 1]``: the survey's own split of GPT-2 Small's layers and its
  figure "Shallow: KR, Middle: ICI/LR, Deep: EP"), against the same label permutations (each type's heads keep their
  depths and take the permuted stage).
* **verdict**: ``inconclusive`` when ``min_p > alpha`` (the test cannot reach alpha), or when tau > 0 but p > alpha
  (the right direction, not carried by the evidence); ``consistent`` when p <= alpha; ``inconsistent`` when the test
  can reach alpha and tau <= 0 (no shallow-to-deep order among the types, or the reverse).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from roles.stages.taxonomy import STAGE_ORDER

EXACT_LIMIT = 200_000
MONTE_CARLO_DRAWS = 19_999
THIRDS = {"KR": (0.0, 1 / 3), "ICI": (1 / 3, 2 / 3), "LR": (1 / 3, 2 / 3), "EP": (2 / 3, 1.0 + 1e-9)}
"""Each stage's third of relative depth (the survey: shallow KR, middle ICI/LR, deep EP)."""
TYPE_COLUMNS = ["model", "stage", "role", "n_detected", "n_functional", "median_depth", "depth_lo", "depth_hi"]
"""Columns of ``stage_types.csv``."""


def type_table(rows: pd.DataFrame, model: str, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per role with a detected head: ``TYPE_COLUMNS``. ``rows``: the model's scored (head, role) rows with
    ``role, stage, relative_depth, detected`` and optionally ``functional`` (True, False or missing)."""
    hits = rows[rows["detected"].astype(bool)]
    generator = np.random.default_rng(seed)
    out = []
    for role, mine in hits.groupby("role", sort=False):
        depths = mine["relative_depth"].to_numpy(float)
        functional = mine["functional"] if "functional" in mine else pd.Series(dtype=object)
        medians = np.median(depths[generator.integers(0, len(depths), (resamples, len(depths)))], axis=1)
        low, high = np.quantile(medians, [0.025, 0.975])
        out.append({"model": model, "stage": mine["stage"].iloc[0], "role": role, "n_detected": len(mine),
                    "n_functional": int((functional == True).sum()),  # noqa: E712 (True, not truthy: NaN is unknown)
                    "median_depth": float(np.median(depths)), "depth_lo": float(low), "depth_hi": float(high)})
    frame = pd.DataFrame(out, columns=TYPE_COLUMNS)
    order = frame["stage"].map(STAGE_ORDER.index)
    return frame.assign(_order=order).sort_values(["_order", "median_depth"]).drop(columns="_order")


def stage_assignments(labels: list[int]) -> Iterator[tuple[int, ...]]:
    """Every distinct ordering of the multiset ``labels``, each once (n! / prod(count!) of them)."""
    counts = {value: labels.count(value) for value in sorted(set(labels))}
    n = len(labels)

    def place(free: tuple[int, ...], values: list[int], filled: dict[int, int]) -> Iterator[tuple[int, ...]]:
        if not values:
            yield tuple(filled[i] for i in range(n))
            return
        value, rest = values[0], values[1:]
        for chosen in itertools.combinations(free, counts[value]):
            left = tuple(i for i in free if i not in chosen)
            yield from place(left, rest, {**filled, **dict.fromkeys(chosen, value)})

    yield from place(tuple(range(n)), list(counts), {})


def _n_assignments(labels: list[int]) -> int:
    total = math.factorial(len(labels))
    for value in set(labels):
        total //= math.factorial(labels.count(value))
    return total


def _pair_signs(values: np.ndarray) -> np.ndarray:
    """``[..., pairs]`` sign(v_i - v_j) over the pairs i < j of the last axis."""
    i, j = np.triu_indices(values.shape[-1], k=1)
    return np.sign(values[..., i] - values[..., j])


def _null_labels(labels: list[int], seed: int) -> tuple[np.ndarray, bool]:
    """``[assignments, types]`` stage labels of the null: all of them (exact) or random draws, and whether exact."""
    if _n_assignments(labels) <= EXACT_LIMIT:
        return np.array(list(stage_assignments(labels))), True
    generator = np.random.default_rng(seed)
    return np.array([generator.permutation(labels) for _ in range(MONTE_CARLO_DRAWS)]), False


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b: ``S / sqrt((n0 - n1)(n0 - n2))`` with S the concordant minus discordant pairs, n0 the pairs,
    n1 and n2 the pairs tied in x and in y; NaN when either variable is constant."""
    sx, sy = _pair_signs(np.asarray(x, float)), _pair_signs(np.asarray(y, float))
    denominator = math.sqrt(float((sx != 0).sum()) * float((sy != 0).sum()))
    return float((sx * sy).sum() / denominator) if denominator else float("nan")


def _majority_share(types: pd.DataFrame, heads: pd.DataFrame, stage_of_type: np.ndarray) -> np.ndarray:
    """``[assignments]`` share of ``heads`` (role, relative_depth) inside the third of the stage their type takes in
    each assignment (``stage_of_type``: ``[assignments, types]`` stage indices)."""
    index = {role: k for k, role in enumerate(types["role"])}
    type_of_head = heads["role"].map(index).to_numpy(int)
    depth = heads["relative_depth"].to_numpy(float)
    stages = stage_of_type[:, type_of_head]  # [assignments, heads]
    low = np.array([THIRDS[s][0] for s in STAGE_ORDER])[stages]
    high = np.array([THIRDS[s][1] for s in STAGE_ORDER])[stages]
    return ((depth >= low) & (depth < high)).mean(axis=1)


def type_order_test(types: pd.DataFrame, heads: pd.DataFrame, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """The type-level ordering test (module docstring). ``types``: :func:`type_table` rows of one model; ``heads``:
    its detected (head, role) rows with ``role`` and ``relative_depth`` (for the majority claim).

    Returns ``n_types, stages_present, tau, perm_p, min_p, exact, n_assignments, verdict, majority_share,
    majority_p, adjacent`` (per adjacent pair of present stages: the difference of their types' median depths).
    """
    labels = [STAGE_ORDER.index(s) for s in types["stage"]]
    depth = types["median_depth"].to_numpy(float)
    out: dict[str, Any] = {"n_types": len(types), "stages_present": sorted(set(types["stage"]), key=STAGE_ORDER.index),
                           "tau": None, "perm_p": None, "min_p": None, "exact": None, "n_assignments": None,
                           "majority_share": None, "majority_p": None, "adjacent": {}, "verdict": "inconclusive"}
    if len(types) < 2 or len(set(labels)) < 2:
        out["reason"] = "fewer than two stages with a detected type"
        return out
    null, exact = _null_labels(labels, seed)
    depth_signs = _pair_signs(depth)
    observed = float(_pair_signs(np.array(labels, float)) @ depth_signs)
    scores = _pair_signs(null.astype(float)) @ depth_signs  # [assignments] tau-b numerators
    hits, best_hits = int((scores >= observed - 1e-9).sum()), int((scores >= scores.max() - 1e-9).sum())
    extra = 0 if exact else 1  # Monte Carlo: the observed assignment counts as one more draw
    perm_p = (hits + extra) / (len(null) + extra)
    min_p = (best_hits + extra) / (len(null) + extra)
    tau = kendall_tau_b(np.array(labels), depth)
    majority_null = _majority_share(types, heads, null)
    majority = float(_majority_share(types, heads, np.array([labels]))[0])
    out.update(tau=tau, perm_p=float(perm_p), min_p=float(min_p), exact=exact, n_assignments=len(null),
               majority_share=majority, majority_p=float((majority_null >= majority - 1e-12).mean()))
    medians = types.groupby("stage")["median_depth"].median()
    present = out["stages_present"]
    out["adjacent"] = {f"{a}<{b}": float(medians[b] - medians[a]) for a, b in itertools.pairwise(present)}
    if min_p > alpha:
        out["reason"] = f"the smallest attainable p ({min_p:.3g}) is above alpha {alpha}: more types are needed"
    elif perm_p <= alpha:
        out["verdict"] = "consistent"
    elif tau <= 0:
        out["verdict"] = "inconsistent"
    else:
        out["reason"] = f"shallow-to-deep direction (tau {tau:.2f}) but p {perm_p:.3g} > alpha {alpha}"
    return out


VARIANTS = {
    "all": lambda rows: rows,
    "functional_only": lambda rows: rows[rows["functional"] == True] if "functional" in rows else rows.iloc[:0],  # noqa: E712
    "without_probe": lambda rows: rows[rows["method"] != "probe"] if "method" in rows else rows,
    "without_attribution": lambda rows: rows[rows["method"] != "attribution"] if "method" in rows else rows,
}
"""The test's variants: every detected head; only heads shown to matter (the causal check passed); without the
probe-found type (truthfulness); without the types found by direct logit attribution (memory, amplification), which
favours late layers by construction."""


def type_tests(rows: pd.DataFrame, model: str, alpha: float, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``stage_types.csv``'s rows for one model and :func:`type_order_test` under each of :data:`VARIANTS`."""
    hits = rows[rows["detected"].astype(bool)] if len(rows) else rows
    table = type_table(hits, model, seed=seed)
    tests = {}
    for name, select in VARIANTS.items():
        chosen = select(hits)
        tests[name] = type_order_test(type_table(chosen, model, resamples=1, seed=seed), chosen, alpha, seed)
    return table, tests
