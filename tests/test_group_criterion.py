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
