"""The survey's four stages and its head types, as data: which stage each head type belongs to, in the survey's own
words, and which headlab role measures it.

Zheng et al. 2024 (*Attention Heads of Large Language Models: A Survey*) sort head functions into four stages of
reasoning and claim that they run from shallow to deep layers: Knowledge Recalling (**KR**), In-Context
Identification (**ICI**), Latent Reasoning (**LR**) and Expression Preparation (**EP**). :data:`SURVEY` lists its
head types (the reading note in ``shared/seeds``); a role is a headlab detector (:mod:`roles.patterns`,
:mod:`roles.ov`, :mod:`roles.knowledge`) or probe (truthfulness) of one type. Override a role's stage with
``--stage_map '{"name_mover": "LR"}'``.

**Properties** (:data:`roles.rule.PROPERTIES`) are reported beside the roles but placed in no stage: OV copying is
shared by induction, name-mover and successor heads alike (counting it as an EP role made every toy head "EP"), and the
attention sink (attention parked on the first token) is not a survey type; it once stood in for KR.
"""

from __future__ import annotations

from dataclasses import dataclass

from headlab.errors import HeadlabError
from roles.registry import DETECTORS

STAGE_ORDER: tuple[str, ...] = ("KR", "ICI", "LR", "EP")
STAGE_NAMES: dict[str, str] = {
    "KR": "Knowledge Recalling",
    "ICI": "In-Context Identification",
    "LR": "Latent Reasoning",
    "EP": "Expression Preparation",
}


@dataclass(frozen=True)
class HeadType:
    """One of the survey's head types: its stage, its description, and the headlab roles that measure it."""

    name: str
    stage: str
    wording: str
    roles: tuple[str, ...] = ()


SURVEY: tuple[HeadType, ...] = (
    HeadType("Memory head", "KR", "recalls parametric knowledge into the residual stream, given the context",
             ("memory",)),
    HeadType("Subject / relation head", "KR", "attends to the subject (or the relation) and extracts its attributes "
             "(Chughtai et al. 2024, 'Summing up the facts')"),
    HeadType("Constant / single-letter head", "KR", "spreads attention evenly over the options of a multiple-choice "
             "question, or focuses on a single candidate"),
    HeadType("Previous / positional head", "ICI", "captures positional relations between tokens",
             ("previous_token",)),
    HeadType("Duplicate head", "ICI", "identifies tokens that occurred before (key to long-context retrieval)",
             ("duplicate_token",)),
    HeadType("Subword merge head", "ICI", "merges subwords split by the tokenizer"),
    HeadType("Name mover / backup / letter mover head", "ICI", "copies important information to the [END] position "
             "for later reasoning", ("name_mover",)),
    HeadType("Context gatherer", "ICI", "moves answer-relevant tokens to [END]"),
    HeadType("Sentiment summarizer", "ICI", "summarises sentiment words"),
    HeadType("Summary reader", "LR", "reads the information summarised at [END] to identify the task"),
    HeadType("Function vector head", "LR", "abstracts the task's core features and logical relations"),
    HeadType("Induction head", "LR", "matches the pattern [A][B] ... [A] and predicts [B]", ("induction",)),
    HeadType("In-context head", "LR", "its QK circuit computes label similarity, its OV circuit extracts label "
             "features"),
    HeadType("Truthfulness / accuracy head", "LR", "keeps the answer true and correct", ("truthfulness",)),
    HeadType("Consistency head", "LR", "keeps answers to rephrasings of a question consistent"),
    HeadType("Correct letter / iteration / successor head", "LR", "task-specific reasoning: multiple choice, "
             "sequences, arithmetic", ("successor", "iteration", "operand_attention")),
    HeadType("Mixed head", "EP", "linearly combines information from the ICI and LR stages"),
    HeadType("Amplification / correct head", "EP", "amplifies the logits of the correct option",
             ("amplification",)),
    HeadType("Coherence head", "EP", "aligns the output language in multilingual tasks"),
    HeadType("Faithfulness head", "EP", "keeps the final output consistent with the chain of thought"),
)
"""The survey's head types in its four stages (Zheng et al. 2024; the reading note in ``shared/seeds``)."""

SELF_CONTRADICTIONS: dict[str, str] = {
    "Subject / relation head": "the survey's ICI table lists subject and relation heads under In-Context "
    "Identification, while its IOI walk-through (section 'How do attention heads work together?'; the reading note "
    "in shared/seeds, line 185: 'Subject Head (KR) -> Duplicate Head (ICI) -> ...') places them in Knowledge "
    "Recalling. headlab labels them KR: they retrieve the subject's attributes from the weights, which is the KR "
    "stage's own definition, not a relation among the context's tokens (shared/research/stage_checks_and_toys.md, "
    "section 3, 'Label inconsistency').",
}
"""Head types the survey places in two stages, the stage headlab uses and why (printed by ``stages``' notes)."""

STAGES: dict[str, str] = {role: t.stage for t in SURVEY for role in t.roles}
"""role -> survey stage, from :data:`SURVEY`."""
TYPE_OF: dict[str, str] = {role: t.name for t in SURVEY for role in t.roles}
"""role -> the survey's head type it measures."""


def stage_table(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """:data:`STAGES` with ``overrides`` applied; an unknown role or stage is a one-line error."""
    table = dict(STAGES)
    known = set(DETECTORS) | set(STAGES)
    for role, stage in (overrides or {}).items():
        if role not in known:
            raise HeadlabError(f"--stage_map: unknown role '{role}'; roles are: {', '.join(sorted(known))}")
        if str(stage).upper() not in STAGE_ORDER:
            raise HeadlabError(
                f"--stage_map: unknown stage '{stage}' for role '{role}'; valid stages: "
                + ", ".join(f"{s} ({STAGE_NAMES[s]})" for s in STAGE_ORDER)
            )
        table[role] = str(stage).upper()
    return table
