"""Readout R1 of the truthfulness steering check (probes/answer_steering.py, roles/stages/truth_steering.py) on tiny
random Llama models: the candidate layout, the answer log-probabilities, sigma and KL against references computed
from the model's own forwards (each sequence scored alone, the edit added after the output projection), a planted
truth direction that must pass and reverse with -alpha, random directions that must not pass, and the stage check's
controls and verdict."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import llama_o_proj, seeded_unit, tiny_model, word_tokenizer

from headlab.interventions import steer
from probes.answer_steering import (
    answer_logprobs,
    candidate_batch,
    edit_kl,
    edit_sigma,
    margin,
    mc2,
    r1_readout,
    scores,
)
from probes.steering import steering_check
from roles.stages.truth_steering import (
    FUNCTIONAL,
    NOT_DETECTED,
    UNUSED,
    TruthSteeringConfig,
    truth_steering,
    truth_verdict,
)

HEAD = (1, 2)  # layer 1, head 2 of the tiny Llama (4 heads of 8 dims: the o_proj input columns 16:24)
U = 12345  # the planted direction's seed; not a seed the checks draw their random directions with
TRUE, FALSE = [5, 6], [[9], [11, 12], [13]]
PROMPTS = [[3, 4, 7, 8], [10, 14, 15], [16, 17, 18, 19, 20], [21, 22]]
PAIRS = [("france", "paris"), ("germany", "berlin"), ("italy", "rome")]  # in the word tokenizer's vocabulary


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, causal_lm=True)


@pytest.fixture(scope="module")
def batch():
    return candidate_batch(PROMPTS, [[TRUE, *FALSE]] * len(PROMPTS))


@pytest.fixture(scope="module")
def planted(model):
    """A copy whose head (1, 2) writes only along ``target = W_U[5] - mean W_U[9, 11, 13]`` (rank one, read through
    ``u``): shifting that head's output along ``u`` raises the true answer's first token over the false ones."""
    planted = copy.deepcopy(model)
    w_u = planted.lm_head.weight.detach()
    target = w_u[TRUE[0]] - w_u[[f[0] for f in FALSE]].mean(0)
    with torch.no_grad():
        llama_o_proj(planted, 1).weight[:, 16:24] = 2 * target[:, None] / target.norm() * seeded_unit(U)[None, :]
    return planted


def _score_alone(model, prompt, answer, edit=None) -> float:
    """Summed log p(answer | prompt) from one unpadded forward; ``edit`` ([d_model]) is added to the output of layer
    1's o_proj at the last prompt token and every answer token (an independent implementation of the edit)."""
    ids = torch.tensor([prompt + answer])
    handle = None
    if edit is not None:
        def add(_module, _args, out):
            out = out.clone()
            out[0, len(prompt) - 1:] += edit
            return out
        handle = llama_o_proj(model, 1).register_forward_hook(add)
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    finally:
        if handle is not None:
            handle.remove()
    return sum(float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(answer))


def _margin_alone(model, edit=None) -> float:
    per_prompt = []
    for prompt in PROMPTS:
        lp = [_score_alone(model, prompt, answer, edit) for answer in [TRUE, *FALSE]]
        per_prompt.append(lp[0] - np.mean(lp[1:]))
    return float(np.mean(per_prompt))


def test_candidate_batch_layout_by_hand():
    b = candidate_batch([[7, 8, 9], [4]], [[[5, 6], [10]], [[11], [12, 13]]], pad_id=0)
    assert b.input_ids.tolist() == [[7, 8, 9, 5, 6], [7, 8, 9, 10, 0], [4, 11, 0, 0, 0], [4, 12, 13, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    i = -100
    assert b.targets.tolist() == [[i, i, 5, 6, i], [i, i, 10, i, i], [11, i, i, i, i], [12, 13, i, i, i]]
    assert b.edit.int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert (b.n_prompts, b.n_candidates) == (2, 2)


def test_answer_logprobs_match_each_sequence_scored_alone(model, batch):
    with torch.no_grad():
        lp = answer_logprobs(model(**batch.inputs).logits, batch)
    alone = torch.tensor([[_score_alone(model, p, a) for a in [TRUE, *FALSE]] for p in PROMPTS])
    assert torch.allclose(lp, alone, atol=1e-4)
    assert torch.allclose(margin(lp), alone[:, 0] - alone[:, 1:].mean(1), atol=1e-4)
    by_hand = alone.exp()[:, 0] / alone.exp().sum(1)  # MC2: p_true / (p_true + sum p_false)
    assert torch.allclose(mc2(lp), by_hand, atol=1e-5)


def _head_input(model, batch) -> torch.Tensor:
    """Head 2's slice of layer 1's output-projection input ``[rows, seq, d_head]``, captured by its own hook."""
    seen = []
    handle = llama_o_proj(model, 1).register_forward_pre_hook(lambda _m, args: seen.append(args[0][..., 16:24].clone()))
    try:
        with torch.no_grad():
            model(**batch.inputs)
    finally:
        handle.remove()
    return seen[0]


def test_edit_sigma_is_the_std_of_the_projection_at_the_edited_positions(model, batch):
    seen = [_head_input(model, batch)]
    projections = (seen[0][batch.edit] @ seeded_unit(U)).numpy()
    assert edit_sigma(model, batch.inputs, batch.edit, {HEAD: seeded_unit(U)})[HEAD] == pytest.approx(
        float(np.std(projections)), rel=1e-5)


def test_edit_sigma_with_one_direction_per_row(model, batch):
    """Per-row directions: each row's projections on its own direction, pooled over the edited positions."""
    seen = [_head_input(model, batch)]
    rows = torch.stack([seeded_unit(400 + r) for r in range(batch.input_ids.shape[0])])  # [rows, d_head]
    by_hand = [float(seen[0][r, t] @ rows[r]) for r in range(rows.shape[0]) for t in range(batch.edit.shape[1])
               if batch.edit[r, t]]
    got = edit_sigma(model, batch.inputs, batch.edit, {HEAD: rows})[HEAD]
    assert got == pytest.approx(float(np.std(by_hand)), rel=1e-5)


def test_edit_kl_matches_kl_div_of_an_independent_edit(model, batch):
    inputs = batch.inputs
    shift = 3.0 * seeded_unit(1)
    edit = llama_o_proj(model, 1).weight.detach()[:, 16:24] @ shift  # the head's write of the shift
    with torch.no_grad():
        clean = torch.log_softmax(model(**inputs).logits, -1)
        handle = llama_o_proj(model, 1).register_forward_hook(lambda _m, _a, out: out + edit)
        try:
            edited = torch.log_softmax(model(**inputs).logits, -1)
        finally:
            handle.remove()
    kl = torch.nn.functional.kl_div(edited, clean, log_target=True, reduction="none").sum(-1)  # KL(clean || edited)
    expected = float(kl[inputs["attention_mask"].bool()].mean())
    assert edit_kl(model, inputs, steer({HEAD: seeded_unit(1)}, 3.0)) == pytest.approx(expected, rel=1e-4)
    assert edit_kl(model, inputs, steer({HEAD: seeded_unit(1)}, 0.0)) == pytest.approx(0.0, abs=1e-7)


def test_steer_adds_per_row_directions_only_at_marked_positions():
    z = torch.zeros(2, 3, 2, 4)
    rows = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    where = torch.tensor([[False, True, True], [True, False, False]])
    out = steer({(0, 1): rows}, 0.5, where)(0, z)
    expected = torch.zeros_like(z)
    expected[0, 1, 1, 0] = expected[0, 2, 1, 0] = 0.5
    expected[1, 0, 1, 1] = 1.0
    assert torch.equal(out, expected)


def test_planted_truth_direction_passes_r1(planted, batch):
    sigma = edit_sigma(planted, batch.inputs, batch.edit, {HEAD: seeded_unit(U)})[HEAD]
    result = steering_check(planted, batch.inputs, r1_readout(batch), {HEAD: seeded_unit(U) * sigma}, alpha=2.0,
                            n_random=99, seed=0, positions=batch.edit)
    assert result.passed and result.p_value <= 0.05 and result.min_attainable_p == pytest.approx(0.01)
    assert result.shift > max(result.random_shifts)  # a random direction's projection on u is below 1
    write = llama_o_proj(planted, 1).weight.detach()[:, 16:24] @ (2.0 * sigma * seeded_unit(U))
    assert result.shift == pytest.approx(_margin_alone(planted, write) - _margin_alone(planted), abs=1e-3)
    assert result.shift > 0.1  # nats: a real effect, not a rounding error


def test_negative_alpha_reverses_the_planted_effect(planted, batch):
    sigma = edit_sigma(planted, batch.inputs, batch.edit, {HEAD: seeded_unit(U)})[HEAD]
    result = steering_check(planted, batch.inputs, r1_readout(batch), {HEAD: seeded_unit(U) * sigma}, alpha=2.0,
                            n_random=19, seed=0, positions=batch.edit)
    write = llama_o_proj(planted, 1).weight.detach()[:, 16:24] @ (-2.0 * sigma * seeded_unit(U))
    assert result.shift_negative < 0 < result.shift
    assert result.shift_negative == pytest.approx(_margin_alone(planted, write) - _margin_alone(planted), abs=1e-3)


def test_random_directions_on_a_random_model_pass_at_most_at_the_nominal_rate(model, batch):
    """A random "probe" direction is exchangeable with the null draws: it passes (p <= 0.05 and a positive shift)
    with probability at most 1/20. Over 20 checks, Binomial(20, 0.05) exceeds 4 with probability < 0.003."""
    heads = [(1, 0), (1, 2)]
    passes = 0
    for seed in range(20):
        directions = {h: seeded_unit(100 + 10 * seed + k) * 0.5 for k, h in enumerate(heads)}
        passes += steering_check(model, batch.inputs, r1_readout(batch), directions, alpha=5.0, n_random=19,
                                 seed=seed, positions=batch.edit).passed
    assert passes <= 4


def test_scores_read_the_unedited_and_edited_model(planted, batch):
    base = scores(planted, batch)
    up = scores(planted, batch, steer({HEAD: seeded_unit(U)}, 1.0, batch.edit))
    assert base["margin"] == pytest.approx(_margin_alone(planted), abs=1e-4)
    assert up["margin"] > base["margin"] and up["mc2"] > base["mc2"]


def test_answer_logit_directions_by_hand(model):
    """W_O[h] diag(g) (W_U[true] - mean W_U[false]) per prompt, repeated over the prompt's candidates."""
    from roles.stages.truth_steering import answer_logit_directions

    first = torch.tensor([[5, 9, 11], [13, 5, 9]])
    got = answer_logit_directions(model, [HEAD], first, 3)[HEAD]
    w_u, gain = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    w_o = llama_o_proj(model, 1).weight.detach()[:, 16:24]  # [d_model, d_head]: the head's columns of o_proj
    for row, (t, *f) in enumerate(first.tolist()):
        expected = w_o.T @ (gain * (w_u[t] - w_u[f].mean(0)))
        for c in range(3):
            assert torch.allclose(got[3 * row + c], expected, atol=1e-5)


def test_truth_verdict_rules():
    assert truth_verdict(False, None) == NOT_DETECTED
    assert truth_verdict(True, {"passed": True, "shift_negative": -0.1}) == FUNCTIONAL
    assert truth_verdict(True, {"passed": True, "shift_negative": 0.1}) == UNUSED  # the sign did not reverse
    assert truth_verdict(True, {"passed": False, "shift_negative": -0.1}) == UNUSED


def test_stage_check_on_a_random_model_its_controls_and_dose_table(model):
    """Random "probe" directions on a random model: not functional; the direct-path positive control (the last
    layer's heads) passes the same statistic; the dose table holds every (K, +-alpha) with its KL on generic text."""
    units = {(layer, head): seeded_unit(200 + 4 * layer + head) for layer in range(2) for head in range(4)}
    cfg = TruthSteeringConfig(ks=(1, 2), alphas=(2.0,), main_k=2, main_alpha=2.0, n_random=39, n_random_dose=19,
                              n_random_heads=4, n_prompts=3, n_false=2, n_texts=4)
    out = truth_steering(model, word_tokenizer(bos=True), [(1, 0), (1, 1)], units, 4, 0, cfg, PAIRS)
    assert out["verdict"] == UNUSED and out["decided_by"] == "steering:R1" and not out["passed"]
    assert out["positive_control_passed"] and out["positive_control_p"] == pytest.approx(1 / 40)
    assert out["positive_control_heads"] == [[1, 0], [1, 1]]  # the last layer's heads
    assert out["positive_control_shift"] > 0 > out["positive_control_shift_negative"]
    assert not out["negative_control_passed"]
    assert [(row["k"], row["alpha"]) for row in out["dose_response"]] == [(1, 2.0), (1, -2.0), (2, 2.0), (2, -2.0)]
    assert all(row["kl"] > 0 and 0 < row["mc2"] < 1 for row in out["dose_response"])
    assert out["dose_response"][2]["mc2"] == pytest.approx(out["steered_mc2"])  # K = 2 at +alpha: the main dose
    assert out["min_attainable_p"] == pytest.approx(1 / 40) and out["prompts"] == 3 and out["n_false"] == 2
    assert set(out["sigma"]) == {"1.0", "1.1"} and out["random_heads_p"] is not None


def test_no_detected_heads_is_not_detected(model):
    assert truth_steering(model, word_tokenizer(bos=True), [], {}, 4, 0)["verdict"] == NOT_DETECTED


def test_a_tokenizer_that_cannot_tell_capitals_apart_gives_a_check_that_did_not_run(model):
    """The word tokenizer knows no capitalised country or capital: every answer is [UNK], so R1 has nothing to
    compare; the check says so instead of failing the stage map."""
    out = truth_steering(model, word_tokenizer(bos=True), [(1, 0)], {(1, 0): seeded_unit(3)}, 4, 0)
    assert out["verdict"] == UNUSED and out["p_value"] is None and "distinct first tokens" in out["note"]


def test_steer_truth_ranks_detected_heads_and_reads_the_probe_table(model, tmp_path):
    """roles/stages/real.py's entry point: heads ranked by validation accuracy, directions from the probe's
    directions.safetensors (mass_mean_direction [layers, heads, 1, d_head])."""
    from types import SimpleNamespace

    import pandas as pd
    from safetensors.numpy import save_file

    from headlab.models import LoadedModel
    from roles.stages.real import steer_truth

    table = np.stack([np.stack([seeded_unit(300 + 4 * layer + head).numpy()[None] for head in range(4)])
                      for layer in range(2)]).astype(np.float32)
    save_file({"mass_mean_direction": table}, str(tmp_path / "directions.safetensors"))
    detected = pd.DataFrame({"layer": [1, 0, 1], "head": [0, 3, 2], "val_accuracy": [0.8, 0.9, 0.85]})
    cfg = TruthSteeringConfig(ks=(2,), alphas=(2.0,), main_k=2, main_alpha=2.0, n_random=19, n_random_heads=2,
                              n_prompts=3, n_false=2, n_texts=4)
    loaded = LoadedModel(model, word_tokenizer(bos=True), "tiny", "tiny")
    out = steer_truth(loaded, SimpleNamespace(layers=[0, 1]), tmp_path, detected, 0, config=cfg, pairs=PAIRS)
    assert out["heads"] == [[0, 3], [1, 2]]  # the two best by validation accuracy
    assert out["verdict"] in (FUNCTIONAL, UNUSED) and out["config"]["main_k"] == 2
