"""The group criterion: which detected heads are ablated together, and its verdict, on hand-built cases."""

import pytest
import torch

from roles.mapping import GroupCheck, group_members


def _detected(heads, shape=(2, 2)) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


@pytest.mark.parametrize("role", ["iteration", "induction"])
def test_roles_that_need_a_layer_below_leave_layer_zero_out_of_the_group(role):
    # measured: a 2 x 2 iteration model whose two layer-0 heads read the diagonal off positions passed the group
    # criterion (+5.7 nats against -0.001) while its layer-1 heads scored 0.12 and 0.10
    detected = _detected([(0, 0), (0, 1), (1, 1)])
    assert group_members(role, detected).nonzero().tolist() == [[1, 1]]
    assert detected.sum() == 3  # the caller's mask is left alone


def test_other_roles_and_one_layer_models_keep_every_detected_head():
    detected = _detected([(0, 0), (0, 1), (1, 1)])
    assert group_members("previous_token", detected).nonzero().tolist() == [[0, 0], [0, 1], [1, 1]]
    one_layer = _detected([(0, 0), (0, 1)], shape=(1, 2))
    assert group_members("induction", one_layer).nonzero().tolist() == [[0, 0], [0, 1]]


def test_group_verdict_known_answers():
    # p = (1 + #{random >= effect}) / (1 + #random): 19 random groups all below -> 1/20
    strong = GroupCheck([(1, 0), (1, 1)], effect=2.0, random_effects=[0.1] * 19)
    assert strong.p_value == pytest.approx(0.05) and strong.reference == pytest.approx(0.1)
    assert strong.functional(min_effect=0.01)
    tied = GroupCheck([(1, 0), (1, 1)], effect=2.0, random_effects=[0.1] * 18 + [2.0])
    assert tied.p_value == pytest.approx(0.1) and not tied.functional(min_effect=0.01)
    alone = GroupCheck([(1, 0)], effect=2.0, random_effects=[0.1] * 19)
    assert not alone.functional(min_effect=0.01)  # a group needs two heads
    small = GroupCheck([(1, 0), (1, 1)], effect=0.105, random_effects=[0.1] * 19)
    assert not small.functional(min_effect=0.01)  # significant but under the effect floor


def test_sequential_p_value_stops_at_ten_hits_and_reports_hits_over_draws():
    # Besag & Clifford 1991: stopped after l draws with h = 10 hits, p = h / l; the planned draws set the floor
    stopped = GroupCheck([(0, 0), (0, 1)], effect=1.0, random_effects=[2.0] * 10 + [0.5] * 10, planned=99)
    assert stopped.p_value == pytest.approx(10 / 20)
    assert stopped.min_attainable_p == pytest.approx(1 / 100)
    finished = GroupCheck([(0, 0), (0, 1)], effect=1.0, random_effects=[2.0] * 3 + [0.5] * 96, planned=99)
    assert finished.p_value == pytest.approx(4 / 100)  # all draws made: (1 + hits) / (1 + n)


def test_small_models_get_every_other_group_once_and_large_ones_uniform_draws():
    from itertools import combinations

    from roles.groups import random_groups

    pair = [(0, 0), (1, 3)]
    exact = random_groups(pair, (2, 4), draws=99, seed=0)  # C(8, 2) = 28 groups: the 27 others, each once
    assert sorted(tuple(sorted(g)) for g in exact) == sorted(g for g in combinations(
        [(a, b) for a in range(2) for b in range(4)], 2) if list(g) != pair)
    drawn = random_groups(pair, (4, 8), draws=99, seed=0)  # C(32, 2) = 496 > 100: Monte Carlo
    assert len(drawn) == 99 and all(len(set(g)) == 2 for g in drawn)
    # drawn from *all* heads, the detected ones included (a permutation test): over 99 pairs of 32 heads, a pair
    # holds (0, 0) with probability 1/16, so P(none of 99 does) = (15/16)^99 ~ 0.002
    assert any((0, 0) in g for g in drawn)


@pytest.mark.parametrize(("option", "what"), [("random_groups", "group"), ("random_directions", "steering")])
def test_too_few_draws_for_alpha_are_refused_at_configuration(option, what):
    """Random groups (group criterion) and random direction sets (steering checks): below 1/alpha - 1 draws the
    smallest p-value lies above alpha, so the check could never pass."""
    from headlab.errors import HeadlabError
    from roles.mapping import DetectConfig

    with pytest.raises(HeadlabError, match=rf"{option} 18 gives {what} .* pass --detection.{option} 19"):
        DetectConfig(**{option: 18})
    with pytest.raises(HeadlabError, match=rf"{option} 2 .* pass --detection.{option} 19"):
        DetectConfig(**{option: 2})
    assert getattr(DetectConfig(**{option: 19}), option) == 19  # 1/20 <= 0.05
    with pytest.raises(HeadlabError, match=f"{option} 19"):
        DetectConfig(**{option: 19}, alpha=0.01)
