"""The truthfulness heads' causal check, readout R2 (Marks & Tegmark 2023, "The Geometry of Truth",
``saprmarks/geometry-of-truth`` ``interventions.py``): shift the probe's heads along their mass-mean truth directions
at a test statement's full stop inside a few-shot true/false prompt, and read the judgement margin
``logit(" TRUE") - logit(" FALSE")`` at the final position (:mod:`probes.judgement`).

* **Prompt.** ``n_shots`` labelled statements of the capitals set the probe was trained on ("The capital of X is
  Y.", half of them true), each as ``"<statement> This statement is: TRUE|FALSE"`` on its own line, then a test
  statement and ``" This statement is:"``. ``n_statements`` test statements (half true) from other countries.
* **Where.** The probe read the statements' last token (their full stop, ``positions="last"``); the edit is applied
  there, at the test statement's full stop, and ``sigma_h`` is measured there (:func:`probes.answer_steering.
  edit_sigma`).
* **Statistic.** :func:`probes.steering.steering_check`, as R1's: the mean margin shift over statements at
  ``+main_alpha`` on the ``main_k`` best heads against ``n_random`` random directions with the same per-head norms on
  the same heads (``p <= significance`` with a positive shift); ``-main_alpha`` must reverse the sign. The shift is
  also reported on the true and on the false statements (steering towards truth should raise the margin of false
  statements), and at every ``(K, +-alpha)`` of R1's grid without random draws.
* **Positive control.** Marks & Tegmark's readout is read at the final position, where a head's direct path to the
  logits is ``W_O[h] diag(g) (W_U[TRUE] - W_U[FALSE])`` (``g`` the final norm's gain). As many heads of the last
  layers as the main check steers, each along that direction scaled by its sigma at the final position and applied
  there, move the margin by construction; they must pass the same statistic. (The probe's middle-layer heads along
  that direction would not show that the readout can respond: their direct path is a small part of their effect.)
  **Negative control.** Random directions of the probe directions' norms in their place, at the full stop, which
  must not pass.
* **Verdict.** As R1's (:func:`roles.stages.truth_steering.truth_verdict`); :func:`combined_verdict` joins both
  readouts: ``functional`` when either readout's main check passes with the sign reversed, naming which.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch
from torch import nn

from data.builtin import capitals
from headlab.errors import HeadlabError
from headlab.interventions import steer
from headlab.models import input_device
from probes.answer_steering import edit_sigma
from probes.judgement import CachedPrefix, JudgementBatch, cached_inputs, judgement_batch, judgement_margins, r2_readout
from probes.steering import steering_check
from roles.batches import text_frame
from roles.stages.truth_steering import (
    FUNCTIONAL,
    NOT_DETECTED,
    PROBE_POSITION,
    UNUSED,
    TruthSteeringConfig,
    answer_logit_directions,
    last_heads,
    random_direction_control,
    truth_verdict,
)

Head = tuple[int, int]
CUE = " This statement is:"
ANSWERS = ("TRUE", "FALSE")
R2_EDIT = "the test statement's full stop in the few-shot prompt (the probe's own position)"
R2_FORMULA = ("logit(first token of ' TRUE') - logit(first token of ' FALSE') after '<statement> This statement is:' "
              "in a few-shot prompt, edited at the statement's full stop")


def capital_statements() -> list[dict]:
    """The capitals set's statements of the form "The capital of X is Y." (``text``, ``label``, ``group``)."""
    return [e for e in capitals() if e["text"].startswith("The capital of ")]


def _pick(examples: list[dict], n: int, countries: list[str], rng: random.Random) -> list[dict]:
    """``n`` statements, half true (rounded up) in a seeded order, one per country: each the first country left in
    ``countries`` with a statement of that label (the countries used are removed from ``countries``)."""
    wanted = [True] * (n - n // 2) + [False] * (n // 2)
    rng.shuffle(wanted)
    by = {(e["group"], bool(e["label"])): e for e in examples}
    chosen = []
    for label in wanted:
        country = next((c for c in countries if (c, label) in by), None)
        if country is None:
            raise HeadlabError(f"R2 needs {n} labelled statements of distinct countries; the set has too few")
        countries.remove(country)
        chosen.append(by[(country, label)])
    return chosen


def judgement_prompts(tokenizer, n_shots: int, n_statements: int, seed: int, examples: list[dict] | None = None,
                      answers: tuple[str, str] = ANSWERS, cue: str = CUE) -> tuple[JudgementBatch, dict]:
    """R2's batch (module docstring): shots and test statements of distinct countries drawn with ``seed`` from
    ``examples`` (default: :func:`capital_statements`); returns it and what was built (shots text, answer tokens)."""
    examples = capital_statements() if examples is None else examples
    rng = random.Random(seed)
    countries = sorted({e["group"] for e in examples})
    rng.shuffle(countries)
    shots, tests = _pick(examples, n_shots, countries, rng), _pick(examples, n_statements, countries, rng)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    lines = "".join(f"{e['text']}{cue} {answers[0] if e['label'] else answers[1]}\n" for e in shots)
    prefix, _ = text_frame(tokenizer)
    first_true, first_false = encode(" " + answers[0])[0], encode(" " + answers[1])[0]
    batch = judgement_batch(prefix + encode(lines), [encode(e["text"]) for e in tests],
                            [bool(e["label"]) for e in tests], encode(cue), first_true, first_false,
                            pad_id=tokenizer.pad_token_id or 0)
    info = {"prompt_shots": lines, "test_statements": [e["text"] for e in tests],
            "answer_tokens": [tokenizer.decode([first_true]), tokenizer.decode([first_false])]}
    return batch, info


def _by_label(shift: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"true": float(shift[labels].mean()), "false": float(shift[~labels].mean())}


def _dose(model, inputs, batch, scaled, heads, alpha, base) -> list[dict]:
    """Two dose rows (``+alpha``, ``-alpha``) of ``heads``: the mean margin shift over all, true and false
    statements (no random draws)."""
    rows = []
    for sign in (1, -1):
        shift = judgement_margins(model, inputs, batch, steer({h: scaled[h] for h in heads}, sign * alpha,
                                                              batch.edit)) - base
        by = _by_label(shift, batch.labels.cpu())
        rows.append({"k": len(heads), "alpha": sign * alpha, "margin_shift": float(shift.mean()),
                     "margin_shift_true": by["true"], "margin_shift_false": by["false"]})
    return rows


def positive_control(model: nn.Module, inputs: CachedPrefix, batch: JudgementBatch, k: int,
                     cfg: TruthSteeringConfig, seed: int) -> dict:
    """The ``k`` heads of the last layers along ``W_O[h] diag(g) (W_U[TRUE] - W_U[FALSE])``, scaled by their sigma at
    the final position and applied there, through the main check's statistic; it must pass."""
    heads = last_heads(model, k)
    pair = torch.tensor([[batch.token_true, batch.token_false]])
    raw = {h: d[0] for h, d in answer_logit_directions(model, heads, pair, 1).items()}
    units = {h: d / d.norm() for h, d in raw.items()}
    sigma = edit_sigma(model, inputs, batch.final, units)
    result = steering_check(model, inputs, r2_readout(batch), {h: units[h] * sigma[h] for h in heads},
                            cfg.main_alpha, n_random=cfg.n_random, seed=seed + 11, significance=cfg.significance,
                            positions=batch.final)
    return {"positive_control_passed": result.passed, "positive_control_p": result.p_value,
            "positive_control_shift": result.shift, "positive_control_shift_negative": result.shift_negative,
            "positive_control_heads": [list(h) for h in heads], "positive_control_edit": "the final position"}


def negative_control(model: nn.Module, inputs: CachedPrefix, batch: JudgementBatch,
                     scaled: Mapping[Head, torch.Tensor], heads: list[Head], cfg: TruthSteeringConfig,
                     seed: int) -> dict:
    """R2's negative control (:func:`roles.stages.truth_steering.random_direction_control` at the full stop)."""
    return random_direction_control(model, inputs, r2_readout(batch), scaled, heads, batch.edit, cfg, seed + 199,
                                    seed + 12)


def r2_not_run(reason: str, cfg: TruthSteeringConfig) -> dict:
    """R2's dict when it could not run (``note`` says why)."""
    return {"readout": "R2", "verdict": UNUSED, "note": reason, "passed": False, "p_value": None,
            "min_attainable_p": None, "significance": cfg.significance, "positive_control_passed": None,
            "negative_control_passed": None, "probe_trained_at": PROBE_POSITION, "edit_applied_at": R2_EDIT}


@torch.no_grad()
def truth_judgement(model: nn.Module, tokenizer, ranked: list[Head], units: Mapping[Head, torch.Tensor], seed: int,
                    cfg: TruthSteeringConfig | None = None, examples: list[dict] | None = None,
                    answers: tuple[str, str] = ANSWERS) -> dict:
    """The R2 steering check of the detected heads ``ranked`` (best first) along the unit directions ``units``,
    with its per-label shifts, dose rows, controls and verdict (module docstring). ``examples``: labelled
    statements (``text``, ``label``, ``group``) in place of the capitals set."""
    cfg = cfg or TruthSteeringConfig()
    if not ranked:
        return {"readout": "R2", "verdict": NOT_DETECTED}
    try:
        batch, info = judgement_prompts(tokenizer, cfg.n_shots, cfg.n_statements, seed + 7, examples, answers)
    except HeadlabError as error:  # e.g. a tokenizer whose TRUE and FALSE share a first token
        return r2_not_run(str(error), cfg)
    batch = batch.to(input_device(model))
    inputs = cached_inputs(model, batch)
    main_k = min(cfg.main_k, len(ranked))
    heads = ranked[:main_k]
    sigma = edit_sigma(model, inputs, batch.edit, {h: units[h] for h in ranked[: max(*cfg.ks, main_k)]})
    scaled = {h: units[h].float() * sigma[h] for h in sigma}
    main = steering_check(model, inputs, r2_readout(batch), {h: scaled[h] for h in heads}, cfg.main_alpha,
                          n_random=cfg.n_random, seed=seed + 10, significance=cfg.significance,
                          positions=batch.edit).as_dict()
    base = judgement_margins(model, inputs, batch)
    labels = batch.labels.cpu()
    dose = [row for k in sorted({min(k, len(ranked)) for k in (*cfg.ks, main_k)})
            for alpha in sorted({*cfg.alphas, cfg.main_alpha})
            for row in _dose(model, inputs, batch, scaled, ranked[:k], alpha, base)]
    at_main = {row["alpha"]: row for row in dose if row["k"] == main_k and abs(row["alpha"]) == cfg.main_alpha}
    return {**main, "readout": "R2", "verdict": truth_verdict(True, main), "readout_formula": R2_FORMULA,
            "probe_trained_at": PROBE_POSITION, "edit_applied_at": R2_EDIT,
            "sigma": {f"{h[0]}.{h[1]}": sigma[h] for h in heads},
            "baseline_margin_true": float(base[labels].mean()), "baseline_margin_false": float(base[~labels].mean()),
            "baseline_accuracy": float(((base > 0) == labels).float().mean()),
            "shift_true": at_main[cfg.main_alpha]["margin_shift_true"],
            "shift_false": at_main[cfg.main_alpha]["margin_shift_false"],
            "shift_negative_true": at_main[-cfg.main_alpha]["margin_shift_true"],
            "shift_negative_false": at_main[-cfg.main_alpha]["margin_shift_false"],
            "dose_response": dose, "statements": len(labels), "shots": cfg.n_shots, **info,
            **positive_control(model, inputs, batch, main_k, cfg, seed),
            **negative_control(model, inputs, batch, scaled, heads, cfg, seed)}


def combined_verdict(r1: Mapping, r2: Mapping | None) -> dict:
    """The truthfulness heads' verdict from both readouts: ``functional`` when either readout's main check passed
    with the sign reversed at ``-alpha``; ``decided_by`` names the readouts that passed (``steering:R1``,
    ``steering:R2`` or ``steering:R1+R2``), or, when none did, every readout that was run."""
    readouts = {"R1": r1} if r2 is None else {"R1": r1, "R2": r2}
    if any(r.get("verdict") == NOT_DETECTED for r in readouts.values()):
        return {"verdict": NOT_DETECTED, "decided_by": None}
    passed = [name for name, r in readouts.items() if r.get("verdict") == FUNCTIONAL]
    names = passed or [name for name, r in readouts.items() if r.get("p_value") is not None] or list(readouts)
    return {"verdict": FUNCTIONAL if passed else UNUSED, "decided_by": "steering:" + "+".join(names)}
