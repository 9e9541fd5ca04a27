"""The type-level ordering test of the stage map (roles/stages/types.py): known answers worked by hand, Kendall's
tau-b against scipy, the exact null against brute-force enumeration, and its calibration (false-positive rate on
types without order) and power (a planted shallow-to-deep order)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, kendalltau

from roles.stages.types import kendall_tau_b, stage_assignments, type_order_test, type_table

STAGES = ["KR", "ICI", "LR", "EP"]


def _types(stages: list[str], depths: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One detected head per type, at its type's depth: (type rows, head rows)."""
    roles = [f"role{k}" for k in range(len(stages))]
    heads = pd.DataFrame({"role": roles, "stage": stages, "relative_depth": depths, "detected": True,
                          "functional": True})
    return type_table(heads, "m", resamples=50), heads


def test_one_type_per_stage_in_order_is_consistent_at_the_smallest_p_four_labels_allow():
    types, heads = _types(STAGES, [0.1, 0.3, 0.5, 0.9])
    result = type_order_test(types, heads, alpha=0.05)
    assert result["tau"] == pytest.approx(1.0)
    assert result["perm_p"] == pytest.approx(1 / 24) and result["min_p"] == pytest.approx(1 / 24)  # 4! orders
    assert result["exact"] and result["n_assignments"] == 24 and result["verdict"] == "consistent"


def test_the_reverse_order_is_inconsistent():
    types, heads = _types(STAGES, [0.9, 0.5, 0.3, 0.1])
    result = type_order_test(types, heads, alpha=0.05)
    assert result["tau"] == pytest.approx(-1.0) and result["perm_p"] == pytest.approx(1.0)
    assert result["verdict"] == "inconsistent"


def test_one_swapped_pair_by_hand():
    # stages 0 1 2 3 at depths 0.1 0.3 0.2 0.4: 5 concordant pairs, 1 discordant, S = 4, tau = 4/6. Orders of four
    # distinct labels with S >= 4 have at most one inversion: the identity and the 3 adjacent swaps, p = 4/24.
    types, heads = _types(STAGES, [0.1, 0.3, 0.2, 0.4])
    result = type_order_test(types, heads, alpha=0.05)
    assert result["tau"] == pytest.approx(4 / 6) and result["perm_p"] == pytest.approx(4 / 24)
    assert result["verdict"] == "inconclusive" and "p" in result["reason"]  # right direction, not significant


def test_three_types_cannot_reach_alpha_and_say_so():
    types, heads = _types(["KR", "LR", "EP"], [0.1, 0.5, 0.9])
    result = type_order_test(types, heads, alpha=0.05)
    assert result["min_p"] == pytest.approx(1 / 6) and result["verdict"] == "inconclusive"
    assert "smallest attainable p" in result["reason"]


def test_tau_b_equals_scipys_with_ties():
    generator = np.random.default_rng(0)
    for _ in range(50):
        x = generator.integers(0, 4, 9)
        y = np.round(generator.random(9), 1)
        if np.ptp(x) and np.ptp(y):
            assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)


def test_the_null_enumerates_each_distinct_assignment_once():
    labels = [0, 0, 1, 2, 2, 3, 3]
    mine = list(stage_assignments(labels))
    brute = set(itertools.permutations(labels))
    assert len(mine) == len(set(mine)) == len(brute) == math.factorial(7) // (2 * 2 * 2)
    assert set(mine) == brute


def test_majority_share_and_its_null_by_hand():
    # KR at 0.1 (shallow third), ICI and LR at 0.5 (middle), EP at 0.9 (deep): all four in their stage's third.
    # Under the 24 label orders the share stays 1 only when KR and EP keep their places (ICI and LR share a
    # third): 2 of 24.
    types, heads = _types(STAGES, [0.1, 0.5, 0.5, 0.9])
    result = type_order_test(types, heads)
    assert result["majority_share"] == 1.0 and result["majority_p"] == pytest.approx(2 / 24)


def test_type_table_counts_medians_and_functional_heads():
    rows = pd.DataFrame({"role": ["a", "a", "a", "b", "b"], "stage": ["KR", "KR", "KR", "EP", "EP"],
                         "relative_depth": [0.1, 0.2, 0.9, 0.7, 0.8], "detected": [True, True, True, True, False],
                         "functional": [True, None, False, True, True]})
    table = type_table(rows, "m", resamples=200).set_index("role")
    assert table.loc["a", "n_detected"] == 3 and table.loc["a", "n_functional"] == 1  # None is not functional
    assert table.loc["a", "median_depth"] == pytest.approx(0.2) and table.loc["b", "n_detected"] == 1
    assert table.loc["a", "depth_lo"] >= 0.1 and table.loc["a", "depth_hi"] <= 0.9
    assert table.loc["b", "depth_lo"] == table.loc["b", "depth_hi"] == pytest.approx(0.7)


def _random_types(generator, planted: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    stages = ["KR", "KR", "ICI", "ICI", "LR", "LR", "EP", "EP"]  # 8!/(2!^4) = 2,520 assignments, min p 16/2520
    base = np.array([0.1, 0.15, 0.35, 0.4, 0.55, 0.6, 0.8, 0.9]) if planted else generator.random(8)
    return _types(stages, list(np.clip(base + generator.normal(0, 0.08 if planted else 0, 8), 0, 1)))


@pytest.mark.slow
def test_calibration_no_order_is_called_consistent_at_most_at_alpha():
    generator = np.random.default_rng(1)
    runs = 200
    hits = sum(type_order_test(*_random_types(generator, planted=False), alpha=0.05)["verdict"] == "consistent"
               for _ in range(runs))
    # false-positive rate at alpha 0.05: the exact null is valid, so the 99% binomial upper bound must cover 0.05
    assert binomtest(hits, runs, 0.05, alternative="greater").pvalue > 0.01, hits


def test_power_a_planted_order_is_found():
    generator = np.random.default_rng(2)
    runs = 50
    hits = sum(type_order_test(*_random_types(generator, planted=True), alpha=0.05)["verdict"] == "consistent"
               for _ in range(runs))
    assert hits >= 0.8 * runs, hits
