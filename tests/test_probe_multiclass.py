"""Multiclass probes never crash on unconverged heads (issue 21): a rare class, string labels with one example per
class, and a max_iter too small to converge. Known answers from scikit-learn where the probe converges."""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "disabled"

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data import HeadCache, write_cache
from probes import ControlConfig, ProbeConfig, SplitConfig, probe
from probes.data import HeadMajor, build_problem
from probes.newton import fit_newton

ROWS, LAYERS, HEADS, D = 300, 1, 2, 6
QUIET = {"logger": "none", "control": ControlConfig(permutations=0, bootstrap=0)}


def _cache(path, y, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    classes = sorted(set(y.tolist()))
    codes = np.array([classes.index(v) for v in y])
    x = rng.normal(size=(len(y), LAYERS, HEADS, D)).astype(np.float32)
    x[:, 0, 1, :3] += signal * rng.normal(size=(len(classes), 3))[codes]  # head 1 carries the class
    return write_cache(path, [x[: len(y) // 2].astype(np.float16), x[len(y) // 2:].astype(np.float16)],
                       {"label": y}).path


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_a_probe_stopped_at_max_iter_reports_unconverged_heads_instead_of_crashing(tmp_path):
    y = np.arange(ROWS) % 3
    out = probe(_cache(tmp_path / "c", y), tmp_path / "r", probe=ProbeConfig(max_iter=2), **QUIET)
    summary = _summary(out)
    assert summary["not_converged"] >= 1
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == LAYERS * HEADS and heads["accuracy"].between(0, 1).all()


def test_a_rare_class_at_the_defaults(tmp_path):
    y = np.zeros(ROWS, int)
    y[::100] = 1  # 3 rows of class 1
    y[1::2] = 2
    out = probe(_cache(tmp_path / "c", y), tmp_path / "r", **QUIET)
    assert (pd.read_csv(out / "heads.csv")["accuracy"] > 0).all()


def test_string_labels_with_one_example_per_class(tmp_path):
    y = np.array(["a", "b"] * (ROWS // 2 - 1) + ["only-once", "also-once"], dtype=object)
    out = probe(_cache(tmp_path / "c", y), tmp_path / "r", **QUIET)
    assert len(pd.read_csv(out / "heads.csv")) == LAYERS * HEADS


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_with_a_rare_class_matches_sklearn_probabilities(tmp_path, seed):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, ROWS, p=[0.6, 0.35, 0.05])
    cache = HeadCache.open(_cache(tmp_path / "c", y, seed))
    cfg = ProbeConfig(l2=1e-2, tol=1e-7, max_iter=500)
    problem = build_problem(cache, cfg, SplitConfig(), ControlConfig(control_task=False))
    fits, _ = fit_newton(HeadMajor(cache.activations, problem.parts, 2), problem, cfg, cache.layers, cache.n_heads)
    assert fits.converged.all()
    x = cache.activations[:].astype(np.float32).reshape(ROWS, -1, D)
    train = problem.parts == 0
    for h in range(x.shape[1]):  # reference: scikit-learn on the same training rows, standardised per head
        scaler = StandardScaler().fit(x[train, h])
        model = LogisticRegression(C=1 / (cfg.l2 * train.sum()), max_iter=10000, tol=1e-10)
        model.fit(scaler.transform(x[train, h]), problem.y[train])
        expected = model.predict_proba(scaler.transform(x[:, h]))
        z = fits.scores[0][:, h]
        ours = np.exp(z - z.max(-1, keepdims=True))
        np.testing.assert_allclose(ours / ours.sum(-1, keepdims=True), expected, atol=2e-3)
