"""The role table: every (layer, head, role) with its score, null statistics, ablation effect and emergence step.

Columns: ``layer, head, role, score, null_mean, null_std, ablation_effect, emerged_step`` (the contract), then
``threshold`` (``null_mean + n_sigma * null_std``), ``detected`` (score above threshold), ``effect_stderr``,
``effect_reference`` (mean effect of ablating the heads with no detected function) and ``functional`` (detected
*and* ablation effect above the reference by more than ``effect_sigma`` standard errors, see
:func:`roles.ablation.is_functional`). A function label counts only with the causal check beside it.

:class:`RoleTable` owns the file ``roles.csv``: it writes it and reads it back with its column types (booleans stay
booleans, a missing emergence step stays missing), and re-thresholds a table at another ``n_sigma`` with the same
rule (:meth:`roles.null.NullStats.threshold`) that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from headlab.errors import HeadlabError
from headlab.runs import atomic_write_text
from roles.ablation import AblationResult, is_functional, random_head_reference
from roles.null import NullStats

COLUMNS = ["layer", "head", "role", "score", "null_mean", "null_std", "ablation_effect", "emerged_step"]
EXTRA_COLUMNS = ["threshold", "detected", "effect_stderr", "effect_reference", "functional"]
DTYPES = {
    "layer": "int64",
    "head": "int64",
    "role": "object",
    "score": "float64",
    "null_mean": "float64",
    "null_std": "float64",
    "ablation_effect": "float64",
    "emerged_step": "Int64",
    "threshold": "float64",
    "detected": "bool",
    "effect_stderr": "float64",
    "effect_reference": "float64",
    "functional": "boolean",  # missing (NA) where no causal check was run (encoders, --ablate false)
}
REQUIRED = ("layer", "head", "role", "score", "null_mean", "null_std", "detected")


@dataclass
class RoleTable:
    """One row per (layer, head, role); ``frame`` holds the columns above with their types."""

    frame: pd.DataFrame

    @classmethod
    def build(
        cls,
        scores: dict[str, torch.Tensor],
        null: dict[str, NullStats],
        ablation: AblationResult | None,
        n_sigma: float,
        effect_sigma: float = 3.0,
        emerged: dict[tuple[str, int, int], int] | None = None,
        min_effect: float = 0.01,
    ) -> RoleTable:
        """The table of every role that has a null distribution; without ``ablation``, detection only."""
        emerged = emerged or {}
        roles = [role for role in scores if role in null]
        detected_by_role = {role: scores[role] > null[role].threshold(n_sigma) for role in roles}
        functional_by_role: dict[str, torch.Tensor] = {}
        reference = None
        if ablation is not None:
            detected_any = torch.zeros_like(ablation.effect, dtype=torch.bool)
            for detected in detected_by_role.values():
                detected_any |= detected
            reference = random_head_reference(ablation.effect, detected_any)
            functional_by_role = {
                role: is_functional(ablation.effect, ablation.stderr, detected, reference, effect_sigma, min_effect)
                for role, detected in detected_by_role.items()
            }
        rows = []
        for role in roles:
            values, stats, detected = scores[role], null[role], detected_by_role[role]
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
                            "ablation_effect": float(ablation.effect[layer, head]) if ablation else float("nan"),
                            "emerged_step": emerged.get((role, layer, head)),
                            "threshold": stats.threshold(n_sigma),
                            "detected": bool(detected[layer, head]),
                            "effect_stderr": float(ablation.stderr[layer, head]) if ablation else float("nan"),
                            "effect_reference": reference if reference is not None else float("nan"),
                            "functional": bool(functional_by_role[role][layer, head]) if ablation else pd.NA,
                        }
                    )
        return cls(_typed(pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS])))

    @classmethod
    def read(cls, path: str | Path) -> RoleTable:
        """``roles.csv`` with its column types; a one-line error for a missing, empty or foreign file."""
        path = Path(path)
        if not path.exists():
            raise HeadlabError(f"{path} does not exist; pass a run directory written by `train.py toy` or `detect`")
        try:
            frame = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
            raise HeadlabError(f"{path} is not a role table ({type(error).__name__}); rerun the toy or detect run "
                               "that wrote it") from error
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

    def rethresholded(self, n_sigma: float) -> RoleTable:
        """The same scores thresholded at ``null_mean + n_sigma * null_std``; ``functional`` stays true only for
        heads still detected (the ablation check itself is not re-run)."""
        frame = self.frame.copy()
        frame["threshold"] = [
            NullStats(mean, std, 0).threshold(n_sigma) for mean, std in zip(frame["null_mean"], frame["null_std"])
        ]
        frame["detected"] = frame["score"] > frame["threshold"]
        if "functional" in frame:
            frame["functional"] = frame["functional"] & frame["detected"]
        return RoleTable(frame)

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
        """The highest-scoring head of ``role`` (a row of the table), or None when the role was not scored."""
        rows = self.rows(role)
        if rows.empty:
            return None
        return rows.loc[rows["score"].idxmax()]

    def formed(self, role: str) -> bool:
        """Did the task's target function form? Some head of ``role`` is detected and functional; for induction it
        must sit in layer >= 1 (an induction head needs a previous-token head below it; a layer-0 "induction" score
        comes from position, not from the circuit)."""
        rows = self.functional_rows(role)
        if role == "induction":
            rows = rows[rows["layer"] >= 1]
        return not rows.empty

    def head_roles(self) -> dict[tuple[int, int], str]:
        """``(layer, head) -> role`` for functional heads; a head with several functional roles gets the one whose
        score is furthest above its null, in null standard deviations."""
        functional = self.frame[self.frame["functional"].fillna(False).astype(bool)].copy()
        if functional.empty:
            return {}
        functional["z"] = (functional["score"] - functional["null_mean"]) / functional["null_std"].clip(lower=1e-9)
        best = functional.sort_values("z", ascending=False).drop_duplicates(["layer", "head"])
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
