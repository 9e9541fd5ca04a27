"""Statistics that say when they cannot be trusted (probes/trust.py): each floor tripped by a planted case and
not tripped just above it; intervals and selectivity withheld where they would be numbers without meaning."""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "disabled"

import json

import numpy as np
import pandas as pd

from data import write_cache
from probes import ControlConfig, probe
from probes.trust import MIN_TEST_ROWS, MIN_UNITS


def _run(tmp_path, rows: int, groups: int | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 2
    x = rng.normal(size=(rows, 1, 2, 4)).astype(np.float32)
    x[:, 0, 1, 0] += 2.0 * y
    grouping = None if groups is None else (np.arange(rows) // 2) % groups  # both classes in every group
    cache = write_cache(tmp_path / "c", x.astype(np.float16), {"label": y}, groups=grouping).path
    out = probe(cache, tmp_path / "r", logger="none", control=ControlConfig(permutations=0, bootstrap=50))
    return json.loads((out / "summary.json").read_text()), pd.read_csv(out / "heads.csv")


def test_one_test_group_gives_no_zero_width_interval_and_no_selectivity(tmp_path):
    summary, heads = _run(tmp_path, rows=200, groups=4)
    assert not summary["trusted"]
    text = " ".join(summary["warnings"])
    assert "bootstrap groups" in text and "selectivity is not reported" in text
    assert "accuracy_ci_low" not in heads  # no [0.933, 0.933]
    assert heads["selectivity"].isna().all()


def test_six_rows_are_flagged(tmp_path):
    summary, heads = _run(tmp_path, rows=6, groups=None)
    assert not summary["trusted"]
    assert any(f"(floor {MIN_TEST_ROWS})" in w for w in summary["warnings"])
    assert any(f"(floor {MIN_UNITS})" in w for w in summary["warnings"]) and "accuracy_ci_low" not in heads


def test_above_every_floor_nothing_is_withheld(tmp_path):
    summary, heads = _run(tmp_path, rows=600, groups=60)
    assert summary["trusted"] and summary["warnings"] == []
    assert heads["accuracy_ci_low"].notna().all() and heads["selectivity"].notna().all()
    assert (heads["accuracy_ci_low"] < heads["accuracy_ci_high"]).any()


def test_identical_inputs_share_one_control_label_and_give_no_selectivity(tmp_path):
    """200 copies of one text: every row has the same activations, so they are one input type (Hewitt & Liang's
    repeated word), the control labels take one value and selectivity is withheld (it read +0.175 on every head,
    a number made by the split alone)."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(1, 2, 2, 4)), 200, axis=0).astype(np.float16)
    y = rng.permutation(np.arange(200) % 2)
    cache = write_cache(tmp_path / "c", x, {"label": y}).path
    out = probe(cache, tmp_path / "r", logger="none", control=ControlConfig(permutations=0, bootstrap=50))
    summary, heads = json.loads((out / "summary.json").read_text()), pd.read_csv(out / "heads.csv")
    assert any("selectivity is not reported" in w for w in summary["warnings"])
    assert heads["selectivity"].isna().all()


def test_distinct_inputs_keep_one_control_label_each(tmp_path):
    """The positive control: the same labels on distinct inputs (and repeated pairs) keep a control task with both
    labels, and rows repeating one input share its label."""
    from data import HeadCache
    from probes import ProbeConfig, SplitConfig
    from probes.data import build_problem, input_types

    rng = np.random.default_rng(1)
    distinct = rng.normal(size=(100, 2, 2, 4))
    x = np.concatenate([distinct, distinct]).astype(np.float16)  # every input twice
    cache = write_cache(tmp_path / "c", x, {"label": np.arange(200) % 2})
    types = input_types(HeadCache.open(cache.path))
    assert len(np.unique(types)) == 100 and (types[:100] == types[100:]).all()
    problem = build_problem(HeadCache.open(cache.path), ProbeConfig(), SplitConfig(), ControlConfig())
    control = problem.fits[problem.control_fit].target
    assert (control[:100] == control[100:]).all() and len(np.unique(control)) == 2
