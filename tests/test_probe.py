"""The all-heads probe: agreement with scikit-learn, splits, controls, metrics, outputs and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score, r2_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from data import HeadCache, write_cache
from headlab.cli import build_parser, main
from headlab.errors import HeadlabError
from probes import ControlConfig, ProbeConfig, ReportConfig, SplitConfig, probe
from probes.data import HeadMajor, assign_parts, build_problem, control_labels
from probes.metrics import (
    auroc,
    bootstrap_metric,
    bootstrap_weights,
    expected_calibration_error,
    macro_f1,
    permutation_pvalues,
    r2,
)
from probes.newton import fit_newton
from probes.report import load_directions, plot_heatmap

ROWS, LAYERS, HEADS, D = 480, 2, 3, 8
SIGNAL = (1, 2)  # (layer, head) with the planted class signal


def planted(kind: str = "binary", rows: int = ROWS, seed: int = 0, strength: float = 0.9):
    """Activations ``[rows, layers, heads, d]`` with a label signal on 3 dimensions of head SIGNAL."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, LAYERS, HEADS, D)).astype(np.float32)
    if kind == "regression":
        y = rng.normal(size=rows)
        x[:, SIGNAL[0], SIGNAL[1], :3] += strength * y[:, None]
        return x, y
    classes = 2 if kind == "binary" else 3
    y = rng.integers(0, classes, rows)
    centres = rng.normal(size=(classes, 3)) * strength * 1.5
    x[:, SIGNAL[0], SIGNAL[1], :3] += centres[y]
    x[:, 0, 1, 0] += 0.25 * (y == 1)  # a weak second signal
    return x, y


def cache_of(path, x, y, **kw) -> HeadCache:
    shards = [x[: len(x) // 2].astype(np.float16), x[len(x) // 2:].astype(np.float16)]
    return write_cache(path, shards, {"label": y}, **kw)


@pytest.fixture(scope="module")
def binary_cache(tmp_path_factory):
    x, y = planted()
    return cache_of(tmp_path_factory.mktemp("binary") / "cache", x, y)


@pytest.fixture(scope="module")
def binary_run(binary_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "probe"
    probe(binary_cache.path, out, logger="none", report=ReportConfig(top_k=3))
    return out


def sklearn_reference(cache: HeadCache, train: np.ndarray, y: np.ndarray, l2: float, kind: str = "binary"):
    """Per-head scikit-learn fits on standardised inputs, computed independently of headlab: ``[rows, heads, k]``
    decision values (or predictions)."""
    x = cache.activations[:].astype(np.float32).reshape(cache.rows, -1, cache.d_head)
    out = []
    for h in range(x.shape[1]):
        scaler = StandardScaler().fit(x[train, h])
        n = int(train.sum())
        if kind == "regression":
            model = Ridge(alpha=l2 * n).fit(scaler.transform(x[train, h]), y[train])
            out.append(model.predict(scaler.transform(x[:, h]))[:, None])
        else:
            model = LogisticRegression(C=1 / (l2 * n), max_iter=10000, tol=1e-10)
            model.fit(scaler.transform(x[train, h]), y[train])
            out.append(np.atleast_2d(model.decision_function(scaler.transform(x[:, h]))).reshape(len(x), -1))
    return np.stack(out, 1)


def newton_scores(cache: HeadCache, cfg: ProbeConfig, control: bool = False):
    problem = build_problem(cache, cfg, SplitConfig(), ControlConfig(control_task=control))
    hm = HeadMajor(cache.activations, problem.parts, 4)
    fits, mass = fit_newton(hm, problem, cfg, cache.layers, cache.n_heads, workers=2)
    return problem, fits, mass


def test_newton_logistic_matches_sklearn_decision_values(binary_cache):
    cfg = ProbeConfig(l2=1e-2, tol=1e-7, max_iter=200)
    problem, fits, _ = newton_scores(binary_cache, cfg)
    reference = sklearn_reference(binary_cache, problem.parts == 0, problem.y, cfg.l2)
    assert fits.converged.all()
    np.testing.assert_allclose(fits.scores[0], reference, atol=2e-3)


def test_newton_multiclass_matches_sklearn_probabilities(tmp_path):
    x, y = planted("multiclass")
    cache = cache_of(tmp_path / "c", x, y)
    cfg = ProbeConfig(l2=1e-2, tol=1e-7, max_iter=300)
    problem, fits, _ = newton_scores(cache, cfg)
    reference = sklearn_reference(cache, problem.parts == 0, problem.y, cfg.l2, "multiclass")

    def softmax(z):
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    np.testing.assert_allclose(softmax(fits.scores[0]), softmax(reference), atol=2e-3)


def test_newton_ridge_matches_sklearn(tmp_path):
    x, y = planted("regression")
    cache = cache_of(tmp_path / "c", x, y)
    cfg = ProbeConfig(l2=1e-2)
    problem, fits, mass = newton_scores(cache, cfg)
    reference = sklearn_reference(cache, problem.parts == 0, problem.y, cfg.l2, "regression")
    np.testing.assert_allclose(fits.scores[0], reference, atol=1e-3)
    assert mass is None


def test_balanced_class_weights_match_sklearn_sample_weights(tmp_path):
    rng = np.random.default_rng(3)
    x, _ = planted()
    y = (rng.random(ROWS) < 0.2).astype(int)  # imbalanced
    x[:, SIGNAL[0], SIGNAL[1], 0] += y
    cache = cache_of(tmp_path / "c", x, y)
    cfg = ProbeConfig(l2=1e-2, class_weight="balanced", tol=1e-7, max_iter=300)
    problem, fits, _ = newton_scores(cache, cfg)
    train = problem.parts == 0
    h = SIGNAL[0] * HEADS + SIGNAL[1]
    xs = cache.activations[:].astype(np.float32).reshape(ROWS, -1, D)[:, h]
    scaler = StandardScaler().fit(xs[train])
    model = LogisticRegression(C=1 / (cfg.l2 * train.sum()), class_weight="balanced", max_iter=10000, tol=1e-10)
    model.fit(scaler.transform(xs[train]), y[train])
    np.testing.assert_allclose(fits.scores[0, :, h, 0], model.decision_function(scaler.transform(xs)), atol=2e-3)


def test_backends_agree_on_heldout_accuracy(binary_cache, tmp_path):
    """The issue's agreement test: the Lightning probe (adam), the newton solver and the sklearn loop."""
    accuracy = {}
    for name, cfg in {
        "sklearn": ProbeConfig(backend="sklearn"),
        "newton": ProbeConfig(solver="newton"),
        "adam": ProbeConfig(solver="adam", lr=0.02, epochs=200, batch_size=96, patience=0),
    }.items():
        probe(binary_cache.path, tmp_path / name, probe=cfg, logger="none",
              control=ControlConfig(control_task=False, permutations=0, bootstrap=0))
        accuracy[name] = pd.read_csv(tmp_path / name / "heads.csv")["accuracy"].to_numpy()
    assert np.abs(accuracy["newton"] - accuracy["sklearn"]).mean() <= 0.005
    assert np.abs(accuracy["adam"] - accuracy["sklearn"]).mean() <= 0.02
    for values in accuracy.values():
        assert values.argmax() == SIGNAL[0] * HEADS + SIGNAL[1]


def test_cli_probe_writes_the_contract_outputs(binary_cache, tmp_path):
    out = tmp_path / "run"
    assert main(["probe", "--cache", str(binary_cache.path), "--out", str(out), "--logger", "csv",
                 "--report.top_k", "2", "--control.permutations", "200"]) == 0
    heads = pd.read_csv(out / "heads.csv")
    assert {"layer", "head", "accuracy", "val_accuracy", "auroc", "ece", "selectivity", "p_value"} <= set(heads)
    assert len(heads) == LAYERS * HEADS
    summary = json.loads((out / "summary.json").read_text())
    best = summary["top_heads"][0]
    assert (best["layer"], best["head"]) == SIGNAL
    assert (out / "heatmap.png").stat().st_size > 0
    tensors, meta = load_directions(out / "directions.safetensors")
    assert tensors["probe_weight"].shape == (LAYERS, HEADS, D, 1)
    assert tensors["mass_mean_direction"].shape == (LAYERS, HEADS, 1, D)
    assert json.loads(meta["layers"]) == [0, 1]
    logged = pd.read_csv(out / "lightning_logs" / "metrics.csv")  # the CSV logger holds the summary's scalars
    assert logged["max_accuracy"].dropna().iloc[-1] == pytest.approx(summary["max_accuracy"])
    assert summary["max_accuracy"] == pytest.approx(heads["accuracy"].max())


def test_saved_config_reloads_with_config_flag(binary_run):
    parser, _ = build_parser("probe")
    cfg = parser.parse_args(["--config", str(binary_run / "config.yaml")])
    assert cfg.report.top_k == 3
    assert str(cfg.out) == str(binary_run)


def test_reported_scores_come_from_test_rows_and_saved_weights(binary_cache, binary_run):
    """Recompute the top head's test accuracy from directions.safetensors alone."""
    heads = pd.read_csv(binary_run / "heads.csv")
    problem = build_problem(binary_cache, ProbeConfig(), SplitConfig(), ControlConfig())
    test = problem.parts == 2
    tensors, _ = load_directions(binary_run / "directions.safetensors")
    layer, head = SIGNAL
    x = binary_cache.activations[:, layer, head].astype(np.float32)
    logits = x @ tensors["probe_weight"][layer, head, :, 0] + tensors["probe_bias"][layer, head, 0]
    expected = ((logits > 0) == problem.y)[test].mean()
    row = heads[(heads.layer == layer) & (heads["head"] == head)].iloc[0]
    assert row["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert row["rank"] == 1  # chosen on validation rows, not on the test rows reported


def test_splits_are_seeded_and_keep_groups_together():
    groups = np.repeat(np.arange(60), 5)
    a, _ = assign_parts(300, groups, SplitConfig(seed=1))
    b, _ = assign_parts(300, groups, SplitConfig(seed=1))
    c, _ = assign_parts(300, groups, SplitConfig(seed=2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for g in range(60):
        assert len(set(a[groups == g])) == 1
    shares = np.bincount(a) / 300
    np.testing.assert_allclose(shares, [0.6, 0.2, 0.2], atol=0.05)


def test_kfold_reports_fold_spread(binary_cache, tmp_path):
    probe(binary_cache.path, tmp_path / "cv", split=SplitConfig(folds=3), logger="none",
          control=ControlConfig(permutations=0, bootstrap=0))
    heads = pd.read_csv(tmp_path / "cv" / "heads.csv")
    assert {"cv_accuracy_mean", "cv_accuracy_std", "accuracy"} <= set(heads)
    best = heads.sort_values("rank").iloc[0]
    assert (best["layer"], best["head"]) == SIGNAL
    assert best["cv_accuracy_std"] > 0


def test_control_labels_are_constant_per_type_and_follow_label_balance():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    types = rng.integers(0, 50, 2000)
    control = control_labels(y, types, np.ones(2000, bool), seed=0)
    for t in range(50):
        assert len(set(control[types == t])) == 1
    assert 0.3 < control.mean() < 0.7


def test_selectivity_separates_the_planted_head(binary_run):
    heads = pd.read_csv(binary_run / "heads.csv")
    signal = heads[(heads.layer == SIGNAL[0]) & (heads["head"] == SIGNAL[1])].iloc[0]
    assert signal["selectivity"] > 0.15
    assert signal["p_value"] < 0.01
    noise = heads[(heads.layer == 0) & (heads["head"] == 2)].iloc[0]
    assert noise["p_value"] > 0.01


def test_mass_mean_direction_is_the_class_mean_difference(binary_cache):
    problem, _, mass = newton_scores(binary_cache, ProbeConfig())
    train = problem.parts == 0
    x = binary_cache.activations[:, SIGNAL[0], SIGNAL[1]].astype(np.float64)[train]
    y = problem.y[train]
    theta = x[y == 1].mean(0) - x[y == 0].mean(0)
    h = SIGNAL[0] * HEADS + SIGNAL[1]
    np.testing.assert_allclose(mass.direction[h, 0], theta / np.linalg.norm(theta), atol=1e-5)
    np.testing.assert_allclose(mass.std[h, 0], (x @ (theta / np.linalg.norm(theta))).std(), rtol=1e-4)


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = rng.normal(size=(300, 4)) + y[:, None] * np.array([0, 0.5, 1, 2])
    np.testing.assert_allclose(auroc(scores, y), [roc_auc_score(y, scores[:, h]) for h in range(4)])
    y3 = rng.integers(0, 3, 300)
    pred = np.where(rng.random((300, 4)) < 0.6, y3[:, None], rng.integers(0, 3, (300, 4)))
    np.testing.assert_allclose(macro_f1(pred, y3, 3), [f1_score(y3, pred[:, h], average="macro") for h in range(4)])
    target = rng.normal(size=300)
    yhat = target[:, None] + rng.normal(size=(300, 4))
    np.testing.assert_allclose(r2(yhat, target), [r2_score(target, yhat[:, h]) for h in range(4)])


def test_calibration_error_by_hand():
    # two bins: 0.9-confidence rows 1/2 correct -> |0.5 - 0.9| ; 0.6-confidence rows all correct -> |1 - 0.6|
    probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.4, 0.6], [0.4, 0.6]])[:, None, :]
    y = np.array([1, 0, 1, 1])
    ece = expected_calibration_error(probs, y, bins=10)
    assert ece[0] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_bootstrap_interval_covers_the_point_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random((400, 3)) < 0.8, y[:, None], 1 - y[:, None])
    samples = bootstrap_metric(pred, y, "accuracy", 2, bootstrap_weights(400, None, 500, 0))
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    point = (pred == y[:, None]).mean(0)
    assert np.all(lo < point) and np.all(point < hi)
    assert np.all(hi - lo < 0.12)


def test_permutation_pvalues_match_a_brute_force_loop():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    pred = np.stack([y, rng.integers(0, 2, 60), np.where(rng.random(60) < 0.65, y, 1 - y)], 1)
    p = permutation_pvalues(pred, y, "binary", 2, 200, seed=5)
    perm_rng = np.random.default_rng(5 + 104729)
    perms = [perm_rng.permutation(60) for _ in range(200)]
    for h in range(3):
        observed = (pred[:, h] == y).sum()
        exceed = sum((pred[:, h] == y[q]).sum() >= observed for q in perms)
        assert p[h] == pytest.approx((1 + exceed) / 201)
    assert p[0] == pytest.approx(1 / 201)


def test_heatmap_is_readable_at_32_by_32(tmp_path):
    frame = pd.DataFrame({"layer": np.repeat(np.arange(32), 32), "head": np.tile(np.arange(32), 32),
                          "accuracy": np.random.default_rng(0).uniform(0.45, 0.95, 1024)})
    frame["rank"] = frame["accuracy"].rank(ascending=False).astype(int)
    path = plot_heatmap(tmp_path / "h.png", frame, 32, 32, list(range(32)), "accuracy", frame.nsmallest(10, "rank"),
                        "test")
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert width / 32 >= 25 and height / 32 >= 20  # pixels per cell


# bad input: one line each


def test_cache_without_labels(tmp_path):
    x, _ = planted()
    cache = write_cache(tmp_path / "c", x.astype(np.float16), {})
    with pytest.raises(HeadlabError, match="no label columns"):
        probe(cache.path, tmp_path / "r", logger="none")


def test_label_with_one_class(tmp_path):
    x, _ = planted()
    cache = write_cache(tmp_path / "c", x.astype(np.float16), {"label": np.ones(ROWS, int)},
                        label_schema={"label": {"kind": "binary", "classes": [1]}})
    with pytest.raises(HeadlabError, match="one class only"):
        probe(cache.path, tmp_path / "r", logger="none")


def test_missing_label_column(binary_cache, tmp_path):
    with pytest.raises(HeadlabError, match="no label column 'truth'"):
        probe(binary_cache.path, tmp_path / "r", probe=ProbeConfig(label="truth"), logger="none")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("row", [10, ROWS - 3])  # a training row or (likely) a held-out row
def test_nan_or_inf_activations(tmp_path, bad, row):
    x, y = planted()
    x[row, 1, 0, 3] = bad
    cache = cache_of(tmp_path / "c", x, y)
    with pytest.raises(HeadlabError, match=r"NaN or inf activations.*layer 1, head 0"):
        probe(cache.path, tmp_path / "r", logger="none")


def test_damaged_shard_fails_its_checksum(tmp_path):
    x, y = planted()
    cache = cache_of(tmp_path / "c", x, y)
    shard = cache.path / cache.manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(HeadlabError, match="fails its checksum"):
        probe(cache.path, tmp_path / "r", logger="none")
    assert not (tmp_path / "r" / "heads.csv").exists()


def test_more_heads_requested_than_exist(binary_cache, tmp_path, capsys):
    code = main(["probe", "--cache", str(binary_cache.path), "--out", str(tmp_path / "r"), "--logger", "none",
                 "--report.top_k", "7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "more heads than the cache has" in err[0] and "2 layers x 3 heads" in err[0]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "probe").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_probe_configs_parse(path):
    parser, _ = build_parser("probe")
    cfg = parser.parse_args(["--config", str(path), "--cache", "somewhere"])
    assert cfg.probe.l2 > 0


def test_multiclass_grouped_run_reports_macro_f1_with_intervals(tmp_path):
    x, y = planted("multiclass")
    groups = np.repeat(np.arange(ROWS // 4), 4)
    cache = cache_of(tmp_path / "c", x, y, groups=groups)
    probe(cache.path, tmp_path / "r", logger="none", control=ControlConfig(permutations=100, bootstrap=100))
    heads = pd.read_csv(tmp_path / "r" / "heads.csv")
    assert {"accuracy", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "ece", "mass_mean_accuracy"} <= set(heads)
    best = heads.sort_values("rank").iloc[0]
    assert (best["layer"], best["head"]) == SIGNAL
    assert best["macro_f1_ci_low"] <= best["macro_f1"] <= best["macro_f1_ci_high"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["problem"]["grouped"] is True


def test_regression_run_reports_r2(tmp_path):
    x, y = planted("regression")
    cache = cache_of(tmp_path / "c", x, y)
    probe(cache.path, tmp_path / "r", logger="none", control=ControlConfig(permutations=100, bootstrap=100))
    heads = pd.read_csv(tmp_path / "r" / "heads.csv")
    assert {"r2", "val_r2", "r2_ci_low", "r2_ci_high", "p_value", "control_r2", "selectivity"} <= set(heads)
    assert "accuracy" not in heads
    best = heads.sort_values("rank").iloc[0]
    assert (best["layer"], best["head"]) == SIGNAL and best["r2"] > 0.3
    tensors, _ = load_directions(tmp_path / "r" / "directions.safetensors")
    assert "mass_mean_direction" not in tensors


# degenerate numbers


def test_damped_inverse_handles_a_singular_matrix():
    from probes.objective import damped_inverse

    singular = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    inverse = damped_inverse(singular)
    assert np.isfinite(inverse).all()
    b = singular @ np.array([1.0, 2.0, -1.0])  # a right-hand side in the matrix's range
    np.testing.assert_allclose(singular @ (inverse @ b), b, atol=1e-3)  # still solves it
    regular = np.array([[2.0, 1.0], [1.0, 3.0]])
    np.testing.assert_allclose(damped_inverse(regular), np.linalg.inv(regular))


def test_degenerate_heads_never_crash_the_probe_and_are_named(tmp_path):
    """A head that outputs zeros, a head with a near-constant float16 dimension (std ~5e-5, the SmolLM2 case that
    made the exact Newton step singular) on nearly separable labels, and a normal head with the signal."""
    rng = np.random.default_rng(3)
    rows = 400
    y = np.arange(rows) % 2
    x = rng.normal(size=(rows, LAYERS, HEADS, D)).astype(np.float32)
    x[:, 0, 0] = 0.0  # a head that outputs zeros
    x[:, 0, 1] += 4.0 * (2 * y[:, None] - 1)  # nearly separable: exact Newton steps finish it
    x[:, 0, 1, 2] = 1.0 + 5e-5 * rng.normal(size=rows)  # one near-constant dimension
    x[:, SIGNAL[0], SIGNAL[1], :3] += 1.5 * y[:, None]
    cache = write_cache(tmp_path / "c", x.astype(np.float16), {"label": y})
    out = probe(cache.path, tmp_path / "r", logger="none", control=ControlConfig(permutations=0, bootstrap=0))
    heads = pd.read_csv(out / "heads.csv").set_index(["layer", "head"])
    assert np.isfinite(heads["accuracy"]).all()
    assert heads.loc[(0, 0), "degenerate_dims"] == D and heads.loc[(0, 1), "degenerate_dims"] == 1
    assert (heads.drop([(0, 0), (0, 1)])["degenerate_dims"] == 0).all()
    assert heads.loc[(0, 1), "accuracy"] > 0.95 and heads.loc[SIGNAL, "accuracy"] > 0.8
    assert heads.loc[(0, 0), "accuracy"] < 0.65  # zeros carry nothing
    summary = json.loads((out / "summary.json").read_text())
    named = {(h["layer"], h["head"]): h["dims"] for h in summary["degenerate_heads"]}
    assert named == {(0, 0): D, (0, 1): 1}


def test_standardisation_floor_known_answer():
    from probes.data import STD_FLOOR, standardisation_scale

    std = np.array([[1.0, 2.0, 3.0, 1e-6], [0.0, 0.0, 0.0, 0.0]])
    scale, flat = standardisation_scale(std)
    median = np.median(std[0])  # 1.5
    np.testing.assert_allclose(scale[0], [1.0, 2.0, 3.0, STD_FLOOR * median])
    np.testing.assert_allclose(scale[1], 1e-5)
    assert flat.tolist() == [[False, False, False, True], [True] * 4]


def test_exact_newton_survives_an_exactly_singular_hessian():
    """A dimension that is zero in every row, with no penalty: the Hessian has a zero row and column, which
    np.linalg.solve refuses ("Singular matrix"); the damped step still fits the informative dimension."""
    from probes.newton import _exact_newton

    rng = np.random.default_rng(0)
    n = 200
    y = (np.arange(n) % 2).astype(np.float64)
    x = np.zeros((n, 2), np.float32)
    x[:, 0] = (2 * y - 1) * 0.5 + rng.normal(size=n).astype(np.float32)  # informative, overlapping classes
    u = np.zeros((3, 1))
    z = np.zeros((n, 1), np.float32)
    _, converged = _exact_newton(x, u, z, y, np.full(n, 1.0 / n), np.zeros(3), tol=1e-4, max_steps=50)
    assert converged and np.isfinite(u).all() and u[1, 0] == 0.0
    reference = LogisticRegression(C=1e12, max_iter=10_000, tol=1e-10).fit(x[:, :1], y)  # unpenalised optimum
    np.testing.assert_allclose(u[0, 0], reference.coef_[0, 0], rtol=1e-3)


@pytest.mark.parametrize("offset", [0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_newton_matches_sklearn_on_small_outputs_far_from_zero(tmp_path, offset, seed):
    """Heads like SmolLM2's L18H7: 64 float16 dimensions whose spread (0.002) is 50-500x smaller than their mean,
    on 180 training rows (nearly separable). Uncentred, the float32 Gram's rounding broke the bound-optimisation
    step and Newton diverged to inf; with the tolerance on the raw gradient it stopped far from the optimum."""
    rng = np.random.default_rng(seed)
    rows, d = 300, 64
    y = np.arange(rows) % 2
    x = rng.normal(size=(rows, 1, 2, d))
    x[:, 0, 1, :4] += 0.6 * (2 * y[:, None] - 1)
    x = (rng.uniform(-offset, offset, size=(1, 1, 2, d)) + 0.002 * x).astype(np.float16)
    cache = write_cache(tmp_path / "c", x, {"label": y})
    cfg = ProbeConfig(tol=1e-5)
    problem, fits, _ = newton_scores(cache, cfg)
    reference = sklearn_reference(cache, problem.parts == 0, problem.y, cfg.l2)
    assert fits.converged.all()
    np.testing.assert_allclose(fits.scores[0], reference, atol=0.03)  # decision values reach +-36
