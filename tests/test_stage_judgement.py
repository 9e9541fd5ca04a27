"""Readout R2 of the truthfulness steering check (probes/judgement.py, roles/stages/truth_judgement.py) on tiny
random Llama models: the prompt layout and its cached suffix against full prompts run alone (the edit added after
the output projection by a hook of the test's own), a planted two-layer truth path that must pass and reverse with
-alpha, random directions that must not pass, the stage check's controls and the verdict of both readouts."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import llama_o_proj, seeded_unit, tiny_model, word_tokenizer

from headlab.interventions import steer
from probes.answer_steering import edit_sigma
from probes.judgement import cached_inputs, judgement_batch, judgement_margins, r2_readout
from probes.steering import steering_check
from roles.stages.controls import check_entries
from roles.stages.truth_judgement import combined_verdict, judgement_prompts, truth_judgement
from roles.stages.truth_steering import FUNCTIONAL, NOT_DETECTED, UNUSED, TruthSteeringConfig

HEAD = (0, 2)  # layer 0, head 2 of the tiny Llama (4 heads of 8 dims: the o_proj input columns 16:24)
U, R, E = 12345, 777, 4242  # seeds of the planted directions; not seeds the checks draw with
ANSWERS = ("true", "false")  # the word tokenizer's lower-case vocabulary
WORDS = ["france", "germany", "italy", "city", "country", "store", "movie", "drink", "mary", "john"]
EXAMPLES = [{"text": f"the capital of {w} is {answer}", "label": label, "group": w}
            for i, w in enumerate(WORDS) for answer, label in ((WORDS[i - 1], True), (WORDS[i - 2], False))]
CONFIG = TruthSteeringConfig(ks=(1,), alphas=(4.0,), main_k=1, main_alpha=4.0, n_random=39, n_shots=4,
                             n_statements=6)
SHOTS, STATEMENTS, CUE = [2, 3, 4, 5, 6, 7, 8, 9], [[10, 11, 12], [13, 14], [15, 16, 17, 18]], [19, 20]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, causal_lm=True)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(bos=True)


@pytest.fixture(scope="module")
def planted(model):
    """A copy with a truth path through both layers: head (0, 2) writes only along ``r`` (rank one, read through
    ``u``); layer 1's first key/value head reads ``r`` into ``e``, and its two query heads write ``e`` onto
    ``W_U[true] - W_U[false]`` (both scaled small, so that the norms stay in their linear range). Shifting (0, 2)
    along ``u`` at a statement's last token raises the judgement margin at the final position, which attends to
    it."""
    planted = copy.deepcopy(model)
    w_u = planted.lm_head.weight.detach()
    true, false = (word_tokenizer()(w, add_special_tokens=False)["input_ids"][0] for w in ANSWERS)
    target = w_u[true] - w_u[false]
    r, e = seeded_unit(R, 32), seeded_unit(E)
    with torch.no_grad():
        llama_o_proj(planted, 0).weight[:, 16:24] = 0.5 * r[:, None] * seeded_unit(U)[None, :]
        planted.model.layers[1].self_attn.v_proj.weight[0:8] = e[:, None] * r[None, :]
        llama_o_proj(planted, 1).weight[:, 0:16] = 0.05 * (target / target.norm())[:, None] * e.repeat(2)[None, :]
    return planted


def _margin_alone(model, tokens: list[int], true: int, false: int, edit_at: int | None = None,
                  write: torch.Tensor | None = None, layer: int = 0) -> float:
    """logit(true) - logit(false) at the last position of one unpadded, uncached forward; ``write`` ([d_model]) is
    added to layer ``layer``'s o_proj output at position ``edit_at`` (an independent implementation of the edit)."""
    handle = None
    if write is not None:
        def add(_module, _args, out):
            out = out.clone()
            out[0, edit_at] += write
            return out
        handle = llama_o_proj(model, layer).register_forward_hook(add)
    try:
        with torch.no_grad():
            last = model(torch.tensor([tokens])).logits[0, -1].float()
    finally:
        if handle is not None:
            handle.remove()
    return float(last[true] - last[false])


def test_judgement_batch_layout_by_hand():
    b = judgement_batch([1, 2], [[7, 8, 9], [4]], [True, False], [5, 6], token_true=10, token_false=11, pad_id=0)
    assert b.prefix_ids.tolist() == [[1, 2, 7, 8], [0, 0, 1, 2]]  # left padded: the shots and all but the last token
    assert b.prefix_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert b.suffix_ids.tolist() == [[9, 5, 6], [4, 5, 6]]  # the statement's last token, then the cue
    assert b.edit.tolist() == [[True, False, False]] * 2 and b.final.tolist() == [[False, False, True]] * 2
    assert b.labels.tolist() == [True, False] and (b.token_true, b.token_false) == (10, 11)


def test_answers_sharing_a_first_token_are_refused():
    from headlab.errors import HeadlabError

    with pytest.raises(HeadlabError, match="share their first token"):
        judgement_batch([1], [[2, 3]], [True], [4], token_true=5, token_false=5)


def test_prompt_builder_known_answer(tokenizer):
    """Each row is BOS + the shots' lines + the statement + the cue, as the tokenizer reads the whole text; shots
    and statements come from distinct countries, half of each true, and the answers are the first tokens."""
    batch, info = judgement_prompts(tokenizer, 4, 6, seed=3, examples=EXAMPLES, answers=ANSWERS)
    by_text = {e["text"]: e for e in EXAMPLES}
    shots = [line.removesuffix(" This statement is: true").removesuffix(" This statement is: false")
             for line in info["prompt_shots"].splitlines()]
    assert [by_text[s]["label"] for s in shots].count(True) == 2
    for line, text in zip(info["prompt_shots"].splitlines(), shots):
        assert line == f"{text} This statement is: {'true' if by_text[text]['label'] else 'false'}"
    tests = info["test_statements"]
    assert len({by_text[t]["group"] for t in shots + tests}) == 10  # every country once
    assert batch.labels.tolist() == [by_text[t]["label"] for t in tests] and sum(batch.labels.tolist()) == 3
    for row, text in enumerate(tests):
        whole = tokenizer(info["prompt_shots"] + text + " This statement is:")["input_ids"]  # BOS first
        got = batch.prefix_ids[row][batch.prefix_mask[row].bool()].tolist() + batch.suffix_ids[row].tolist()
        assert got == whole
        assert batch.suffix_ids[row, 0] == tokenizer(text, add_special_tokens=False)["input_ids"][-1]
    assert (batch.token_true, batch.token_false) == (tokenizer.convert_tokens_to_ids("true"),
                                                     tokenizer.convert_tokens_to_ids("false"))


def test_cached_margins_match_each_prompt_run_alone(model):
    batch = judgement_batch(SHOTS, STATEMENTS, [True, False, True], CUE, token_true=7, token_false=9)
    inputs = cached_inputs(model, batch)
    alone = [_margin_alone(model, SHOTS + s + CUE, 7, 9) for s in STATEMENTS]
    assert judgement_margins(model, inputs, batch).tolist() == pytest.approx(alone, abs=1e-4)
    assert judgement_margins(model, inputs, batch).tolist() == pytest.approx(alone, abs=1e-4)  # cache not consumed
    direction = 3.0 * seeded_unit(1)
    write = llama_o_proj(model, 0).weight.detach()[:, 16:24] @ direction  # the head's write of the shift
    edited = [_margin_alone(model, SHOTS + s + CUE, 7, 9, len(SHOTS) + len(s) - 1, write) for s in STATEMENTS]
    got = judgement_margins(model, inputs, batch, steer({HEAD: direction}, 1.0, batch.edit))
    assert got.tolist() == pytest.approx(edited, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(edited, alone)) > 1e-4  # the edit reached the final position


def test_sigma_is_the_std_at_the_statements_last_tokens(model):
    batch = judgement_batch(SHOTS, STATEMENTS, [True, False, True], CUE, token_true=7, token_false=9)
    seen = []
    handle = llama_o_proj(model, 0).register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, -1, 16:24]))
    try:
        with torch.no_grad():
            for s in STATEMENTS:
                model(torch.tensor([SHOTS + s]))
    finally:
        handle.remove()
    projections = torch.stack(seen) @ seeded_unit(U)
    got = edit_sigma(model, cached_inputs(model, batch), batch.edit, {HEAD: seeded_unit(U)})[HEAD]
    assert got == pytest.approx(float(projections.std(unbiased=False)), rel=1e-4)


def test_planted_truth_path_passes_r2_and_reverses(planted, tokenizer):
    batch, _ = judgement_prompts(tokenizer, 4, 6, seed=0, examples=EXAMPLES, answers=ANSWERS)
    inputs = cached_inputs(planted, batch)
    sigma = edit_sigma(planted, inputs, batch.edit, {HEAD: seeded_unit(U)})[HEAD]
    result = steering_check(planted, inputs, r2_readout(batch), {HEAD: seeded_unit(U) * sigma}, alpha=4.0, n_random=99,
                            seed=0, positions=batch.edit)
    assert result.passed and result.p_value == pytest.approx(0.01) and result.min_attainable_p == pytest.approx(0.01)
    assert result.shift_negative < 0 < result.shift and result.shift > 1e-3  # float noise is ~1e-6
    write = llama_o_proj(planted, 0).weight.detach()[:, 16:24] @ (4.0 * sigma * seeded_unit(U))
    first = batch.prefix_mask.sum(1)  # the edited token's position in each full prompt
    rows = [batch.prefix_ids[i][batch.prefix_mask[i].bool()].tolist() + batch.suffix_ids[i].tolist()
            for i in range(len(first))]
    by_hand = [_margin_alone(planted, t, batch.token_true, batch.token_false, int(f), write)
               - _margin_alone(planted, t, batch.token_true, batch.token_false) for t, f in zip(rows, first)]
    assert result.shift == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-4)


def test_random_directions_on_a_random_model_pass_at_most_at_the_nominal_rate(model, tokenizer):
    """A random "probe" direction is exchangeable with the null draws: it passes with probability at most 1/20.
    Over 20 checks, Binomial(20, 0.05) exceeds 4 with probability < 0.003."""
    batch, _ = judgement_prompts(tokenizer, 4, 6, seed=1, examples=EXAMPLES, answers=ANSWERS)
    inputs = cached_inputs(model, batch)
    passes = 0
    for seed in range(20):
        directions = {(0, 1): seeded_unit(100 + 2 * seed), HEAD: seeded_unit(101 + 2 * seed)}
        passes += steering_check(model, inputs, r2_readout(batch), directions, alpha=4.0, n_random=19, seed=seed,
                                 positions=batch.edit).passed
    assert passes <= 4


def _units() -> dict:
    return {(layer, head): seeded_unit(200 + 4 * layer + head) for layer in range(2) for head in range(4)}


def test_stage_check_on_a_random_model_and_its_controls(model, tokenizer):
    """Random "probe" directions on a random model: not functional; the direct-path positive control (the last
    layer's heads, at the final position) passes the same statistic; random directions in place of the probe's
    do not."""
    out = truth_judgement(model, tokenizer, [(0, 1), (0, 3)], _units(), 0, CONFIG, EXAMPLES, ANSWERS)
    assert out["readout"] == "R2" and out["verdict"] == UNUSED and not out["passed"]
    assert out["positive_control_passed"] and out["positive_control_p"] == pytest.approx(1 / 40)
    assert out["positive_control_heads"] == [[1, 0]] and out["positive_control_shift_negative"] < 0
    assert not out["negative_control_passed"]
    assert out["min_attainable_p"] == pytest.approx(1 / 40) and out["statements"] == 6 and out["shots"] == 4
    assert [(row["k"], row["alpha"]) for row in out["dose_response"]] == [(1, 4.0), (1, -4.0)]
    assert out["dose_response"][0]["margin_shift"] == pytest.approx(out["shift"], abs=1e-6)
    assert out["shift"] == pytest.approx((out["shift_true"] + out["shift_false"]) / 2, abs=1e-6)  # 3 true, 3 false
    assert "full stop" in out["edit_applied_at"] and "full stop" in out["probe_trained_at"]


def test_stage_check_on_the_planted_model_is_functional(planted, tokenizer):
    """Functional, with sigma and the shift recomputed from the prompts the check reports, each run alone: sigma
    the std of the head's projection at each statement's last token, the edit written there."""
    out = truth_judgement(planted, tokenizer, [HEAD, (0, 1)], {**_units(), HEAD: seeded_unit(U)}, 0, CONFIG, EXAMPLES,
                          ANSWERS)
    assert out["verdict"] == FUNCTIONAL and out["heads"] == [list(HEAD)] and out["p_value"] == pytest.approx(1 / 40)
    assert out["shift_false"] > 0 and out["shift_true"] > 0 and out["shift_negative_false"] < 0
    assert out["positive_control_passed"] and not out["negative_control_passed"]
    true, false = (tokenizer.convert_tokens_to_ids(a) for a in ANSWERS)
    prompts = [tokenizer(out["prompt_shots"] + text + " This statement is:")["input_ids"]
               for text in out["test_statements"]]
    edited = [len(tokenizer(out["prompt_shots"] + text)["input_ids"]) - 1 for text in out["test_statements"]]
    seen = []
    handle = llama_o_proj(planted, 0).register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, :, 16:24]))
    try:
        with torch.no_grad():
            for tokens in prompts:
                planted(torch.tensor([tokens]))
    finally:
        handle.remove()
    sigma = float((torch.stack([z[t] for z, t in zip(seen, edited)]) @ seeded_unit(U)).std(unbiased=False))
    assert out["sigma"]["0.2"] == pytest.approx(sigma, rel=1e-4)
    write = llama_o_proj(planted, 0).weight.detach()[:, 16:24] @ (CONFIG.main_alpha * sigma * seeded_unit(U))
    by_hand = [_margin_alone(planted, tokens, true, false, t, write) - _margin_alone(planted, tokens, true, false)
               for tokens, t in zip(prompts, edited)]
    assert out["shift"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-4)


def test_a_tokenizer_without_the_answers_gives_a_check_that_did_not_run(model, tokenizer):
    """The word tokenizer knows no TRUE or FALSE: both answers are [UNK], so R2 cannot read a judgement."""
    out = truth_judgement(model, tokenizer, [(0, 1)], _units(), 0, CONFIG, EXAMPLES)
    assert out["verdict"] == UNUSED and out["p_value"] is None and "first token" in out["note"]


def test_combined_verdict_names_the_readout_that_decided():
    passed, failed = {"verdict": FUNCTIONAL, "p_value": 0.01}, {"verdict": UNUSED, "p_value": 0.5}
    not_run = {"verdict": UNUSED, "p_value": None}
    assert combined_verdict(failed, passed) == {"verdict": FUNCTIONAL, "decided_by": "steering:R2"}
    assert combined_verdict(passed, failed) == {"verdict": FUNCTIONAL, "decided_by": "steering:R1"}
    assert combined_verdict(passed, passed) == {"verdict": FUNCTIONAL, "decided_by": "steering:R1+R2"}
    assert combined_verdict(failed, failed) == {"verdict": UNUSED, "decided_by": "steering:R1+R2"}
    assert combined_verdict(failed, not_run) == {"verdict": UNUSED, "decided_by": "steering:R1"}
    assert combined_verdict(failed, None) == {"verdict": UNUSED, "decided_by": "steering:R1"}
    assert combined_verdict({"verdict": NOT_DETECTED}, None)["verdict"] == NOT_DETECTED


def test_checks_list_has_one_entry_per_readout():
    r2 = {"p_value": 0.01, "min_attainable_p": 0.01, "passed": True, "significance": 0.05, "readout": "R2",
          "positive_control_passed": True, "negative_control_passed": False, "verdict": FUNCTIONAL,
          "probe_trained_at": "here", "edit_applied_at": "here too"}
    steering = {"p_value": 0.5, "min_attainable_p": 0.01, "passed": False, "significance": 0.05, "readout": "R1",
                "positive_control_passed": True, "negative_control_passed": False, "r1_verdict": UNUSED,
                "verdict": FUNCTIONAL, "decided_by": "steering:R2", "edit_applied_at": "answers", "r2": r2}
    r1_entry, r2_entry = check_entries({}, steering, 0.05)
    assert (r1_entry["name"], r2_entry["name"]) == ("steering:truthfulness", "steering:truthfulness:r2")
    assert (r1_entry["readout_verdict"], r2_entry["readout_verdict"]) == (UNUSED, FUNCTIONAL)
    assert r1_entry["verdict"] == r2_entry["verdict"] == FUNCTIONAL and r2_entry["decided_by"] == "steering:R2"
    assert (r1_entry["p_value"], r2_entry["p_value"]) == (0.5, 0.01) and r2_entry["passed"] is True
    assert (r1_entry["edit_applied_at"], r2_entry["edit_applied_at"]) == ("answers", "here too")


def _tokenizer_with_upper_case_answers():
    """The word tokenizer with "TRUE" and "FALSE" in place of "true" and "false" (same ids), so that R2's default
    answers are known words."""
    import transformers
    from tiny_models import WORDS as VOCABULARY
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    words = [w.upper() if w in ANSWERS else w for w in VOCABULARY]
    backend = Tokenizer(models.WordLevel(vocab={"[PAD]": 0, "[UNK]": 1, "[BOS]": 2,
                                                **{w: i + 3 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]")


def test_steer_truth_runs_both_readouts_and_the_checks_list_holds_both(planted, tmp_path):
    """roles/stages/real.py's entry point on the planted model: R1 and R2 on the same ranked heads and directions
    (from directions.safetensors), R2 under ``r2``, the heads' verdict decided by R2, one checks entry each."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    from safetensors.numpy import save_file

    from headlab.models import LoadedModel
    from roles.stages.real import steer_truth

    units = {**_units(), HEAD: seeded_unit(U)}
    table = np.stack([np.stack([units[(layer, head)].numpy()[None] for head in range(4)]) for layer in range(2)])
    save_file({"mass_mean_direction": table.astype(np.float32)}, str(tmp_path / "directions.safetensors"))
    detected = pd.DataFrame({"layer": [0, 0], "head": [1, 2], "val_accuracy": [0.8, 0.9]})
    cfg = TruthSteeringConfig(ks=(1,), alphas=(4.0,), main_k=1, main_alpha=4.0, n_random=39, n_random_heads=2,
                              n_prompts=3, n_false=2, n_texts=4, n_shots=4, n_statements=6)
    loaded = LoadedModel(planted, _tokenizer_with_upper_case_answers(), "tiny", "tiny")
    pairs = [("france", "paris"), ("germany", "berlin"), ("italy", "rome")]
    out = steer_truth(loaded, SimpleNamespace(layers=[0, 1]), tmp_path, detected, 0, config=cfg, pairs=pairs,
                      examples=EXAMPLES)
    assert out["heads"] == out["r2"]["heads"] == [list(HEAD)]  # the best by validation accuracy, in both readouts
    assert out["r2"]["verdict"] == FUNCTIONAL and out["r2"]["answer_tokens"] == ["TRUE", "FALSE"]
    assert out["verdict"] == FUNCTIONAL and "R2" in out["decided_by"] and out["r1_verdict"] in (FUNCTIONAL, UNUSED)
    names = [entry["name"] for entry in check_entries({}, out, 0.05)]
    assert names == ["steering:truthfulness", "steering:truthfulness:r2"]
