"""The role table: every (layer, head, role) with its score, null statistics, ablation effect and emergence step.

Columns: ``layer, head, role, score, null_mean, null_std, ablation_effect, emerged_step`` (the contract), then
``threshold`` (``null_mean + n_sigma * null_std``), ``detected`` (score above threshold), ``effect_stderr``,
``effect_reference`` (mean effect of ablating the heads with no detected function) and ``functional`` (detected
*and* ablation effect above the reference by more than ``effect_sigma`` standard errors, see
:func:`toymodels.ablation.is_functional`). A function label counts only with the causal check beside it.
"""

from __future__ import annotations

import pandas as pd
import torch

from toymodels.ablation import AblationResult, is_functional, random_head_reference
from toymodels.detectors import NullStats

COLUMNS = ["layer", "head", "role", "score", "null_mean", "null_std", "ablation_effect", "emerged_step"]
EXTRA_COLUMNS = ["threshold", "detected", "effect_stderr", "effect_reference", "functional"]


def role_table(
    scores: dict[str, torch.Tensor],
    null: dict[str, NullStats],
    ablation: AblationResult,
    n_sigma: float,
    effect_sigma: float,
    emerged: dict[tuple[str, int, int], int] | None = None,
    min_effect: float = 0.01,
) -> pd.DataFrame:
    """Long-form table, one row per (layer, head, role) for every role that has a null distribution."""
    emerged = emerged or {}
    roles = [role for role in scores if role in null]
    detected_by_role = {role: scores[role] > null[role].threshold(n_sigma) for role in roles}
    detected_any = torch.zeros_like(ablation.effect, dtype=torch.bool)
    for detected in detected_by_role.values():
        detected_any |= detected
    reference = random_head_reference(ablation.effect, detected_any)
    rows = []
    for role in roles:
        values, stats, detected = scores[role], null[role], detected_by_role[role]
        threshold = stats.threshold(n_sigma)
        functional = is_functional(ablation.effect, ablation.stderr, detected, reference, effect_sigma, min_effect)
        for layer in range(values.shape[0]):
            for head in range(values.shape[1]):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "role": role,
                        "score": float(values[layer, head]),
                        "null_mean": stats.mean,
                        "null_std": stats.std,
                        "ablation_effect": float(ablation.effect[layer, head]),
                        "emerged_step": emerged.get((role, layer, head)),
                        "threshold": threshold,
                        "detected": bool(detected[layer, head]),
                        "effect_stderr": float(ablation.stderr[layer, head]),
                        "effect_reference": reference,
                        "functional": bool(functional[layer, head]),
                    }
                )
    table = pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS])
    return table.astype({"emerged_step": "Int64"})


def best_head(table: pd.DataFrame, role: str) -> pd.Series | None:
    """The highest-scoring head of ``role`` (a row of the table), or None when the role was not scored."""
    rows = table[table["role"] == role]
    if rows.empty:
        return None
    return rows.loc[rows["score"].idxmax()]


def head_roles(table: pd.DataFrame) -> dict[tuple[int, int], str]:
    """``(layer, head) -> role`` for functional heads; a head with several functional roles gets the one whose
    score is furthest above its null, in null standard deviations."""
    functional = table[table["functional"]].copy()
    if functional.empty:
        return {}
    functional["z"] = (functional["score"] - functional["null_mean"]) / functional["null_std"].clip(lower=1e-9)
    best = functional.sort_values("z", ascending=False).drop_duplicates(["layer", "head"])
    return {(int(r.layer), int(r.head)): str(r.role) for r in best.itertuples()}


def induction_formed(table: pd.DataFrame) -> bool:
    """The issue's criterion: a head in layer >= 1 whose prefix-matching score exceeds its null threshold and
    whose ablation raises the loss on the repeated part beyond that of random heads (the ``functional`` column)."""
    rows = table[(table["role"] == "induction") & (table["layer"] >= 1)]
    return bool(rows["functional"].any())
