"""The truthfulness heads' causal check, readout R1 (Inference-Time Intervention's answer scoring, Li et al. 2023):
shift the probe's heads along their mass-mean truth directions at the last prompt token and the answer tokens of
"The capital of X is" + " <capital>", and read the true answer's summed log-probability minus the false ones'
(:mod:`probes.answer_steering`).

* **Scale.** ``alpha * sigma_h * theta_h``, ``sigma_h`` measured at the edited positions (not at the full stop the
  probe read).
* **Statistic.** :func:`probes.steering.steering_check`: the mean margin shift at ``+alpha`` against ``n_random``
  random directions of the same per-head norms on the same heads (Monte Carlo p-value, pass at ``p <= alpha`` with a
  positive shift).
* **Dose-response.** Every ``(K, alpha)`` of the grid, each at ``+alpha`` and ``-alpha`` (the sign must reverse), with
  the edit's KL on generic text (:func:`probes.answer_steering.edit_kl`) so methods compare at equal disruption.
* **Second comparison.** ``K`` random heads matched in depth (for each steered head another head of its layer) along
  their own mass-mean directions, scaled the same way: the share of such sets whose shift reaches the probe's.
* **Positive control.** As many heads of the last layers, each along its direct-path direction
  ``W_O[h] diag(g) (W_U[true] - mean_i W_U[false_i])`` (first answer tokens, per prompt; ``g`` the final norm's gain)
  scaled by its sigma at the edited positions: it moves R1 by construction, so it must pass the same statistic (in
  middle layers the direct path is a small part of a head's effect, so the probe's own heads would not show that the
  readout can respond). **Negative control.** Random directions in place of the probe's, which must not pass.
* **Verdict.** ``functional`` when the main check (``main_k`` heads at ``main_alpha``) passes and ``-alpha`` reverses
  the sign; ``carries information but was not shown to be used`` for detected heads otherwise; ``not detected``
  without detected heads.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from data.builtin import countries, ioi, sentiment
from headlab.errors import HeadlabError
from headlab.heads import head_sites, output_weights
from headlab.interventions import steer
from headlab.models import input_device
from headlab.placement import real_tensor
from probes.answer_steering import CandidateBatch, candidate_batch, edit_kl, edit_sigma, r1_readout, scores
from probes.steering import steering_check
from roles.batches import text_frame
from roles.groups import depth_matched_groups
from roles.ov import final_norm_gain

Head = tuple[int, int]
TEMPLATE = "The capital of {country} is"
FUNCTIONAL, UNUSED, NOT_DETECTED = "functional", "carries information but was not shown to be used", "not detected"
PROBE_POSITION = "the full stop of a capitals statement ('The capital of X is Y.', cache positions=last)"
R1_EDIT = "the last prompt token and the answer tokens of 'The capital of X is' + ' <capital>'"


@dataclass
class TruthSteeringConfig:
    ks: tuple[int, ...] = (8, 16)
    """Numbers of heads steered together (the best by validation accuracy); clipped to the detected heads."""
    alphas: tuple[float, ...] = (5.0, 15.0)
    """Steering strengths, each also run negated; ITI's default is 15."""
    main_k: int = 8
    main_alpha: float = 15.0
    """The dose that decides the verdict."""
    n_random: int = 99
    """Random direction sets of the main check and its controls (the p-value cannot go below 1 / (n_random + 1))."""
    n_random_dose: int = 0
    """Random direction sets of every other dose (descriptive p-values, no smaller than 1 / (n_random_dose + 1));
    0 (the default) reports their shifts only: the verdict is decided at the main dose, and 19 draws for each of
    the three other doses were 57 of the check's ~330 forward passes of SmolLM2"""
    n_random_heads: int = 19
    """Depth-matched random head sets."""
    significance: float = 0.05
    n_prompts: int = 8
    n_false: int = 3
    """False capitals per prompt (the MC2 share's denominator)."""
    n_texts: int = 16
    """Generic texts (templated reviews and IOI sentences) for the KL of each edit."""
    n_shots: int = 6
    """R2: labelled example statements of the few-shot prompt (:mod:`roles.stages.truth_judgement`)."""
    n_statements: int = 16
    """R2: test statements judged (half true)."""


def capital_candidates(tokenizer, n_prompts: int, n_false: int, seed: int,
                       pairs: list[tuple[str, str]] | None = None) -> tuple[CandidateBatch, torch.Tensor]:
    """R1's batch on "The capital of X is" prompts: the true capital and ``n_false`` other capitals per prompt
    (seeded), each with a leading space; prompts whose answers do not differ in their first token are dropped.
    Returns the batch and the candidates' first tokens ``[N, 1 + n_false]`` (true first)."""
    pairs = countries() if pairs is None else pairs
    prefix, _ = text_frame(tokenizer)
    rng = random.Random(seed)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts, candidates = [], []
    for i in rng.sample(range(len(pairs)), len(pairs)):
        others = rng.sample([j for j in range(len(pairs)) if pairs[j][1] != pairs[i][1]], n_false)
        answers = [encode(" " + pairs[i][1])] + [encode(" " + pairs[j][1]) for j in others]
        if len({a[0] for a in answers}) == len(answers):
            prompts.append(prefix + encode(TEMPLATE.format(country=pairs[i][0])))
            candidates.append(answers)
        if len(prompts) == n_prompts:
            break
    if len(prompts) < 2:
        raise HeadlabError(f"only {len(prompts)} capital prompts have answers with distinct first tokens; R1 needs 2")
    first = torch.tensor([[a[0] for a in c] for c in candidates])
    return candidate_batch(prompts, candidates, pad_id=tokenizer.pad_token_id or 0), first


def text_inputs(tokenizer, n_texts: int, seed: int) -> dict[str, torch.Tensor]:
    """Generic text for the KL of an edit: templated movie reviews and IOI sentences, right padded."""
    texts = [e["text"] for e in sentiment(seed)[: n_texts // 2]] + [e["text"] for e in ioi(seed)[: n_texts // 2]]
    encoded = [list(tokenizer(t)["input_ids"]) for t in texts]
    width = max(map(len, encoded))
    ids = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
    return {"input_ids": ids, "attention_mask": mask}


def answer_logit_directions(model: nn.Module, heads: list[Head], first: torch.Tensor, n_candidates: int
                            ) -> dict[Head, torch.Tensor]:
    """``{head: [N * C, d_head]}``: per prompt, ``W_O[h] diag(g) (W_U[true] - mean_i W_U[false_i])`` on the first
    answer tokens ``first [N, C]`` (``g`` the final norm's gain, folded into ``W_U``), repeated for each of the
    prompt's ``C`` sequences: the head-output direction that raises the true answer's first logit over the false
    ones' most through the direct path (the positive control's direction)."""
    w_u = real_tensor(model.get_output_embeddings(), "weight").detach().float()  # [vocab, d_model]
    gain = final_norm_gain(model)
    target = w_u[first[:, 0]] - w_u[first[:, 1:]].mean(1)  # [N, d_model]
    target = target if gain is None else target * gain
    sites = head_sites(model)
    out = {}
    for layer, head in heads:
        w_o, _ = output_weights(sites[layer])  # [heads, d_head, d_model]
        out[(layer, head)] = (target @ w_o[head].detach().float().cpu().T).repeat_interleave(n_candidates, 0)
    return out


def last_heads(model: nn.Module, k: int) -> list[Head]:
    """The ``k`` heads of the last layers (the final layer's first, in head order): where the direct path to the
    logits is most of a head's effect."""
    sites = head_sites(model)
    everyone = [(site.layer, head) for site in reversed(sites) for head in range(site.n_heads)]
    return everyone[:k]


def mass_mean_units(table: Mapping[str, np.ndarray], layers: list[int]) -> dict[Head, torch.Tensor]:
    """``{(model layer, head): unit mass-mean direction [d_head]}`` for every head of a directions.safetensors table
    (``mass_mean_direction [layers, heads, 1, d_head]``, rows in the order of ``layers``)."""
    directions = table["mass_mean_direction"]
    return {(int(layer), head): torch.from_numpy(np.ascontiguousarray(directions[i, head, 0], np.float32))
            for i, layer in enumerate(layers) for head in range(directions.shape[1])}


def _dose(model, batch, generic, scaled, heads, alpha, draws, cfg, seed) -> tuple[dict | None, list[dict]]:
    """The steering check of ``heads`` at ``alpha`` with ``draws`` random direction sets (0: the shifts only, no
    result): its result dict and two dose rows (``+alpha``, ``-alpha``: margin shift, MC2 share, KL on generic
    text)."""
    directions = {h: scaled[h] for h in heads}
    result = None
    if draws:
        significance = max(cfg.significance, 1 / (draws + 1))  # a descriptive dose may have too few draws to pass
        result = steering_check(model, batch.inputs, r1_readout(batch), directions, alpha, n_random=draws,
                                seed=seed, significance=significance, positions=batch.edit)
    base = scores(model, batch)
    rows = []
    for sign in (1, -1):
        steered = scores(model, batch, steer(directions, sign * alpha, batch.edit))
        shift = (result.shift if sign > 0 else result.shift_negative) if result else steered["margin"] - base["margin"]
        rows.append({"k": len(heads), "alpha": sign * alpha, "margin_shift": shift,
                     "p_value": result.p_value if result and sign > 0 else None, "n_random": draws,
                     "mc2": steered["mc2"], "kl": edit_kl(model, generic, steer(directions, sign * alpha))})
    return (result.as_dict() if result else None), rows


def _random_heads(model, batch, scaled, heads, base, shift, n_heads, cfg, seed) -> dict:
    """Depth-matched random head sets along their own scaled mass-mean directions, at the main alpha: their margin
    shifts and the one-sided share ``(1 + #{shift_r >= shift}) / (1 + n)``."""
    steered = torch.zeros(max(h[0] for h in heads) + 1, n_heads, dtype=torch.bool)
    for head in heads:
        steered[head] = True
    if bool((steered.sum(-1) > (~steered).sum(-1)).any()):
        return {"random_heads_p": None, "random_heads_note": "a steered layer has too few other heads"}
    shifts = []
    for group in depth_matched_groups(steered, cfg.n_random_heads, seed + 17):
        matched = [(int(a), int(b)) for a, b in group.nonzero().tolist()]
        fn = steer({h: scaled[h] for h in matched}, cfg.main_alpha, batch.edit)
        shifts.append(scores(model, batch, fn)["margin"] - base)
    p = (1 + sum(s >= shift for s in shifts)) / (1 + len(shifts))
    return {"random_heads_shifts": shifts, "random_heads_p": p}


def positive_control(model: nn.Module, batch: CandidateBatch, first: torch.Tensor, k: int, cfg: TruthSteeringConfig,
                     seed: int) -> dict:
    """The positive control: the ``k`` heads of the last layers along their direct-path directions
    (:func:`answer_logit_directions`), scaled by their sigma at the edited positions, through the main check's
    statistic at ``main_alpha``; it moves R1 by construction, so it must pass."""
    heads = last_heads(model, k)
    raw = answer_logit_directions(model, heads, first, batch.n_candidates)
    units = {h: (d / d.norm(dim=-1, keepdim=True)).to(batch.edit.device) for h, d in raw.items()}
    sigma = edit_sigma(model, batch.inputs, batch.edit, units)
    directions = {h: units[h] * sigma[h] for h in heads}
    result = steering_check(model, batch.inputs, r1_readout(batch), directions, cfg.main_alpha,
                            n_random=cfg.n_random, seed=seed + 1, significance=cfg.significance,
                            positions=batch.edit)
    return {"positive_control_passed": result.passed, "positive_control_p": result.p_value,
            "positive_control_shift": result.shift, "positive_control_shift_negative": result.shift_negative,
            "positive_control_heads": [list(h) for h in heads]}


def random_like(scaled: Mapping[Head, torch.Tensor], heads: list[Head], seed: int) -> dict[Head, torch.Tensor]:
    """Seeded random directions for ``heads`` with the norms of ``scaled[h]``."""
    generator = torch.Generator().manual_seed(seed)
    noise = {h: torch.randn(scaled[h].shape, generator=generator) for h in heads}
    return {h: n / n.norm() * scaled[h].norm() for h, n in noise.items()}


def random_direction_control(model: nn.Module, inputs, readout, scaled: Mapping[Head, torch.Tensor],
                             heads: list[Head], positions: torch.Tensor, cfg: TruthSteeringConfig, noise_seed: int,
                             check_seed: int) -> dict:
    """A negative control of either readout: random directions of the probe directions' norms in their place
    (:func:`random_like`), at the same ``positions``, through the main check's statistic; it must not pass (it does
    with probability at most about ``significance / 2``)."""
    result = steering_check(model, inputs, readout, random_like(scaled, heads, noise_seed), cfg.main_alpha,
                            n_random=cfg.n_random, seed=check_seed, significance=cfg.significance,
                            positions=positions)
    return {"negative_control_passed": result.passed, "negative_control_p": result.p_value,
            "negative_control_shift": result.shift}


def negative_control(model: nn.Module, batch: CandidateBatch, scaled: Mapping[Head, torch.Tensor],
                     heads: list[Head], cfg: TruthSteeringConfig, seed: int) -> dict:
    """R1's negative control (:func:`random_direction_control` at the edited answer positions)."""
    return random_direction_control(model, batch.inputs, r1_readout(batch), scaled, heads, batch.edit, cfg,
                                    seed + 99, seed + 2)


def not_run(reason: str, cfg: TruthSteeringConfig) -> dict:
    """The steering dict of a check that could not run (``note`` says why): detected heads stay unshown to be used."""
    return {"verdict": UNUSED, "readout": "R1", "decided_by": "steering:R1", "note": reason, "passed": False,
            "p_value": None, "min_attainable_p": None, "significance": cfg.significance,
            "probe_trained_at": PROBE_POSITION, "edit_applied_at": R1_EDIT,
            "positive_control_passed": None, "negative_control_passed": None}


def truth_verdict(detected: bool, main: Mapping | None) -> str:
    """``functional`` (the main check passed and ``-alpha`` reversed the sign), ``carries information but was not
    shown to be used`` (detected, check not passed) or ``not detected``."""
    if not detected:
        return NOT_DETECTED
    if main is not None and main["passed"] and main["shift_negative"] < 0:
        return FUNCTIONAL
    return UNUSED


@torch.no_grad()
def truth_steering(model: nn.Module, tokenizer, ranked: list[Head], units: Mapping[Head, torch.Tensor],
                   n_heads: int, seed: int, cfg: TruthSteeringConfig | None = None,
                   pairs: list[tuple[str, str]] | None = None) -> dict:
    """The R1 steering check of the detected heads ``ranked`` (best first) with unit directions ``units`` (every
    head's, for the depth-matched comparison), with its dose-response, controls and verdict (module docstring)."""
    cfg = cfg or TruthSteeringConfig()
    if not ranked:
        return {"verdict": NOT_DETECTED, "readout": "R1"}
    device = input_device(model)
    try:
        batch, first = capital_candidates(tokenizer, cfg.n_prompts, cfg.n_false, seed + 5, pairs)
    except HeadlabError as error:  # a tokenizer that cannot tell the capitals apart: the check cannot run
        return not_run(str(error), cfg)
    batch = batch.to(device)
    generic = {name: t.to(device) for name, t in text_inputs(tokenizer, cfg.n_texts, seed).items()}
    sigma = edit_sigma(model, batch.inputs, batch.edit, units)
    scaled = {h: units[h].float() * sigma[h] for h in units}
    ks = sorted({min(k, len(ranked)) for k in (*cfg.ks, cfg.main_k)})
    main_k = min(cfg.main_k, len(ranked))
    dose, main = [], None
    for k in ks:
        for alpha in sorted({*cfg.alphas, cfg.main_alpha}):
            is_main = k == main_k and alpha == cfg.main_alpha
            draws = cfg.n_random if is_main else cfg.n_random_dose
            result, rows = _dose(model, batch, generic, scaled, ranked[:k], alpha, draws, cfg, seed)
            dose += rows
            main = result if is_main else main
    heads = ranked[:main_k]
    edit = steer({h: scaled[h] for h in heads}, cfg.main_alpha, batch.edit)
    base, steered = scores(model, batch), scores(model, batch, edit)
    random_kl = edit_kl(model, generic, steer(random_like(scaled, heads, seed + 3), cfg.main_alpha))
    return {**main, "readout": "R1", "verdict": truth_verdict(True, main), "decided_by": "steering:R1",
            "readout_formula": "sum_j log p(true answer token j) - mean_i sum_j log p(false answer i token j), edited "
                               "at the last prompt token and the answer tokens",
            "probe_trained_at": PROBE_POSITION, "edit_applied_at": R1_EDIT,
            "sigma": {f"{h[0]}.{h[1]}": sigma[h] for h in heads}, "baseline_mc2": base["mc2"],
            "steered_mc2": steered["mc2"], "baseline_margin": base["margin"], "kl": steered_kl(dose, main_k, cfg),
            "random_direction_kl": random_kl, "dose_response": dose, "prompts": batch.n_prompts,
            "n_false": batch.n_candidates - 1, "config": asdict(cfg),
            **_random_heads(model, batch, scaled, heads, base["margin"], main["shift"], n_heads, cfg, seed),
            **positive_control(model, batch, first, main_k, cfg, seed),
            **negative_control(model, batch, scaled, heads, cfg, seed)}


def steered_kl(dose: list[dict], k: int, cfg: TruthSteeringConfig) -> float:
    """The KL of the main dose (``k`` heads at ``+main_alpha``) from the dose rows."""
    return next(row["kl"] for row in dose if row["k"] == k and row["alpha"] == cfg.main_alpha)
