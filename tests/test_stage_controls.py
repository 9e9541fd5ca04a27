"""The stage map's controls (roles/stages/controls.py): the steering check's positive control is a direction that
moves its readout by construction and must pass; its negative control (random directions) must not; the checks
list carries both beside each p-value and its smallest attainable value."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from headlab.heads import head_sites, output_weights
from probes.steering import steering_check
from roles.stages.controls import check_entries, logit_direction


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", seed=1, causal_lm=True).eval()


def _pair_readout(a: int, b: int):
    return lambda outputs, _inputs: outputs.logits[:, -1, a] - outputs.logits[:, -1, b]


def test_logit_direction_is_the_heads_output_weights_times_the_unembedding_difference(model):
    last = len(head_sites(model)) - 1
    got = logit_direction(model, [(last, 1)], 5, 9)[(last, 1)]
    w_o, _ = output_weights(head_sites(model)[last])
    w_u = model.get_output_embeddings().weight
    by_hand = torch.stack([sum(w_o[1, i, k] * (w_u[5, k] - w_u[9, k]) for k in range(w_u.shape[1]))
                           for i in range(w_o.shape[1])])
    assert torch.allclose(got, by_hand.detach().float(), atol=1e-5)


def test_positive_control_passes_and_negative_control_does_not(model):
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, model.config.vocab_size, (8, 12), generator=generator)}
    last = len(head_sites(model)) - 1
    heads = [(last, 0), (last, 1)]
    raw = logit_direction(model, heads, 5, 9)
    known = {h: d / d.norm() for h, d in raw.items()}  # unit norm, like the random directions it is compared with
    positive = steering_check(model, inputs, _pair_readout(5, 9), known, alpha=2.0, n_random=39, seed=1)
    assert positive.passed and positive.p_value == pytest.approx(1 / 40) and positive.shift > 0
    # the same heads along random unit directions: no reason to move the pair's logit difference more than others
    generator = torch.Generator().manual_seed(7)
    noise = {h: torch.randn(d.shape, generator=generator) for h, d in raw.items()}
    negative = steering_check(model, inputs, _pair_readout(5, 9), {h: n / n.norm() for h, n in noise.items()},
                              alpha=2.0, n_random=39, seed=2)
    assert not negative.passed and negative.p_value > 0.05


def test_checks_list_known_answer():
    groups = {"memory": {"p_value": 0.05, "min_attainable_p": 0.05, "functional": True,
                         "positive_control_passed": True, "negative_control_passed": False}}
    steering = {"p_value": 0.95, "min_attainable_p": 0.01, "passed": False, "significance": 0.05,
                "positive_control_passed": True, "negative_control_passed": False, "readout": "R1",
                "verdict": "carries information but was not shown to be used"}
    entries = check_entries(groups, steering, alpha=0.05)
    assert [e["name"] for e in entries] == ["group:memory", "steering:truthfulness"]
    for entry in entries:
        assert {"name", "p_value", "min_attainable_p", "passed", "positive_control_passed",
                "negative_control_passed"} <= set(entry)
    assert entries[1]["p_value"] == 0.95 and entries[1]["passed"] is False
    assert entries[1]["readout"] == "R1" and entries[1]["verdict"].startswith("carries information")
    assert check_entries({}, None, 0.05) == []
