"""Mapping one model's heads on one task: detector scores, null thresholds, the three ablations and the role table.

:func:`map_heads` is the one path toy runs and ``detect`` share; :class:`TargetSummary` is what a run reports about
the task's target role (its best head, the evidence, and whether the function *formed*).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from data.tasks import Task
from headlab.errors import at_least
from headlab.runs import atomic_write_text
from roles.ablation import AblationKind, AblationResult, ablation_effects, group_effect
from roles.null import NullStats, null_distribution
from roles.plots import plot_role_map
from roles.registry import score_heads
from roles.table import RoleTable


@dataclass(frozen=True)
class DetectConfig:
    """How heads are scored, thresholded and causally checked."""

    batch_size: int = 32
    """sequences in the fixed detection batch"""
    n_null: int = 5
    """random initialisations of the architecture forming each detector's null distribution"""
    n_sigma: float = 3.0
    """a head is detected when its score exceeds null_mean + n_sigma * null_std"""
    ablation: AblationKind = "mean"
    """ablation reported in roles.csv: zero, mean or resample (all three go to ablations.csv)"""
    effect_sigma: float = 3.0
    """a detected head is functional when its ablation effect exceeds the mean effect of the role's other heads by
    effect_sigma standard errors"""
    min_effect: float = 0.01
    """and by at least this many nats (a floor for tasks solved to ~0 loss)"""
    pattern_preserving: bool = False
    """freeze every attention pattern to its clean value while ablating (toy models only)"""
    eval_batch_size: int = 128
    """sequences used to measure ablation effects"""

    def __post_init__(self) -> None:
        at_least("detection.batch_size", self.batch_size, 1)
        at_least("detection.n_null", self.n_null, 2)
        at_least("detection.n_sigma", self.n_sigma, 0)
        at_least("detection.effect_sigma", self.effect_sigma, 0)
        at_least("detection.min_effect", self.min_effect, 0)
        at_least("detection.eval_batch_size", self.eval_batch_size, 2)


@dataclass
class HeadMap:
    """Result of mapping one model's heads on one task."""

    table: RoleTable
    scores: dict[str, torch.Tensor]
    null: dict[str, NullStats]
    ablations: dict[str, AblationResult]
    group_effect: float  # ablating every head detected for the task's role at once


def map_heads(
    model: nn.Module,
    task: Task,
    cfg: DetectConfig,
    seed: int,
    scores: dict[str, torch.Tensor] | None = None,
    null: dict[str, NullStats] | None = None,
    emerged: dict[tuple[str, int, int], int] | None = None,
    ablate: bool = True,
) -> HeadMap:
    """Detector scores, null statistics and all three ablations of every head of ``model`` on ``task`` (without
    ``ablate``, detection only: an encoder has no next-token loss)."""
    detect_batch = task.detection_batch(cfg.batch_size, seed + 1)
    eval_batch = task.batch(cfg.eval_batch_size, seed + 2, task.eval_split)
    other_batch = task.batch(cfg.eval_batch_size, seed + 3, task.eval_split)
    model.eval()
    scores = scores if scores is not None else score_heads(model, detect_batch)
    null = null if null is not None else null_distribution(model, detect_batch, n_models=cfg.n_null, seed=seed + 10_000)
    ablations = {
        kind: ablation_effects(model, eval_batch, kind, other_batch, pattern_preserving=cfg.pattern_preserving)
        for kind in (("zero", "mean", "resample") if ablate else ())
    }
    table = RoleTable.build(scores, null, ablations.get(cfg.ablation), cfg.n_sigma, cfg.effect_sigma, emerged,
                            cfg.min_effect)
    detected = table.rows(task.role)
    heads = [(int(r.layer), int(r.head)) for r in detected[detected["detected"]].itertuples()]
    joint = group_effect(model, eval_batch, heads, cfg.ablation, other_batch) if ablate else float("nan")
    return HeadMap(table, scores, null, ablations, joint)


@dataclass
class TargetSummary:
    """The task's target role in one run: its best (highest-scoring) head and the evidence for it."""

    role: str
    scored: bool
    formed: bool = False  # see :meth:`roles.table.RoleTable.formed`
    layer: int | None = None
    head: int | None = None
    score: float | None = None
    null_mean: float | None = None
    null_std: float | None = None
    threshold: float | None = None
    ablation_effect: float | None = None
    effect_stderr: float | None = None
    n_detected: int = 0
    group_ablation_effect: float | None = None
    effect_reference: float | None = None
    emerged_step: int | None = None
    detected: bool = False
    functional: bool = False
    emerged_seconds: float | None = None

    @classmethod
    def of(cls, head_map: HeadMap, role: str) -> TargetSummary:
        table = head_map.table
        row = table.best_head(role)
        if row is None:
            return cls(role, scored=False)
        rows = table.rows(role)
        return cls(
            role=role,
            scored=True,
            formed=table.formed(role),
            layer=int(row["layer"]),
            head=int(row["head"]),
            score=float(row["score"]),
            null_mean=float(row["null_mean"]),
            null_std=float(row["null_std"]),
            threshold=float(row["threshold"]),
            ablation_effect=float(row["ablation_effect"]),
            effect_stderr=float(row["effect_stderr"]),
            n_detected=int(rows["detected"].sum()),
            group_ablation_effect=head_map.group_effect,
            effect_reference=float(row["effect_reference"]),
            emerged_step=None if pd.isna(row["emerged_step"]) else int(row["emerged_step"]),
            detected=bool(row["detected"]),
            functional=bool(row["functional"]) if not pd.isna(row["functional"]) else False,
        )

    def as_dict(self) -> dict[str, Any]:
        """The ``target`` entry of ``metrics.json`` (only ``role``, ``scored`` and ``formed`` when not scored)."""
        if not self.scored:
            return {"role": self.role, "scored": False, "formed": False}
        out = asdict(self)
        if out["emerged_seconds"] is None:
            del out["emerged_seconds"]
        return out

    def line(self) -> str:
        """One printed line with the verdict and its evidence."""
        if not self.scored:
            return f"target role {self.role}: not scored (the task's batch lacks its inputs)"
        return (
            f"target role {self.role}: best head L{self.layer}H{self.head} score {self.score:.3f} (null "
            f"{self.null_mean:.3f} +- {self.null_std:.3f}, threshold {self.threshold:.3f}), ablation effect "
            f"{self.ablation_effect:+.3f} +- {self.effect_stderr:.3f} nats "
            f"(random heads {self.effect_reference:+.3f}), "
            f"all {self.n_detected} detected heads ablated together {self.group_ablation_effect:+.3f}, "
            f"emerged at step {self.emerged_step}, formed={self.formed}"
        )


def ablation_frame(ablations: dict[str, AblationResult]) -> pd.DataFrame:
    """``ablations.csv``: one row per (layer, head, ablation kind) with its effect and standard error."""
    rows = [
        {
            "layer": layer,
            "head": head,
            "ablation": kind,
            "effect": float(result.effect[layer, head]),
            "stderr": float(result.stderr[layer, head]),
        }
        for kind, result in ablations.items()
        for layer in range(result.effect.shape[0])
        for head in range(result.effect.shape[1])
    ]
    return pd.DataFrame(rows)


def write_map(out: Path, head_map: HeadMap, title: str) -> None:
    """``roles.csv``, ``ablations.csv`` and ``role_map.png`` of a mapped model."""
    head_map.table.write(out / "roles.csv")
    atomic_write_text(out / "ablations.csv", ablation_frame(head_map.ablations).to_csv(index=False))
    plot_role_map(head_map.table, out / "role_map.png", title)
