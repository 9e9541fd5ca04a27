"""The survey's four stages and which head function (detector) belongs to which.

Zheng et al. 2024 (*Attention Heads of Large Language Models: A Survey*) sort head functions into four stages of
reasoning and claim that they run from shallow to deep layers: Knowledge Recalling (**KR**), In-Context
Identification (**ICI**), Latent Reasoning (**LR**) and Expression Preparation (**EP**).

Stage of each detector (:data:`STAGES`; override with ``--stage_map '{"name_mover": "ICI"}'``):

* ``previous_token``, ``duplicate_token``: ICI (they locate tokens in the context; the survey's table).
* ``induction``, ``successor``, ``iteration``, ``operand_attention``: LR (they compute a new relation from the
  located tokens: copy-what-followed, the next ordinal, the next step of a chain, the operands of a sum).
* ``copying``: EP (amplification/copying of the output into the logits).
* ``name_mover``: EP, as the issue asks (the head writes the chosen name into the output). The survey's own table
  lists Name Mover Heads under ICI; pass ``--stage_map '{"name_mover": "ICI"}'`` to follow it.
* ``attention_sink``: KR. The survey has no sink type; its closest is the KR "constant head" (attends to a fixed
  position regardless of content, reading what the model already holds rather than the context), so a head that
  parks its attention on the first token is counted there.
"""

from __future__ import annotations

from headlab.errors import HeadlabError
from roles.registry import DETECTORS

STAGE_ORDER: tuple[str, ...] = ("KR", "ICI", "LR", "EP")
STAGE_NAMES: dict[str, str] = {
    "KR": "Knowledge Recalling",
    "ICI": "In-Context Identification",
    "LR": "Latent Reasoning",
    "EP": "Expression Preparation",
}
STAGES: dict[str, str] = {
    "attention_sink": "KR",
    "previous_token": "ICI",
    "duplicate_token": "ICI",
    "induction": "LR",
    "successor": "LR",
    "iteration": "LR",
    "operand_attention": "LR",
    "copying": "EP",
    "name_mover": "EP",
}
"""role (detector name) -> survey stage; see the module docstring for the reasons."""


def stage_table(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """:data:`STAGES` with ``overrides`` applied; an unknown role or stage is a one-line error."""
    table = dict(STAGES)
    for role, stage in (overrides or {}).items():
        if role not in DETECTORS and role not in STAGES:
            raise HeadlabError(f"--stage_map: unknown role '{role}'; roles are the detectors: {', '.join(DETECTORS)}")
        if str(stage).upper() not in STAGE_ORDER:
            raise HeadlabError(
                f"--stage_map: unknown stage '{stage}' for role '{role}'; valid stages: "
                + ", ".join(f"{s} ({STAGE_NAMES[s]})" for s in STAGE_ORDER)
            )
        table[role] = str(stage).upper()
    return table
