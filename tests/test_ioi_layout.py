"""The IOI task's layouts: the default naive templates unchanged, and the ``clauses`` layout of issue 19 (a query
token at the end, random filler between the clauses, 2-3 first-clause names with soft targets, ABC sequences with a
target uniform over the first names). Every target is recomputed by hand from the tokens."""

from __future__ import annotations

import pytest
import torch

from data.tasks import make_task
from headlab.errors import HeadlabError

CLAUSES = {"layout": "clauses", "length": 20, "max_gap": 4, "max_first_names": 3, "abc_fraction": 0.25}


def test_default_layout_is_the_old_template_generator():
    batch = make_task("ioi").batch(8, seed=0)
    weights = torch.arange(14) + 1  # checksums of the generator before the clauses layout existed
    assert batch["input_ids"][0].tolist() == [46, 43, 31, 52, 50, 27, 4, 19, 49, 19, 29, 60, 48, 36]
    assert batch["targets"][:3, -1].tolist() == [4, 3, 21]
    assert int((batch["input_ids"] * weights).sum()) == 30809
    assert int((batch["corrupt_input_ids"] * weights).sum()) == 30912


def _by_hand(ids: list[int], n_names: int) -> tuple[list[int], int, list[int]]:
    """The first clause's names, S2 (the last name) and the answers (first names other than S2), read off tokens."""
    mentions = [t for t in ids if t < n_names]
    first, subject = mentions[:-1], mentions[-1]
    return first, subject, [t for t in first if t != subject]


def test_clauses_targets_masks_and_query_token_match_a_hand_reading_of_the_tokens():
    task = make_task("ioi", **CLAUSES)
    batch = task.batch(256, seed=0)
    for row in range(256):
        ids = batch["input_ids"][row].tolist()
        first, subject, answers = _by_hand(ids, task.n_names)
        assert len(first) in (2, 3) and len(set(first)) == len(first)
        assert ids[-1] == task.query_token and ids[-2] >= task.n_names  # the query is never the repeated name
        expected = torch.zeros(task.n_names)
        expected[answers] = 1 / len(answers)
        assert torch.allclose(batch["target_probs"][row], expected)
        assert int(batch["targets"][row, -1]) in answers and (batch["targets"][row, :-1] == -100).all()
        assert [ids[j] for j in batch["io_mask"][row].nonzero()[:, 0].tolist()] == answers
        assert {ids[j] for j in batch["s_mask"][row].nonzero()[:, 0].tolist()} == {subject}


def test_clauses_mix_abc_sequences_three_name_clauses_and_random_gaps():
    task = make_task("ioi", **CLAUSES)
    batch = task.batch(2000, seed=1)
    abc, three, gaps = 0, 0, set()
    for ids in batch["input_ids"].tolist():
        first, subject, _ = _by_hand(ids, task.n_names)
        abc += subject not in first
        three += len(first) == 3
        positions = [j for j, t in enumerate(ids) if t < task.n_names]
        gaps.add(positions[-1] - positions[-2] - 1)  # fillers between the clauses
    assert abs(abc / 2000 - 0.25) < 0.04 and abs(three / 2000 - 0.5) < 0.05
    assert gaps == {1, 2, 3, 4, 5}


def test_drawn_targets_follow_the_soft_target_of_three_name_ioi_sequences():
    task = make_task("ioi", **CLAUSES)
    batch = task.batch(4000, seed=2)
    earlier = total = 0
    for ids, target in zip(batch["input_ids"].tolist(), batch["targets"][:, -1].tolist()):
        first, subject, answers = _by_hand(ids, task.n_names)
        if len(first) == 3 and subject in first:
            total += 1
            earlier += target == answers[0]
    assert abs(earlier / total - 0.5) < 0.05


def test_clauses_ioi_split_is_two_name_abba_and_baba_with_hard_targets():
    task = make_task("ioi", **CLAUSES)
    batch = task.detection_batch(128, 3)
    orders = set()
    for ids, target in zip(batch["input_ids"].tolist(), batch["targets"][:, -1].tolist()):
        first, subject, answers = _by_hand(ids, task.n_names)
        assert len(first) == 2 and subject in first and answers == [target]
        orders.add("ABBA" if first[0] == target else "BABA")
    assert orders == {"ABBA", "BABA"} and bool((batch["target_probs"].max(1).values == 1).all())


def _by_hand_with_distractors(ids: list[int], n_names: int) -> tuple[list[int], list[int]]:
    """Answers and distractors read off tokens: a name mentioned twice is the subject, its second mention S2 ends the
    first clause and later names are distractors; with no repeated name (ABC) the last name is S2 and every earlier
    name an answer."""
    mentions = [t for t in ids if t < n_names]
    repeated = [t for t in mentions if mentions.count(t) == 2]
    if not repeated:
        return mentions[:-1], []
    s2 = len(mentions) - 1 - mentions[::-1].index(repeated[0])
    return [t for t in mentions[:s2] if t != repeated[0]], mentions[s2 + 1:]


def test_distractors_follow_s2_are_never_answers_and_leave_the_targets_unchanged():
    task = make_task("ioi", **CLAUSES, distractor_fraction=0.5)
    batch = task.batch(2000, seed=4)
    distracted = ioi = 0
    for row, ids in enumerate(batch["input_ids"].tolist()):
        answers, distractors = _by_hand_with_distractors(ids, task.n_names)
        expected = torch.zeros(task.n_names)
        expected[answers] = 1 / len(answers)
        assert torch.allclose(batch["target_probs"][row], expected) and len(distractors) <= 1
        assert ids[-1] == task.query_token and not set(distractors) & set(answers)
        if len([t for t in ids if t < task.n_names]) != len(set(t for t in ids if t < task.n_names)):
            ioi += 1
            distracted += len(distractors)
    assert abs(distracted / ioi - 0.5) < 0.05


@pytest.mark.parametrize("options", [{"max_gap": 2}, {"layout": "clauses", "length": 8, "max_gap": 2},
                                     {"layout": "clauses", "max_first_names": 4}, {"layout": "sideways"},
                                     {"distractor_fraction": 0.5}])
def test_bad_layout_options_fail_early(options):
    with pytest.raises(HeadlabError, match="ioi"):
        make_task("ioi", **options)
