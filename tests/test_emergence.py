"""Emergence steps and the phase change, on hand-built training histories with known answers."""

import torch

from roles.null import NullStats
from toymodels.emergence import Snapshot, emerged_steps, log_linear_schedule, phase_change_step


def _history(series: dict[tuple[int, int], list[float]], steps: list[int]) -> list[Snapshot]:
    """Snapshots whose induction scores [1 layer, 3 heads] follow ``series[(0, head)]`` over ``steps``."""
    history = []
    for k, step in enumerate(steps):
        scores = torch.zeros(1, 3)
        for (layer, head), values in series.items():
            scores[layer, head] = values[k]
        history.append(Snapshot(step, float(k), eval_loss=1.0, eval_accuracy=0.0, scores={"induction": scores}))
    return history


def test_a_head_emerges_at_the_first_step_after_which_it_stays_above_threshold():
    steps = [0, 10, 20, 30, 40]
    history = _history({(0, 0): [0.0, 0.5, 0.1, 0.6, 0.7],  # above at 10, dips at 20, above from 30 on -> 30
                        (0, 1): [0.9, 0.9, 0.9, 0.9, 0.9],  # above from the start -> 0
                        (0, 2): [0.0, 0.8, 0.8, 0.8, 0.2]},  # above for a while, not at the end -> never
                       steps)
    null = {"induction": NullStats(mean=0.0, std=0.1, n=10)}  # threshold 0.3 at n_sigma 3
    assert emerged_steps(history, null, n_sigma=3.0) == {("induction", 0, 0): 30, ("induction", 0, 1): 0}
    # a stricter threshold (0.0 + 8 * 0.1 = 0.8): only head 1 passes, from step 0
    assert emerged_steps(history, null, n_sigma=8.0) == {("induction", 0, 1): 0}


def test_roles_without_scores_or_null_are_skipped():
    history = _history({(0, 0): [1.0, 1.0]}, [0, 5])
    assert emerged_steps(history, {"previous_token": NullStats(0.0, 0.1, 4)}, 3.0) == {}
    assert emerged_steps([], {"induction": NullStats(0.0, 0.1, 4)}, 3.0) == {}


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
