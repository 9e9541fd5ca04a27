"""The causal localisers of memory heads (knockout: roles.knockout, roles.memory_knockout) and amplification heads
(patching: roles.amplification_patching): each matches an independent forward pass (the head's attention edited by
hand; its output replaced by hook), heads planted at shallow layers are found exactly, random models give nothing
beyond chance, and the statistics match exact references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from headlab.heads import hook_heads
from headlab.statistics import sign_flip_p
from roles.amplification_patching import patching_amplification
from roles.groups import depth_matched_groups, distinct_matched_groups
from roles.knockout import PrefixRun, head_plans, knockout_log_probs, window_plans
from roles.memory_knockout import group_knockout, judge, scan_heads
from tests.memory_models import fact_batch, fact_model, plant_amplifier_head, plant_memory_head


@torch.no_grad()
def _hand_knockout(model, batch, layer: int, head: int) -> torch.Tensor:
    """log p(answer) with head (layer, head)'s final-position attention renormalised by hand over the non-subject
    keys, ``z = sum_k a_k [k not in S] v_k / sum_k a_k [k not in S]``, patched into a full forward pass."""
    ids, subject = batch["input_ids"], batch["subject_mask"]
    attn = model.model.layers[layer].self_attn
    values = {}
    handle = attn.v_proj.register_forward_hook(lambda m, args, out: values.setdefault("v", out))
    try:
        out = model(input_ids=ids, output_attentions=True)
    finally:
        handle.remove()
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    d_head = model.config.hidden_size // n_heads
    v = values["v"].view(*ids.shape, n_kv, d_head)[:, :, head // (n_heads // n_kv)]  # [B, T, dh]
    weights = out.attentions[layer][:, head, -1] * ~subject  # [B, T]
    z = (weights[..., None] * v).sum(1) / weights.sum(-1, keepdim=True)

    def patch(at: int, zs: torch.Tensor) -> torch.Tensor | None:
        if at != layer:
            return None
        zs = zs.clone()
        zs[:, -1, head] = z
        return zs

    with hook_heads(model, patch):
        logits = model(input_ids=ids).logits[:, -1]
    return logits.log_softmax(-1).gather(-1, batch["answers"][:, None])[:, 0]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_knockout_matches_a_hand_edited_attention_pattern(kv_heads):
    model = fact_model(n_layers=3, kv_heads=kv_heads, seed=1, init=0.5)
    batch = fact_batch()
    run = PrefixRun(model, batch["input_ids"], batch["subject_mask"])
    ours = knockout_log_probs(run, head_plans(3, 4), batch["answers"][:, None], max_rows=40)[..., 0]  # [B, 12]
    for layer, head in [(0, 1), (1, 3), (2, 0)]:
        reference = _hand_knockout(model, batch, layer, head)
        torch.testing.assert_close(ours[:, layer * 4 + head], reference, atol=2e-4, rtol=1e-4)
    clean = model(input_ids=batch["input_ids"]).logits[:, -1].log_softmax(-1)
    assert (ours - clean.gather(-1, batch["answers"][:, None])).abs().max() > 1e-2  # the knockouts do something


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2)])
def test_a_planted_shallow_memory_head_is_found_exactly(layer, head):
    model = plant_memory_head(fact_model(n_layers=4), layer, head)
    batch = fact_batch()
    scan = scan_heads(model, batch, window=2)
    verdict = judge(scan, alpha=0.05, min_effect=0.01, seed=0)
    assert verdict.detected.nonzero().tolist() == [[layer, head]]
    assert scan.drop[layer, head] > 3.0  # the answer is lost: log p drops by nats
    assert int(scan.windows.argmax()) <= layer < int(scan.windows.argmax()) + 2  # the peak window covers it
    group = group_knockout(model, batch, verdict.detected, draws=19, seed=0)
    assert group.heads == [(layer, head)] and group.effect > max(group.random_effects) + 3.0


@pytest.mark.parametrize("patch", [False, True])
def test_random_models_have_no_memory_or_amplification_heads_beyond_chance(patch):
    batch = fact_batch()
    found, moved = 0, 0.0
    for seed in range(20):
        scan = scan_heads(fact_model(n_layers=4, seed=seed, init=(0.3, 1.0)[seed % 2]), batch, window=2, patch=patch)
        moved = max(moved, float(scan.score.abs().max()))
        found += int(judge(scan, alpha=0.05, min_effect=0.01, seed=seed).detected.any())
    assert moved > 0.2  # sharp random heads do move the answer's probability
    # BH at 0.05 over 16 heads: a model of the null gets any detection with probability <= 0.05, so >= 4 of 20 models
    # has probability < 0.02
    assert found <= 3


def test_patching_finds_a_planted_amplifier_and_knockout_does_not():
    model = plant_amplifier_head(plant_memory_head(fact_model(n_layers=4)), layer=2, head=1)
    batch = fact_batch()
    memory = judge(scan_heads(model, batch, window=2), alpha=0.05, min_effect=0.01, seed=0).detected
    assert memory.nonzero().tolist() == [[0, 0]]
    rows, amplifying, _, summary = patching_amplification(model, batch, batch, memory, 0.05, 0.01, seed=0, check=False)
    assert amplifying.nonzero().tolist() == [[2, 1]] and summary["excluded_memory_heads"] == 1
    assert set(rows["effect_method"]) == {"patching"} and rows["detected"].sum() == 1


def test_patching_matches_a_full_forward_with_the_head_output_replaced():
    model = fact_model(n_layers=3, kv_heads=2, seed=2, init=0.5)
    batch = fact_batch()
    run = PrefixRun(model, batch["input_ids"], batch["subject_mask"])
    source = {layer: z.roll(1, 0) for layer, z in run.final_outputs().items()}
    ours = knockout_log_probs(run, head_plans(3, 4), batch["answers"][:, None], source=source)[..., 0]
    captured = {}
    with torch.no_grad(), hook_heads(model, lambda layer, z: captured.__setitem__(layer, z[:, -1].clone())):
        model(input_ids=batch["input_ids"])
    for layer, head in [(0, 2), (1, 1), (2, 3)]:
        def patch(at, z, layer=layer, head=head):
            if at != layer:
                return None
            z = z.clone()
            z[:, -1, head] = captured[layer].roll(1, 0)[:, head]
            return z

        with torch.no_grad(), hook_heads(model, patch):
            logits = model(input_ids=batch["input_ids"]).logits[:, -1]
        reference = logits.log_softmax(-1).gather(-1, batch["answers"][:, None])[:, 0]
        torch.testing.assert_close(ours[:, layer * 4 + head], reference, atol=2e-4, rtol=1e-4)


def test_a_cache_the_forward_ignores_is_caught(monkeypatch):
    from headlab.errors import HeadlabError
    from roles import knockout

    monkeypatch.setattr(knockout, "_cache_argument", lambda model: "ignored_cache")  # swallowed by **kwargs
    batch = fact_batch()
    with pytest.raises(HeadlabError, match="did not reproduce the full forward pass"):
        PrefixRun(fact_model(n_layers=2, init=0.5), batch["input_ids"], batch["subject_mask"])


def test_window_plans_cover_consecutive_layers():
    plans = window_plans(5, 2, 3)
    assert plans.shape == (3, 5, 2)
    assert plans[:, :, 0].int().tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert (plans[:, :, 0] == plans[:, :, 1]).all()


def test_depth_matched_groups_keep_the_layer_counts_and_avoid_the_detected_heads():
    detected = torch.zeros(4, 5, dtype=torch.bool)
    detected[0, 1] = detected[2, 0] = detected[2, 3] = True
    groups = depth_matched_groups(detected, 50, seed=0)
    assert (groups.sum(-1) == detected.sum(-1)).all()
    assert not (groups & detected).any()
    assert distinct_matched_groups(detected) == 4 * 3  # C(4, 1) * C(3, 2)


def test_sign_flip_p_matches_exact_enumeration():
    rng = np.random.default_rng(0)
    d = rng.normal(0.4, 1.0, size=(10, 3))
    signs = np.array(list(itertools.product([-1, 1], repeat=10)))  # all 1024 sign patterns
    exact = ((signs @ d / 10) >= d.mean(0) - 1e-12).mean(0)
    np.testing.assert_allclose(sign_flip_p(d, 40000, seed=1), exact, atol=0.01)
    constant = sign_flip_p(np.stack([np.ones(12), np.zeros(12)], 1), 99, seed=0)
    assert 0.01 <= constant[0] < 0.02 and constant[1] == 1.0  # 1 / (1 + 99) at best; a zero mean never passes
