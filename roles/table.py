"""The role table: every (layer, head, role) with the evidence for and against the role, and the verdicts.

Columns (``roles.csv``):

* ``layer, head, role``;
* ``score`` (the detector's effect size), ``floor`` (the role's effect-size floor), ``control`` (the same statistic
  on matched control keys or tokens), ``p_value`` and ``p_adjusted`` (the one-sided paired test of score over
  control, Benjamini-Hochberg corrected over every test of the run): see :mod:`roles.rule`;
* ``detected``: ``score >= floor`` and ``p_adjusted < alpha``;
* ``ablation_effect`` ± ``effect_stderr`` (change of the task loss when the head is ablated, over sequences),
  ``effect_method`` (``exact``, or ``attribution`` for a first-order estimate, :mod:`roles.attribution`),
  ``effect_reference`` (mean exact effect of heads with no detected function);
* ``functional``: detected, measured exactly, and its effect above the reference beyond noise
  (:func:`roles.ablation.is_functional`); empty where no causal check was run (encoders);
* ``null_mean``, ``null_std``: the detector on randomly initialised copies of the architecture (reported: how far
  training moved the head from an untrained one; not part of the verdict);
* ``emerged_step``: the first tracked training step from which the head stays detected (toy runs).

:class:`RoleTable` owns the file: it writes it and reads it back with its column types, and refuses, with a clear
error, tables written by older headlab versions, whose verdicts used the random-initialisation null as threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from headlab.errors import HeadlabError
from headlab.runs import atomic_write_text
from roles.ablation import AblationResult, is_functional, random_head_reference, random_head_spread
from roles.null import NullStats
from roles.rule import Verdict

COLUMNS = ["layer", "head", "role", "score", "floor", "control", "p_value", "p_adjusted", "detected",
           "ablation_effect", "effect_stderr", "effect_method", "effect_reference", "functional", "null_mean",
           "null_std", "emerged_step"]
DTYPES = {
    "layer": "int64", "head": "int64", "role": "object", "score": "float64", "floor": "float64",
    "control": "float64", "p_value": "float64", "p_adjusted": "float64", "detected": "bool",
    "ablation_effect": "float64", "effect_stderr": "float64", "effect_method": "object",
    "effect_reference": "float64",
    "functional": "boolean",  # missing (NA) where no causal check was run (encoders, --ablate false)
    "null_mean": "float64", "null_std": "float64", "emerged_step": "Int64",
}
REQUIRED = ("layer", "head", "role", "score", "floor", "control", "p_adjusted", "detected")


NEEDS_A_LAYER_BELOW = ("induction", "iteration")
"""Roles whose circuit needs a head in an earlier layer, so that a layer-0 score comes from position, not from the
mechanism. Induction: the previous-token head below it (Olsson et al. 2022). Iteration: the first-layer head that
finds the end of the input, which tells the iteration head how far back ``x_t`` lies (Cabannes et al. 2024); in
layer 0 the "diagonal" can only be read off positions (the SEP query always finds ``x_1`` at position 0, and short
inputs leave few candidates), which is how a 2-layer model's layer-0 head scored 0.41 beside a layer-1 head at 0.29.
"""


@dataclass
class RoleTable:
    """One row per (layer, head, role); ``frame`` holds the columns above with their types."""

    frame: pd.DataFrame

    @classmethod
    def build(
        cls,
        verdicts: Mapping[str, Verdict],
        ablation: AblationResult | None = None,
        null: Mapping[str, NullStats] | None = None,
        emerged: Mapping[tuple[str, int, int], int] | None = None,
        effect_sigma: float = 3.0,
        min_effect: float = 0.01,
        partners: torch.Tensor | None = None,
    ) -> RoleTable:
        """The table of every role in ``verdicts``; without ``ablation``, detection only. ``partners`` ``[layer,
        head]`` marks heads with a function no detector scores (a target circuit's other half, e.g. the iteration
        head's layer-0 EoI head, :mod:`toymodels.circuits`): like detected heads, they are left out of the random
        reference a functional head must beat."""
        emerged, null = emerged or {}, null or {}
        functional: dict[str, torch.Tensor] = {}
        reference = float("nan")
        if ablation is not None:
            detected_any = torch.zeros_like(ablation.effect, dtype=torch.bool)
            for verdict in verdicts.values():
                detected_any |= verdict.detected
            if partners is not None:
                detected_any |= partners
            exact = ablation.exact if ablation.exact is not None else torch.ones_like(detected_any)
            # the reference: heads drawn at random (not those the screen picked for large estimates), or every
            # exactly measured head when none was selected
            pool = exact if ablation.reference is None else exact & ablation.reference
            measured = torch.where(pool, ablation.effect, torch.nan)
            reference = random_head_reference(measured, detected_any)
            spread = random_head_spread(measured, detected_any)
            for role, verdict in verdicts.items():
                functional[role] = is_functional(ablation.effect, ablation.stderr, verdict.detected, reference,
                                                 effect_sigma, min_effect, spread) & exact
        rows = []
        for role, v in verdicts.items():
            stats = null.get(role)
            for layer in range(v.score.shape[0]):
                for head in range(v.score.shape[1]):
                    rows.append({
                        "layer": layer, "head": head, "role": role, "score": float(v.score[layer, head]),
                        "floor": v.floor, "control": float(v.control[layer, head]),
                        "p_value": float(v.p_value[layer, head]), "p_adjusted": float(v.p_adjusted[layer, head]),
                        "detected": bool(v.detected[layer, head]),
                        "ablation_effect": float(ablation.effect[layer, head]) if ablation else float("nan"),
                        "effect_stderr": float(ablation.stderr[layer, head]) if ablation else float("nan"),
                        "effect_method": ablation.method(layer, head) if ablation else None,
                        "effect_reference": reference,
                        "functional": bool(functional[role][layer, head]) if ablation else pd.NA,
                        "null_mean": stats.mean if stats else float("nan"),
                        "null_std": stats.std if stats else float("nan"),
                        "emerged_step": emerged.get((role, layer, head)),
                    })
        return cls(_typed(pd.DataFrame(rows, columns=COLUMNS)))

    @classmethod
    def read(cls, path: str | Path) -> RoleTable:
        """``roles.csv`` with its column types; a one-line error for a missing, empty, foreign or old file."""
        path = Path(path)
        if not path.exists():
            raise HeadlabError(f"{path} does not exist; pass a run directory written by `train.py toy` or `detect`")
        try:
            frame = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
            raise HeadlabError(f"{path} is not a role table ({type(error).__name__}); rerun the toy or detect run "
                               "that wrote it") from error
        if {"threshold", "null_mean"} <= set(frame.columns) and "p_adjusted" not in frame.columns:
            raise HeadlabError(f"{path} was written by an older headlab whose verdicts used a random-initialisation "
                               "null as threshold (no floor, control or p columns); rerun that toy or detect run")
        missing = [c for c in REQUIRED if c not in frame.columns]
        if missing or frame.empty:
            what = f"lacks column(s) {', '.join(missing)}" if missing else "has no rows"
            raise HeadlabError(f"{path} {what}; it is not a role table written by `train.py toy` or `detect`")
        try:
            return cls(_typed(frame))
        except (ValueError, TypeError) as error:
            raise HeadlabError(f"{path} holds values of the wrong type ({str(error).splitlines()[0][:120]}); "
                               "rerun the run that wrote it") from error

    def write(self, path: str | Path) -> Path:
        atomic_write_text(path, self.frame.to_csv(index=False))
        return Path(path)

    @property
    def shape(self) -> tuple[int, int]:
        """``(layers, heads)``."""
        return int(self.frame["layer"].max()) + 1, int(self.frame["head"].max()) + 1

    def rows(self, role: str) -> pd.DataFrame:
        return self.frame[self.frame["role"] == role]

    def functional_rows(self, role: str) -> pd.DataFrame:
        rows = self.rows(role)
        return rows[rows["functional"].fillna(False).astype(bool)]

    def best_head(self, role: str) -> pd.Series | None:
        """The highest-scoring head of ``role`` (a row of the table), or None when the role was not scored; for the
        roles of :data:`NEEDS_A_LAYER_BELOW`, the best in layer >= 1 where the model has such layers."""
        rows = self.rows(role)
        if role in NEEDS_A_LAYER_BELOW and (rows["layer"] >= 1).any():
            rows = rows[rows["layer"] >= 1]
        if rows.empty:
            return None
        return rows.loc[rows["score"].idxmax()]

    def formed(self, role: str) -> bool:
        """Did the task's target function form in a single head? Some head of ``role`` is detected and functional;
        for the roles of :data:`NEEDS_A_LAYER_BELOW` it must sit in layer >= 1. See also the group criterion of
        :class:`roles.mapping.TargetSummary`."""
        rows = self.functional_rows(role)
        if role in NEEDS_A_LAYER_BELOW:
            rows = rows[rows["layer"] >= 1]
        return not rows.empty

    def head_roles(self) -> dict[tuple[int, int], str]:
        """``(layer, head) -> role`` for functional heads; a head with several functional roles gets the one whose
        score is furthest above its floor."""
        functional = self.frame[self.frame["functional"].fillna(False).astype(bool)].copy()
        if functional.empty:
            return {}
        functional["margin"] = functional["score"] - functional["floor"]
        best = functional.sort_values("margin", ascending=False).drop_duplicates(["layer", "head"])
        return {(int(r.layer), int(r.head)): str(r.role) for r in best.itertuples()}


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Cast the known columns to their types (CSV gives booleans back as objects when a value is missing)."""
    frame = frame.copy()
    for column, dtype in DTYPES.items():
        if column not in frame:
            continue
        if dtype in ("bool", "boolean") and frame[column].dtype == object:
            frame[column] = frame[column].map(_parse_bool)
        if dtype == "boolean" and not frame[column].isna().any():
            dtype = "bool"  # plain booleans where every head was checked
        frame[column] = frame[column].astype(dtype)
    return frame


def _parse_bool(value) -> bool | None:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1"}:
        return True
    if text in {"false", "0"}:
        return False
    raise ValueError(f"not a boolean: {value!r}")
