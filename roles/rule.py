"""When a head *has* a function: the detection rule, the same for toy and real models.

A head is **detected** for a role when

(a) its score clears the role's effect-size floor (:data:`FLOORS`), and
(b) it prefers the role's targets over matched controls (:mod:`roles.evidence`): the one-sided paired test's
    p-value, Benjamini-Hochberg corrected over every (layer, head, role) test of the run, is below ``alpha``.

It is **functional** when, in addition, (c) ablating it hurts the task more than ablating random heads does
(:func:`roles.ablation.is_functional`). A score alone, or a null from randomly initialised copies, only says "more
structured than an untrained head", which almost every trained head is (on SmolLM2 that rule called 241 of 270
heads attention sinks); the null is still reported beside the score when computed.

Floors. The attention floors are a share of attention mass. The literature's convention (TransformerLens and ARENA
flag scores above 0.4) is a convention, not a calibration; headlab's are set so that, at the defaults, random
models detect at most 1% of (head, role) pairs (``tests/test_calibration.py`` measures it on 20 random models per
architecture, with training-scale and sharp unit-logit initialisations) while the heads of trained models that the
literature names (toy induction heads, SmolLM2's strongest prefix-matching heads) clear them. The operand-attention
floor is 0.6 of a chance-corrected score (uniform attention scores 0, see :func:`roles.patterns.operand_attention`):
random heads that happen to split ``=``'s attention over ``a`` and ``b`` reach 0.3-0.5 on random models, so a head must
give each operand 0.3 more than it leaves on ``=``. The copying floor is
the 99.9th percentile of the score of random (Ginibre) matrices of the head's width (:func:`roles.ov.copying_floor`).
The successor and name-copy floors are rates: a majority of tokens must map as the function says (chance is one in
the family's size, at most 1/7, or 5 in the vocabulary). The amplification floor is a share of the model's logit
margin for the correct answer: a head must write at least 5% of it directly (:mod:`roles.knowledge`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from headlab.errors import HeadlabError
from headlab.statistics import benjamini_hochberg
from roles.evidence import Evidence
from roles.ov import copying_floor

FLOORS: dict[str, float] = {
    "previous_token": 0.3,
    "duplicate_token": 0.3,
    "induction": 0.3,
    "attention_sink": 0.3,
    "iteration": 0.3,
    "operand_attention": 0.6,
    "name_mover": 0.3,
    "memory": 0.3,
    "successor": 0.5,
    "name_copy": 0.5,
    "amplification": 0.05,
}
"""Effect-size floor of each role's score (``copying``: :func:`roles.ov.copying_floor` of the head width)."""

PROPERTIES: tuple[str, ...] = ("copying", "name_copy", "attention_sink")
"""Detectors reported beside the roles but not roles themselves: OV copying is shared by induction, name-mover and
successor heads; name copying is half of the name-mover verdict; the attention sink (attention parked on the first
token, which most heads of a real LLM do) is not one of the survey's head types. They get verdicts but no stage and
no causal confirmation of their own."""

ALSO_REQUIRES: dict[str, str] = {"name_mover": "name_copy", "memory": "amplification"}
"""Roles whose verdict also needs another detector's score above its floor: a name mover attends to the IO *and*
copies names; a memory head attends to the subject *and* writes the answer."""
PARTNER_TESTED: frozenset[str] = frozenset({"memory"})
"""Roles whose partner must pass its own paired test too, not only its floor: the memory head's answer-writing half.
A random head's direct-logit share is a share of a random model's near-zero logit margin, so it clears the 5% floor
easily; on the real-text capitals batch, where the subject sits at one position, random heads with a positional
preference for it passed the attention half, and 5 of 160 (head, role) pairs of random models were memory heads
(``python -m roles.calibrate``). The partner's test (its share for the right answer above its share for a wrong
one, prompt by prompt) removes them."""
EXCLUDES: dict[str, str] = {"amplification": "memory"}
"""Roles whose verdict excludes heads detected for another role: an amplification head that reads the subject is a
memory head (KR), not an EP head."""


@dataclass(frozen=True)
class Verdict:
    """One role on every head, ``[layer, head]`` each."""

    score: torch.Tensor
    control: torch.Tensor
    floor: float
    p_value: torch.Tensor
    p_adjusted: torch.Tensor
    detected: torch.Tensor


def floor_of(role: str, d_head: int, overrides: Mapping[str, float] | None = None) -> float:
    """The effect-size floor of ``role`` (``overrides`` first)."""
    if overrides and role in overrides:
        return float(overrides[role])
    if role == "copying":
        return copying_floor(d_head)
    if role not in FLOORS:
        raise HeadlabError(f"role '{role}' has no effect-size floor; give one with --detection.floors "
                           f"'{{\"{role}\": 0.3}}'")
    return FLOORS[role]


def apply_rule(evidence: Mapping[str, Evidence], d_head: int, alpha: float = 0.05,
               floors: Mapping[str, float] | None = None) -> dict[str, Verdict]:
    """Verdicts of every role in ``evidence``: floors (a), and BH-corrected paired tests (b) over all its tests."""
    roles = list(evidence)
    p = {role: evidence[role].p_values() for role in roles}
    flat = torch.cat([p[role].flatten() for role in roles]) if roles else torch.zeros(0)
    adjusted = torch.from_numpy(benjamini_hochberg(flat.double().numpy())).float()
    out: dict[str, Verdict] = {}
    start = 0
    for role in roles:
        e = evidence[role]
        size = e.score.numel()
        p_adj = adjusted[start:start + size].reshape(e.score.shape)
        start += size
        floor = floor_of(role, d_head, floors)
        detected = (e.score >= floor) & (p_adj < alpha)
        out[role] = Verdict(e.score, e.control, floor, p[role], p_adj, detected)
    for role, needed in ALSO_REQUIRES.items():
        if role in out:
            partner = evidence.get(needed)
            ok = partner.score >= floor_of(needed, d_head, floors) if partner is not None else False
            if role in PARTNER_TESTED and needed in out:
                ok = ok & out[needed].detected
            out[role] = _narrowed(out[role], ok)
    for role, other in EXCLUDES.items():
        if role in out and other in out:
            out[role] = _narrowed(out[role], ~out[other].detected)
    return out


def _narrowed(verdict: Verdict, keep: torch.Tensor | bool) -> Verdict:
    return Verdict(verdict.score, verdict.control, verdict.floor, verdict.p_value, verdict.p_adjusted,
                   verdict.detected & keep)
