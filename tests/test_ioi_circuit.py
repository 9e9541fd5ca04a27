"""The name-mover half of the toy IOI verdict (:mod:`toymodels.ioi_circuit`): selectivity on hand-built attention
patterns, and the whole check on the planted circuit of ``tests/test_ioi_planted.py``."""

from __future__ import annotations

import pytest
import torch
from test_ioi_planted import NAME_MOVERS, S_INHIBITION, planted_model

from data.tasks import make_task
from toymodels.circuits import CIRCUITS
from toymodels.ioi_circuit import name_positions, selectivity


def _two_sequences() -> dict[str, torch.Tensor]:
    """ABBA ``A B B x END`` and BABA ``B A B x END`` (A = 0 is the IO, B = 1 the subject, x = 5 and END = 6)."""
    ids = torch.tensor([[0, 1, 1, 5, 6], [1, 0, 1, 5, 6]])
    return {"input_ids": ids, "io_mask": ids == 0, "s_mask": ids == 1}


def _patterns(last_rows: list[list[list[float]]]) -> torch.Tensor:
    """``[B, 1, H, 5, 5]`` patterns whose END rows are ``last_rows[b][h]`` (the other rows attend to themselves)."""
    out = torch.eye(5).repeat(2, 1, len(last_rows[0]), 1, 1)
    out[:, 0, :, -1] = torch.tensor(last_rows)
    return out


def test_name_positions_read_the_template_off_the_masks():
    io, s, abba = name_positions(_two_sequences())
    assert io.tolist() == [0, 0] and s.tolist() == [1, 1] and abba.tolist() == [True, False]


def test_selectivity_is_attention_to_io_minus_attention_to_both_subject_mentions_per_template():
    batch = _two_sequences()
    # head 0 prefers the IO on both templates: 0.7 on IO, 0.1 on each S mention; head 1 attends to the first name.
    last = [[[0.7, 0.1, 0.1, 0.05, 0.05], [1, 0, 0, 0, 0]], [[0.1, 0.7, 0.1, 0.05, 0.05], [1, 0, 0, 0, 0]]]
    abba, baba = selectivity(_patterns(last), batch["io_mask"], batch["s_mask"], name_positions(batch)[2])
    assert abba[0].tolist() == pytest.approx([0.5, 1.0]) and baba[0].tolist() == pytest.approx([0.5, -1.0])


def test_selectivity_of_a_template_absent_from_the_batch_is_nan():
    batch = _two_sequences()
    abba, baba = selectivity(_patterns([[[0.2] * 5]] * 2), batch["io_mask"], batch["s_mask"], torch.tensor([True] * 2))
    assert not abba.isnan().any() and baba.isnan().all()


def _circuit(**change):
    task = make_task("ioi")
    return CIRCUITS["ioi"](planted_model(**change), task, task.detection_batch(32, 1), 0.3)


def test_planted_name_movers_pass_the_circuit_check_and_no_other_head_does():
    circuit = _circuit()
    assert set(circuit.heads) == NAME_MOVERS and circuit.passed
    assert min(circuit.selectivity_abba, circuit.selectivity_baba) > 0.99 and circuit.copy_score == 1.0
    assert circuit.drop > 0.5 * circuit.clean_logit_diff


def test_patching_the_planted_s_inhibition_head_from_abc_runs_removes_the_movers_selectivity():
    circuit = _circuit()
    assert circuit.s_inhibition_heads == [S_INHIBITION]
    assert circuit.mover_selectivity > 0.99 and circuit.patched_selectivity < 0


@pytest.mark.parametrize("change", [{"inhibit": False}, {"attend": False}, {"copy": False}],
                         ids=["no-s-inhibition", "uniform-attention", "zero-ov"])
def test_without_s_inhibition_or_with_broken_movers_the_circuit_check_fails(change):
    circuit = _circuit(**change)
    assert circuit.heads == [] and not circuit.passed
