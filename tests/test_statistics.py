"""The statistical rules against independent references: scipy's own tests and corrections, scikit-learn's metrics,
and hand-worked cases. These are the tests the mutation check (``benchmarks/mutation_check.py``) runs first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control, norm, ttest_1samp
from sklearn.metrics import f1_score, r2_score, roc_auc_score

from headlab.statistics import (
    benjamini_hochberg,
    draws_for,
    min_attainable_p,
    monte_carlo_p,
    paired_greater_p,
    sign_flip_p,
)
from probes import metrics
from roles.evidence import Evidence, attention_evidence, indicator_evidence, masked_attention, shifted
from roles.rule import FLOORS, apply_rule, floor_of

RNG = np.random.default_rng(7)


# ---- headlab.statistics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 7, 50])
def test_benjamini_hochberg_matches_scipy(size):
    p = RNG.uniform(0, 0.2, size)
    p[0] = 0.9  # a large one, so the cap and the running minimum both act
    assert benjamini_hochberg(p) == pytest.approx(false_discovery_control(p, method="bh"), rel=1e-12)
    grid = p.reshape(-1, 1)  # shape kept
    assert benjamini_hochberg(grid).shape == grid.shape
    assert benjamini_hochberg(np.zeros(0)).size == 0


def test_benjamini_hochberg_hand_worked():
    # sorted p 0.01, 0.02, 0.03, 0.5 of m = 4: p * m / k = 0.04, 0.04, 0.04, 0.5
    assert benjamini_hochberg(np.array([0.5, 0.03, 0.01, 0.02])).tolist() == pytest.approx([0.5, 0.04, 0.04, 0.04])
    # capped at 1: 0.9 * 2 / 1 = 1.8 for the smallest, running minimum from the largest (0.95 * 2 / 2)
    assert benjamini_hochberg(np.array([0.9, 0.95])).tolist() == pytest.approx([0.95, 0.95])


def test_paired_greater_p_matches_scipy_one_sided_t_test():
    d = RNG.normal(0.2, 1.0, (12, 3, 4))
    d[0, 0, 0] = np.nan  # a unit without a matched pair is left out of its column
    expected = np.empty((3, 4))
    for a in range(3):
        for b in range(4):
            column = d[:, a, b]
            expected[a, b] = ttest_1samp(column[~np.isnan(column)], 0.0, alternative="greater").pvalue
    assert paired_greater_p(d) == pytest.approx(expected, rel=1e-9)


def test_paired_greater_p_degenerate_columns():
    d = np.array([[0.3, -0.3, 0.0, 1.0], [0.3, -0.3, 0.0, np.nan], [0.3, -0.3, 0.0, np.nan]])
    # constant positive -> 0; constant negative or zero -> 1; one sample -> 1
    assert paired_greater_p(d).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert paired_greater_p(np.array([[0.5], [-0.1]])).item() == pytest.approx(
        ttest_1samp([0.5, -0.1], 0.0, alternative="greater").pvalue)


def test_monte_carlo_p_and_its_floor_by_hand():
    # |observed| = 2; references 3, -2.5 and 2 reach it, 1 and -0.5 do not: p = (1 + 3) / (1 + 5)
    assert monte_carlo_p(-2.0, [3.0, -2.5, 2.0, 1.0, -0.5]) == pytest.approx(4 / 6)
    assert monte_carlo_p(5.0, [1.0] * 19) == pytest.approx(1 / 20)
    assert min_attainable_p(19) == pytest.approx(0.05) and min_attainable_p(99) == pytest.approx(0.01)
    assert (draws_for(0.05), draws_for(0.01), draws_for(0.04), draws_for(0.5), draws_for(2.0)) == (19, 99, 24, 1, 1)


def test_sign_flip_p_on_known_answers():
    # five positive differences: a sign flip reaches their mean only when every sign is +, P = 1/32
    p = sign_flip_p(np.ones((5, 1)), draws=20000, seed=0)
    assert p.item() == pytest.approx(1 / 32, abs=0.004)
    # the same at a scale of 1e-7 (the tolerance is relative to the observed mean, not absolute)
    assert sign_flip_p(1e-7 * np.ones((5, 1)), draws=20000, seed=0).item() == pytest.approx(1 / 32, abs=0.004)
    # all negative: every flipped mean reaches it, p = (1 + draws) / (1 + draws) = 1, over several chunks too
    assert sign_flip_p(-np.ones((4, 2)), draws=10, seed=0, chunk=4).tolist() == [1.0, 1.0]
    # mixed magnitudes: of the 2^4 sign vectors, 4 reach the observed sum 4 (+3, with 4 of the 8 sign patterns of
    # the other three adding at least 1): P = 1/4
    d = np.array([3.0, 1.0, 1.0, -1.0])[:, None]
    signs = np.array(np.meshgrid(*[[-1, 1]] * 4)).reshape(4, -1).T
    exact = np.mean(signs @ d[:, 0] >= d[:, 0].sum())
    assert exact == pytest.approx(1 / 4)
    assert sign_flip_p(d, draws=40000, seed=2).item() == pytest.approx(exact, abs=0.006)


# ---- roles.evidence -----------------------------------------------------------------------------------------------

def test_shifted_moves_along_the_key_axis_and_fills_false():
    mask = torch.tensor([[True, False, True, False]])
    assert shifted(mask, 1).tolist() == [[False, True, False, True]]
    assert shifted(mask, -1).tolist() == [[False, True, False, False]]
    assert shifted(mask, 0).tolist() == mask.tolist() and shifted(mask, 0) is not mask


def test_masked_attention_averages_only_queries_with_a_target():
    patterns = torch.zeros(2, 1, 1, 3, 3)
    patterns[0, 0, 0, 1] = torch.tensor([0.25, 0.75, 0.0])
    patterns[0, 0, 0, 2] = torch.tensor([0.1, 0.2, 0.7])
    patterns[1, 0, 0, 2] = torch.tensor([0.5, 0.5, 0.0])
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 1, 0] = mask[0, 2, 0] = mask[0, 2, 1] = mask[1, 2, 1] = True
    # queries (0, 1): 0.25; (0, 2): 0.1 + 0.2; (1, 2): 0.5 -> mean over the 3 queries with a target
    assert masked_attention(patterns, mask).item() == pytest.approx((0.25 + 0.3 + 0.5) / 3)
    assert masked_attention(patterns, torch.zeros_like(mask)).tolist() == [[0.0]]


def test_attention_evidence_pairs_each_target_with_its_control_key():
    patterns = torch.zeros(2, 1, 1, 4, 4)
    patterns[0, 0, 0, 3] = torch.tensor([0.1, 0.2, 0.6, 0.1])  # target key 2, control key 1 (delta -1)
    patterns[1, 0, 0, 3] = torch.tensor([0.3, 0.4, 0.2, 0.1])
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    target[:, 3, 2] = True
    allowed = torch.ones(2, 4, 4, dtype=torch.bool).tril(-1)
    e = attention_evidence(patterns, target, -1, allowed)
    assert e.differences[:, 0, 0].tolist() == pytest.approx([0.6 - 0.2, 0.2 - 0.4])
    assert e.score.item() == pytest.approx((0.6 + 0.2) / 2) and e.control.item() == pytest.approx((0.2 + 0.4) / 2)
    # with key 1 a target too, key 2's control (key 1) is a target: key 2 leaves the comparison (not the score),
    # and key 1 is compared with key 0
    target[:, 3, 1] = True
    e = attention_evidence(patterns, target, -1, allowed)
    assert e.differences[:, 0, 0].tolist() == pytest.approx([0.2 - 0.1, 0.4 - 0.3])
    assert e.score.item() == pytest.approx((0.8 + 0.6) / 2)


def test_attention_evidence_averages_the_queries_of_a_sequence():
    # two queries with a matched pair in one sequence: the sample is the mean of their differences
    patterns = torch.zeros(1, 1, 1, 4, 4)
    patterns[0, 0, 0, 2] = torch.tensor([0.2, 0.7, 0.1, 0.0])  # query 2: target 1, control 0
    patterns[0, 0, 0, 3] = torch.tensor([0.1, 0.1, 0.5, 0.3])  # query 3: target 2, control 1
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, 2, 1] = target[0, 3, 2] = True
    e = attention_evidence(patterns, target, -1, torch.ones(1, 4, 4, dtype=torch.bool).tril(-1))
    assert e.differences.item() == pytest.approx(((0.7 - 0.2) + (0.5 - 0.1)) / 2)
    assert e.control.item() == pytest.approx((0.2 + 0.1) / 2)


def test_attention_evidence_without_any_matched_pair_has_zero_controls_per_head():
    patterns = torch.full((1, 2, 3, 3, 3), 1 / 3)
    target = torch.zeros(1, 3, 3, dtype=torch.bool)
    target[0, 2, 0] = True  # its control key (-1) falls outside the sequence
    e = attention_evidence(patterns, target, -1, torch.ones(1, 3, 3, dtype=torch.bool))
    assert e.control.shape == (2, 3) and e.control.abs().sum() == 0
    assert torch.isnan(e.differences).all() and e.score.shape == (2, 3)


def test_indicator_evidence_over_layers_and_heads():
    hits = torch.zeros(2, 3, 4)
    hits[1, 2] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    control = torch.zeros(2, 3, 4)
    control[0, 1, 0] = 1.0
    e = indicator_evidence(hits, control)
    assert e.score.shape == (2, 3) and e.score[1, 2] == 0.75 and e.control[0, 1] == 0.25
    assert e.differences.shape == (4, 2, 3) and e.differences[:, 1, 2].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_indicator_evidence_rates_and_differences():
    hits = torch.tensor([[1, 1, 0, 1]])
    control = torch.tensor([[0, 1, 0, 0]])
    e = indicator_evidence(hits, control)
    assert e.score.tolist() == [0.75] and e.control.tolist() == [0.25]
    assert e.differences[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0] and e.samples == 4


# ---- roles.rule ---------------------------------------------------------------------------------------------------

def _evidence(score: list[float], differences: np.ndarray) -> Evidence:
    return Evidence(torch.tensor([score]), torch.zeros(1, len(score)), torch.tensor(differences, dtype=torch.float32))


def test_rule_needs_the_floor_and_the_corrected_test():
    strong = np.tile(np.array([[1.0, 1.0, 0.0, 1.0]]), (8, 1)) + RNG.normal(0, 0.01, (8, 4))
    strong[:, 2] = RNG.normal(0, 1, 8)  # no preference
    verdict = apply_rule({"induction": _evidence([0.9, 0.2, 0.9, 0.3], strong[:, None, :])}, d_head=8)["induction"]
    # head 0 clears floor and test; head 1 is under the floor; head 2 fails the test; head 3 sits on the floor (>=)
    assert verdict.detected.tolist() == [[True, False, False, True]]
    raw = paired_greater_p(strong[:, None, :])
    assert verdict.p_value.numpy() == pytest.approx(raw, rel=1e-5)
    assert verdict.p_adjusted.numpy().ravel() == pytest.approx(false_discovery_control(raw.ravel()), rel=1e-5)
    assert verdict.floor == FLOORS["induction"] == 0.3


def test_rule_corrects_over_every_role_at_once_and_applies_partners():
    flat = np.full((6, 1, 1), 1.0) + RNG.normal(0, 0.5, (6, 1, 1))
    evidence = {"name_mover": _evidence([0.9], flat), "name_copy": _evidence([0.1], flat)}
    out = apply_rule(evidence, d_head=8)
    assert not out["name_mover"].detected.item()  # attends, but its partner (name copying) is under its floor
    evidence["name_copy"] = _evidence([0.9], flat)
    assert apply_rule(evidence, d_head=8)["name_mover"].detected.item()
    both = np.concatenate([paired_greater_p(flat).ravel()] * 2)
    assert out["name_mover"].p_adjusted.item() == pytest.approx(false_discovery_control(both)[0], rel=1e-5)
    with pytest.raises(Exception, match="no effect-size floor"):
        floor_of("no_such_role", 8)
    assert floor_of("induction", 8, {"induction": 0.7}) == 0.7


def test_amplification_excludes_heads_that_are_memory_heads():
    flat = np.full((6, 1, 2), 1.0) + RNG.normal(0, 0.1, (6, 1, 2))
    evidence = {"memory": _evidence([0.9, 0.1], flat), "amplification": _evidence([0.9, 0.9], flat)}
    out = apply_rule(evidence, d_head=8)
    assert out["memory"].detected.tolist() == [[True, False]]
    assert out["amplification"].detected.tolist() == [[False, True]]


def test_a_memory_head_needs_its_answer_writing_half_to_pass_its_own_test():
    attends = np.full((8, 1, 1), 1.0) + RNG.normal(0, 0.1, (8, 1, 1))
    noisy = np.array([1.0, -1.0] * 4)[:, None, None]  # a share above the floor on average, no consistent preference
    evidence = {"memory": _evidence([0.9], attends), "amplification": _evidence([0.9], noisy)}
    out = apply_rule(evidence, d_head=8)
    assert not out["amplification"].detected.item() and not out["memory"].detected.item()
    evidence["amplification"] = _evidence([0.9], attends)
    assert apply_rule(evidence, d_head=8)["memory"].detected.item()


def test_partner_floor_is_inclusive_and_a_missing_partner_fails():
    flat = np.full((6, 1, 1), 1.0) + RNG.normal(0, 0.5, (6, 1, 1))
    on_floor = {"name_mover": _evidence([0.9], flat), "name_copy": _evidence([FLOORS["name_copy"]], flat)}
    assert apply_rule(on_floor, d_head=8)["name_mover"].detected.item()  # score >= floor
    assert not apply_rule({"name_mover": _evidence([0.9], flat)}, d_head=8)["name_mover"].detected.item()
    # only the memory head's partner must pass its own test: a name mover needs its name-copying score, not its test
    noisy = np.array([1.0, -1.0] * 3)[:, None, None]
    untested = {"name_mover": _evidence([0.9], flat), "name_copy": _evidence([0.9], noisy)}
    judged = apply_rule(untested, d_head=8)
    assert not judged["name_copy"].detected.item() and judged["name_mover"].detected.item()
    # a role whose excluding role was not measured keeps its own verdict
    assert apply_rule({"amplification": _evidence([0.9], flat)}, d_head=8)["amplification"].detected.item()


def test_each_role_gets_its_own_slice_of_the_correction():
    strong = np.full((8, 1, 2), 1.0) + RNG.normal(0, 0.1, (8, 1, 2))
    weak = RNG.normal(0.1, 1.0, (8, 1, 3))
    out = apply_rule({"induction": _evidence([0.9, 0.9], strong), "previous_token": _evidence([0.9] * 3, weak)},
                     d_head=8)
    raw = np.concatenate([paired_greater_p(strong).ravel(), paired_greater_p(weak).ravel()])
    expected = false_discovery_control(raw)
    assert out["induction"].p_adjusted.numpy().ravel() == pytest.approx(expected[:2], rel=1e-5)
    assert out["previous_token"].p_adjusted.numpy().ravel() == pytest.approx(expected[2:], rel=1e-5)


def test_floors_are_the_documented_calibrated_values():
    # README "When is a head an X head?": attention shares 0.3, operand attention 0.6 of its chance-corrected score,
    # rates 0.5 (a majority of tokens), amplification 5% of the logit margin
    assert FLOORS == {"previous_token": 0.3, "duplicate_token": 0.3, "induction": 0.3, "attention_sink": 0.3,
                      "iteration": 0.3, "operand_attention": 0.6, "name_mover": 0.3, "memory": 0.3, "successor": 0.5,
                      "name_copy": 0.5, "amplification": 0.05}


def test_verdicts_and_evidence_are_immutable():
    import dataclasses

    e = _evidence([0.5], np.ones((3, 1, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.score = torch.zeros(1, 1)
    verdict = apply_rule({"induction": e}, d_head=8)["induction"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.detected = torch.ones(1, 1, dtype=torch.bool)


def test_rule_alpha_is_strict():
    d = np.tile(np.array([[1.0]]), (3, 1, 1)) + np.array([0.0, 0.5, -0.5])[:, None, None]
    p = float(paired_greater_p(d).item())
    evidence = {"induction": _evidence([0.9], d)}
    assert not apply_rule(evidence, d_head=8, alpha=p)["induction"].detected.item()  # p < alpha, not <=
    assert apply_rule(evidence, d_head=8, alpha=p * 1.001)["induction"].detected.item()


# ---- probes.metrics -----------------------------------------------------------------------------------------------

def test_probe_point_metrics_match_scikit_learn():
    y = RNG.integers(0, 2, 60)
    scores = RNG.normal(0, 1, (60, 3, 1)) + y[:, None, None]
    for h in range(3):
        s = scores[:, h, 0]
        assert metrics.auroc(scores[..., 0], y)[h] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
        assert metrics.accuracy(metrics.predictions(scores, "binary"), y)[h] == pytest.approx(np.mean((s > 0) == y))
    y3 = RNG.integers(0, 3, 80)
    logits = RNG.normal(0, 1, (80, 2, 3))
    pred = metrics.predictions(logits, "multiclass")
    for h in range(2):
        assert metrics.macro_f1(pred, y3, 3)[h] == pytest.approx(f1_score(y3, pred[:, h], average="macro"))
    # one class only, in labels and predictions: macro-F1 is that class's F1 (1), not half of it
    assert metrics.macro_f1(np.ones((5, 1), np.int64), np.ones(5, np.int64), 2)[0] == pytest.approx(
        f1_score(np.ones(5), np.ones(5), average="macro"))
    target = RNG.normal(0, 1, 40)
    guess = target[:, None] + RNG.normal(0, 0.5, (40, 2))
    assert metrics.r2(guess, target) == pytest.approx([r2_score(target, guess[:, h]) for h in range(2)])
    small, near = 0.01 * target, 0.01 * guess  # a total sum of squares below 1
    assert metrics.r2(near, small) == pytest.approx([r2_score(small, near[:, h]) for h in range(2)])


def test_probabilities_are_the_sigmoid_and_the_softmax():
    # large logits (no overflow) and a different maximum per row
    big = metrics.probabilities(np.array([[[1000.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]]), "multiclass")
    assert big.shape == (2, 1, 3) and big[0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert big[1, 0].tolist() == pytest.approx((np.exp([0, 0, 1]) / np.exp([0, 0, 1]).sum()).tolist())
    assert metrics.predictions(np.array([[[0.1, 0.5, 0.2]], [[0.9, 0.0, 0.3]]]), "multiclass").tolist() == [[1], [0]]
    p = metrics.probabilities(np.array([[[0.0]], [[2.0]]]), "binary")
    assert p[1, 0].tolist() == pytest.approx([1 - 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(-2))])
    q = metrics.probabilities(np.array([[[1.0, 2.0, 3.0]]]), "multiclass")[0, 0]
    assert q.tolist() == pytest.approx((np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum()).tolist())
    assert metrics.predictions(np.array([[[1.5]], [[-0.2]]]), "regression").ravel().tolist() == [1.5, -0.2]


def test_auroc_interval_is_hanley_mcneil():
    a, n1, n0 = 0.8, 30, 50
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    low, high = metrics.auroc_interval(np.array([a]), n1, n0, 0.95)
    assert (low[0], high[0]) == pytest.approx((a - 1.959964 * se, a + 1.959964 * se), rel=1e-6)
    low, high = metrics.auroc_interval(np.array([0.95]), 3, 3, 0.95)  # 0.95 + 1.96 SE = 1.155: clipped to 1
    assert high[0] == 1.0 and 0.0 <= low[0] < 0.95


def test_expected_calibration_error_by_hand():
    # 4 rows, 2 bins: confidences 0.6, 0.7 (bin 1, accuracy 1/2, mean conf 0.65), 0.9, 0.95 (bin 1 too)
    probs = np.array([[0.4, 0.6], [0.3, 0.7], [0.9, 0.1], [0.05, 0.95]])[:, None, :]
    y = np.array([1, 0, 0, 1])
    # all four confidences fall in [0.5, 1): accuracy 3/4, mean confidence 0.7875 -> ECE 0.0375
    assert metrics.expected_calibration_error(probs, y, 2).item() == pytest.approx(0.0375)
    # with 10 bins: bins 6 (0.6, right), 7 (0.7, wrong), 9 (0.9 right, 0.95 right)
    expected = (abs(1 - 0.6) + abs(0 - 0.7) + abs(2 - 1.85)) / 4
    assert metrics.expected_calibration_error(probs, y, 10).item() == pytest.approx(expected)
    # the top bin holds confidence 1 and [0.9, 1); 0.85 (right) and 0.95 (wrong) sit in bins 8 and 9
    split = np.array([[0.15, 0.85], [0.95, 0.05]])[:, None, :]
    assert metrics.expected_calibration_error(split, np.array([1, 1]), 10).item() == pytest.approx((0.15 + 0.95) / 2)
    # two heads are binned apart: the second, perfectly confident and right, has ECE 0
    sure = np.zeros((4, 1, 2))
    sure[np.arange(4), 0, y] = 1.0
    both = metrics.expected_calibration_error(np.concatenate([probs, sure], 1), y, 10)
    assert both.tolist() == pytest.approx([expected, 0.0])


def test_bootstrap_weights_resample_rows_or_whole_groups():
    w = metrics.bootstrap_weights(6, None, 50, seed=1)
    assert w.shape == (50, 6) and (w.sum(1) == 6).all()
    groups = np.array([0, 0, 1, 1, 2, 2])
    g = metrics.bootstrap_weights(6, groups, 50, seed=1)
    assert (g[:, 0] == g[:, 1]).all() and (g[:, 2] == g[:, 3]).all() and (g.sum(1) == 6).all()
    assert not (g[:, 0] == g[:, 2]).all()


def test_bootstrap_metric_weights_rows_as_counts():
    pred = np.array([[1], [0], [1]])
    y = np.array([1, 1, 1])
    weights = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]], dtype=np.float32)
    assert metrics.bootstrap_metric(pred, y, "accuracy", 2, weights)[:, 0].tolist() == pytest.approx([2 / 3, 0.0])
    f1 = metrics.bootstrap_metric(pred, y, "macro_f1", 2, weights)[:, 0]
    repeated = [f1_score([1, 1, 1], [1, 1, 0], average="macro"), f1_score([1, 1, 1], [0, 0, 0], average="macro",
                                                                           zero_division=0)]
    assert f1.tolist() == pytest.approx(repeated)
    target = np.array([0.0, 1.0, 3.0])
    guess = np.array([[0.5], [1.0], [2.0]])
    r = metrics.bootstrap_metric(guess, target, "r2", 0, np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]], np.float32))
    assert r[0, 0] == pytest.approx(r2_score(target, guess[:, 0]), rel=1e-5)
    assert r[1, 0] == pytest.approx(r2_score([0, 0, 3], [0.5, 0.5, 2.0]), rel=1e-5)


def test_percentile_interval():
    samples = np.arange(101, dtype=float)[:, None]
    low, high = metrics.percentile_interval(samples, 0.9)
    assert (low[0], high[0]) == pytest.approx((5.0, 95.0))


def test_permutation_p_values_by_brute_force():
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    pred = np.stack([y, 1 - y, RNG.integers(0, 2, 8)], 1)
    p = metrics.permutation_pvalues(pred, y, "binary", 2, permutations=200, seed=3)
    rng = np.random.default_rng(3 + 104729)
    perms = [rng.permutation(8) for _ in range(200)]
    for h in range(3):
        observed = np.sum(pred[:, h] == y)
        hits = sum(np.sum(pred[:, h] == y[perm]) >= observed for perm in perms)
        assert p[h] == pytest.approx((1 + hits) / 201)
    assert p[0] < 0.05 < p[1]
    target = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.7])
    guess = np.stack([target + 0.05, -target], 1)
    q = metrics.permutation_pvalues(guess, target, "regression", 1, permutations=300, seed=0)
    rng = np.random.default_rng(0 + 104729)
    perms = [rng.permutation(6) for _ in range(300)]
    for h in range(2):  # -sum (y - yhat)^2 ranks permutations as the cross term y . yhat does
        observed = -np.sum((target - guess[:, h]) ** 2)
        hits = sum(-np.sum((target[perm] - guess[:, h]) ** 2) >= observed - 1e-9 for perm in perms)
        assert q[h] == pytest.approx((1 + hits) / 301)
    # tied labels: every permutation gives the same statistic, whatever float32 rounding says, so p = 1
    flat = np.full(10, 1000.1)
    tied = metrics.permutation_pvalues(RNG.normal(1000, 1, (10, 1)), flat, "regression", 1, permutations=50, seed=1)
    assert tied.item() == 1.0


def test_primary_metric_and_score_part():
    assert (metrics.primary_metric("regression"), metrics.primary_metric("binary")) == ("r2", "accuracy")
    y = np.array([0, 1, 1, 0])
    scores = np.array([-1.0, 2.0, 0.5, 0.3])[:, None, None]
    part = metrics.score_part(scores, y, "binary", 2, 10)
    assert set(part) == {"accuracy", "auroc", "ece"} and part["accuracy"][0] == pytest.approx(0.75)
    assert set(metrics.score_part(scores, y, "binary", 2, 10, primary_only=True)) == {"accuracy"}
    assert part["auroc"][0] == pytest.approx(roc_auc_score(y, scores[:, 0, 0]))
    assert norm.ppf(0.975) == pytest.approx(1.959964, rel=1e-6)
