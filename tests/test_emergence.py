"""Emergence steps and the phase change, on hand-built training histories with known answers."""

import torch

from toymodels.emergence import Snapshot, emerged_steps, log_linear_schedule, phase_change_step


def _history(series: dict[tuple[int, int], list[float]], steps: list[int], cut: float) -> list[Snapshot]:
    """Snapshots whose induction scores [1 layer, 3 heads] follow ``series[(0, head)]`` over ``steps``, detected
    where the score is at least ``cut``."""
    history = []
    for k, step in enumerate(steps):
        scores = torch.zeros(1, 3)
        for (layer, head), values in series.items():
            scores[layer, head] = values[k]
        history.append(Snapshot(step, float(k), eval_loss=1.0, eval_accuracy=0.0, scores={"induction": scores},
                                detected={"induction": scores >= cut}))
    return history


SERIES = {(0, 0): [0.0, 0.5, 0.1, 0.6, 0.7],  # detected at 10, not at 20, again from 30 on -> 30
          (0, 1): [0.9, 0.9, 0.9, 0.9, 0.9],  # detected from the start -> 0
          (0, 2): [0.0, 0.8, 0.8, 0.8, 0.2]}  # detected for a while, not at the end -> never


def test_a_head_emerges_at_the_first_step_from_which_it_stays_detected():
    steps = [0, 10, 20, 30, 40]
    assert emerged_steps(_history(SERIES, steps, 0.3)) == {("induction", 0, 0): 30, ("induction", 0, 1): 0}
    # a stricter verdict (scores of at least 0.8): only head 1, from step 0
    assert emerged_steps(_history(SERIES, steps, 0.8)) == {("induction", 0, 1): 0}


def test_an_empty_history_has_no_emergence():
    assert emerged_steps([]) == {}


def test_phase_change_is_the_first_step_halfway_from_the_plateau_to_the_floor():
    # plateau 4.0, floor 0.2: halfway 2.1, first reached at step 200
    assert phase_change_step([0, 100, 200, 300, 400], [4.0, 3.9, 1.5, 0.2, 0.3]) == 200
    # a loss exactly at halfway counts
    assert phase_change_step([0, 1, 2], [3.0, 2.0, 1.0]) == 1
    # a drop smaller than 20% of the plateau is no phase change
    assert phase_change_step([0, 1, 2], [4.0, 3.9, 3.3]) is None
    assert phase_change_step([0], [4.0]) is None


def test_log_plus_linear_schedule_known_answer():
    assert log_linear_schedule(100, 25) == [0, 1, 2, 4, 8, 16, 25, 32, 50, 64, 75, 100]
