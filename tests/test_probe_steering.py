"""The steering check on a tiny random GPT-2 (no downloads): mechanics, direction vs random, hooks removed."""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "disabled"

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from headlab.errors import HeadlabError
from headlab.heads import head_sites, hook_heads
from headlab.statistics import draws_for, min_attainable_p, monte_carlo_p
from probes.config import SteerConfig
from probes.steering import head_directions, hidden_projection, logit_difference, steering_check

HEADS = [(0, 1), (1, 2)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (6, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def readout_gradient(model, inputs, readout) -> dict[tuple[int, int], torch.Tensor]:
    """d(mean readout)/d(shift of z_h), by autograd through an additive shift at the hook point."""
    shifts = {head: torch.zeros(8, requires_grad=True) for head in HEADS}

    def add(layer, z):
        z = z.clone()
        for (lay, h), s in shifts.items():
            if lay == layer:
                z[:, :, h] = z[:, :, h] + s
        return z

    with hook_heads(model, add):
        readout(model(**inputs), inputs).mean().backward()
    return {head: s.grad.detach().clone() for head, s in shifts.items()}


def test_steering_along_the_readout_gradient_beats_random_directions(model, inputs):
    readout = logit_difference(3, 7)
    gradient = readout_gradient(model, inputs, readout)
    directions = {h: g / g.norm() for h, g in gradient.items()}
    result = steering_check(model, inputs, readout, directions, alpha=0.05, n_random=19, seed=0)
    assert result.shift > 0 > result.shift_negative
    assert result.shift > max(abs(r) for r in result.random_shifts)
    assert result.p_value == pytest.approx(1 / 20) == result.min_attainable_p
    assert result.passed  # the positive control: the readout's own gradient passes at 0.05


def test_a_check_that_could_never_pass_is_refused(model, inputs):
    """18 draws: the p-value cannot go below 1/19 > 0.05, so the check is refused rather than reported as failed."""
    directions = {h: torch.ones(8) for h in HEADS}
    with pytest.raises(HeadlabError, match="at least 19 random directions"):
        steering_check(model, inputs, logit_difference(3, 7), directions, alpha=1.0, n_random=18)
    with pytest.raises(HeadlabError, match=r"random_directions 8 is too few.*at least 19"):
        SteerConfig(random_directions=8)
    assert SteerConfig(random_directions=99, significance=0.01).random_directions == 99


def test_random_probe_directions_pass_at_most_at_the_nominal_rate(model, inputs):
    """Negative control and calibration: when the "probe" direction is itself random, the check is a draw among
    exchangeable ones, so it passes (p <= 0.05 and a positive shift) with probability 1/20 * 1/2 at most. Over 60
    null checks, Binomial(60, 0.05) exceeds 8 with probability < 0.01; the seeds are fixed, so the count is too."""
    readout = logit_difference(3, 7)
    passes = 0
    for seed in range(60):
        generator = torch.Generator().manual_seed(1000 + seed)
        directions = {h: torch.randn(8, generator=generator) for h in HEADS}
        passes += steering_check(model, inputs, readout, directions, alpha=1.0, n_random=19, seed=seed).passed
    assert passes <= 8


def test_zero_alpha_changes_nothing(model, inputs):
    readout = logit_difference(3, 7)
    directions = {h: torch.ones(8) for h in HEADS}
    result = steering_check(model, inputs, readout, directions, alpha=0.0, n_random=2, significance=0.5)
    assert result.shift == 0 and all(r == 0 for r in result.random_shifts)


def test_hooks_are_removed_afterwards(model, inputs):
    with torch.no_grad():
        before = model(**inputs).logits
    steering_check(model, inputs, logit_difference(3, 7), {h: torch.ones(8) for h in HEADS}, alpha=3.0,
                   n_random=2, significance=0.5)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert all(not site.module._forward_pre_hooks for site in head_sites(model))


def test_hidden_projection_readout_moves_with_steering(model, inputs):
    readout = hidden_projection(torch.ones(32) / 32**0.5)
    directions = {h: torch.randn(8, generator=torch.Generator().manual_seed(2)) for h in HEADS}
    result = steering_check(model, inputs, readout, directions, alpha=2.0, n_random=2, significance=0.5)
    assert result.shift != 0


def test_head_directions_scale_unit_mass_mean_by_std():
    table = {"mass_mean_direction": np.zeros((2, 4, 1, 8), np.float32), "mass_mean_std": np.full((2, 4, 1), 3.0),
             "probe_weight": np.zeros((2, 4, 8, 1), np.float32)}
    table["mass_mean_direction"][1, 2, 0, 0] = 1.0
    table["probe_weight"][1, 2, :, 0] = 2.0
    mass = head_directions(table, [(1, 2)], layers=[0, 1])
    assert torch.allclose(mass[(1, 2)], torch.tensor([3.0] + [0.0] * 7))
    probe_dir = head_directions(table, [(1, 2)], layers=[0, 1], kind="probe")[(1, 2)]
    assert probe_dir.norm() == pytest.approx(3.0)


def test_monte_carlo_p_by_hand():
    """|-3| and |2| reach |2| among four draws: (1 + 2) / (1 + 4); the draw counts are the smallest that reach alpha:
    1/20 = 0.05, 1/100 = 0.01, and 1/34 <= 0.03 < 1/33."""
    assert monte_carlo_p(2.0, [1.0, -3.0, 2.0, 0.5]) == pytest.approx(3 / 5)
    assert monte_carlo_p(-9.0, [1.0, -3.0]) == pytest.approx(1 / 3)
    assert min_attainable_p(19) == pytest.approx(0.05)
    assert (draws_for(0.05), draws_for(0.01), draws_for(0.03)) == (19, 99, 33)
