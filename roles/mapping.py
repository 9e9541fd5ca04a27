"""Mapping one model's heads on one task: detector evidence, verdicts, the causal check and the role table.

:func:`map_heads` is the one path toy runs, ``detect`` and ``stages`` share; :class:`TargetSummary` is what a run
reports about the task's target role (its best head, the evidence, and whether the function *formed*: a single
detected head passes the causal check, or the detected heads together beat random groups of the same size).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from data.tasks import Batch
from headlab.errors import at_least, require
from headlab.runs import atomic_write_text
from headlab.statistics import draws_for, min_attainable_p
from roles.ablation import AblationKind, AblationResult, ablation_effects, group_effects
from roles.attribution import screen_and_confirm
from roles.evidence import Evidence
from roles.groups import random_groups
from roles.null import NullStats, null_distribution
from roles.plots import plot_role_map
from roles.registry import measure_heads
from roles.rule import PROPERTIES, apply_rule
from roles.table import NEEDS_A_LAYER_BELOW, RoleTable

log = logging.getLogger("headlab")


@dataclass(frozen=True)
class DetectConfig:
    """How heads are scored, judged and causally checked (see :mod:`roles.rule`)."""

    batch_size: int = 32
    """sequences in the fixed detection batch (the paired tests' samples)"""
    alpha: float = 0.05
    """false discovery rate of the Benjamini-Hochberg correction over every (layer, head, role) test"""
    floors: dict[str, float] = field(default_factory=dict)
    """effect-size floor overrides per role, e.g. '{"induction": 0.4}' (defaults: roles.rule.FLOORS)"""
    n_null: int = 3
    """random initialisations whose scores are reported beside each head (null_mean, null_std); 0 skips them"""
    ablation: AblationKind = "mean"
    """ablation reported in roles.csv: zero, mean or resample (toy runs measure all three for ablations.csv)"""
    effect_sigma: float = 3.0
    """a detected head is functional when its ablation effect exceeds the mean effect of random heads by
    effect_sigma standard errors, and lies outside their spread at the same tail probability (roles.ablation)"""
    min_effect: float = 0.01
    """and by at least this many nats (a floor for tasks solved to ~0 loss)"""
    pattern_preserving: bool = False
    """freeze every attention pattern to its clean value while ablating (toy models only)"""
    eval_batch_size: int | None = None
    """sequences used to measure ablation effects (their standard error shrinks as 1/sqrt of this); default 128 for
    toy models, 32 for Hugging Face models (a 135M model's forward over 32 x 64 tokens takes ~5 s on 2 CPU cores)"""
    exact_heads: int = 64
    """models with at most this many heads are ablated exactly head by head; larger ones are screened by
    attribution patching and confirmed exactly for the detected, the top_k and n_random random heads"""
    top_k: int = 16
    """heads with the largest attribution estimates, and as many with the largest absolute estimates, confirmed by
    exact ablation"""
    n_random: int = 8
    """random undetected heads ablated exactly: the reference a functional head must beat"""
    random_groups: int = 99
    """random groups of the detected group's size, ablated together for the group criterion: its p-value is at
    least 1/(1+n), so n must reach 1/alpha - 1 (19 at alpha 0.05; 99 leaves room below it); draws stop early once
    10 random groups hurt at least as much"""
    random_directions: int = 99
    """random direction sets of the truthfulness heads' steering check on causal LMs (`stages`), of its positive
    and of its negative control: its p-value is at least 1/(1+n), so n must reach 1/alpha - 1 as for
    random_groups; each set is one forward pass of the capital prompts (~1 s for SmolLM2 on 2 cores)"""
    group_batch_size: int | None = None
    """sequences of the evaluation batch used by the group criterion; default 16 for models with at most
    exact_heads heads, 4 for larger ones (99 random groups of a real model are 99 forward passes: on SmolLM2 a
    group of 16 induction sequences costs 2.3 s on 2 cores; every group is scored on the same sequences, so the
    permutation test stays exact on fewer)"""

    def eval_size(self, toy: bool) -> int:
        """The evaluation batch size: ``eval_batch_size``, or its default for toy or Hugging Face models."""
        return self.eval_batch_size or (128 if toy else 32)

    def __post_init__(self) -> None:
        at_least("detection.batch_size", self.batch_size, 2)
        require(0 < self.alpha < 1, f"--detection.alpha {self.alpha} is not between 0 and 1")
        require(self.n_null == 0 or self.n_null >= 2,
                f"--detection.n_null {self.n_null} is out of range: pass 0 to skip the random initialisations, or at "
                "least 2 (their standard deviation needs two)")
        at_least("detection.effect_sigma", self.effect_sigma, 0)
        at_least("detection.min_effect", self.min_effect, 0)
        at_least("detection.eval_batch_size", self.eval_batch_size, 2, optional=True)
        at_least("detection.exact_heads", self.exact_heads, 0)
        at_least("detection.top_k", self.top_k, 0)
        at_least("detection.n_random", self.n_random, 1)
        at_least("detection.random_groups", self.random_groups, 1)
        require(min_attainable_p(self.random_groups) <= self.alpha,
                f"--detection.random_groups {self.random_groups} gives group p-values no smaller than "
                f"{min_attainable_p(self.random_groups):.3g}, above --detection.alpha {self.alpha}, so the group "
                f"criterion could never pass: pass --detection.random_groups {draws_for(self.alpha)} or more")
        at_least("detection.group_batch_size", self.group_batch_size, 2, optional=True)
        at_least("detection.random_directions", self.random_directions, 1)
        require(min_attainable_p(self.random_directions) <= self.alpha,
                f"--detection.random_directions {self.random_directions} gives steering p-values no smaller than "
                f"{min_attainable_p(self.random_directions):.3g}, above --detection.alpha {self.alpha}, so the "
                f"steering check could never pass: pass --detection.random_directions {draws_for(self.alpha)} or "
                "more")


@dataclass
class Batches:
    """The fixed batches of a mapping: ``detect`` (detectors), ``eval`` (ablation), ``other`` (resampling)."""

    detect: Batch
    eval: Batch
    other: Batch


GROUP_CHUNK = 20
"""Random groups ablated per pass of the group check (one clean pass each) between looks at the stopping rule."""
SEQUENTIAL_HITS = 10
"""Random groups hurting at least as much as the detected group after which the group check stops drawing: the
sequential Monte Carlo p-value of Besag & Clifford (1991, Biometrika 78(2)) is then ``h / l`` (``l`` groups drawn),
valid as the full test is, and a group that is plainly not special costs ~2h ablations instead of all of them."""


@dataclass
class GroupCheck:
    """The detected heads of one role ablated together, against random groups of the same size drawn from all
    heads (``planned`` of them, fewer when the sequential rule stopped early)."""

    heads: list[tuple[int, int]]
    effect: float
    random_effects: list[float]
    planned: int | None = None

    @property
    def hits(self) -> int:
        return sum(e >= self.effect for e in self.random_effects)

    @property
    def p_value(self) -> float:
        """``(1 + hits) / (1 + n)`` with ``n`` random groups (hits: those hurting at least as much); Besag &
        Clifford's ``hits / n`` when the draws stopped early at :data:`SEQUENTIAL_HITS` hits."""
        n = len(self.random_effects)
        if self.planned is not None and n < self.planned and self.hits >= SEQUENTIAL_HITS:
            return self.hits / n
        return (1 + self.hits) / (1 + n)

    @property
    def min_attainable_p(self) -> float:
        """``1 / (1 + planned)``: the smallest p-value the planned draws allow."""
        return min_attainable_p(self.planned if self.planned is not None else len(self.random_effects))

    @property
    def reference(self) -> float:
        return float(torch.tensor(self.random_effects).mean()) if self.random_effects else float("nan")

    def functional(self, min_effect: float, alpha: float = 0.05) -> bool:
        return len(self.heads) >= 2 and self.p_value <= alpha and self.effect - self.reference >= min_effect


@dataclass
class HeadMap:
    """Result of mapping one model's heads on one task."""

    table: RoleTable
    evidence: dict[str, Evidence]
    null: dict[str, NullStats]
    ablations: dict[str, AblationResult]
    group: GroupCheck | None  # the target role's detected heads ablated together, against random groups


def map_heads(model: nn.Module, batches: Batches, role: str, cfg: DetectConfig, seed: int,
              evidence: dict[str, Evidence] | None = None, null: dict[str, NullStats] | None = None,
              emerged: dict[tuple[str, int, int], int] | None = None, ablate: bool = True,
              names: list[str] | None = None, all_kinds: bool = False,
              partners: torch.Tensor | None = None) -> HeadMap:
    """Evidence, verdicts and the causal check of every head of ``model``; ``role`` is the task's target.

    Without ``ablate``, detection only (an encoder has no next-token loss). ``all_kinds`` also measures the other
    two ablation kinds exactly (toy runs write them to ``ablations.csv``). ``partners`` ``[layer, head]``: heads of
    the target's circuit found outside the detectors, left out of the functional check's random reference
    (:meth:`roles.table.RoleTable.build`).
    """
    model.eval()
    clock = time.perf_counter()
    evidence = evidence if evidence is not None else measure_heads(model, batches.detect, names)
    if null is None and cfg.n_null:
        null = null_distribution(model, batches.detect, list(evidence), n_models=cfg.n_null, seed=seed + 10_000)
    d_head = _d_head(model)
    verdicts = apply_rule(evidence, d_head, cfg.alpha, cfg.floors)
    counts = {r: int(v.detected.sum()) for r, v in verdicts.items()}
    log.info("detected %s (%.1f s)", counts, time.perf_counter() - clock)
    ablations: dict[str, AblationResult] = {}
    group = None
    if ablate:
        clock = time.perf_counter()
        detected = {(int(a), int(b)) for role, v in verdicts.items() if role not in PROPERTIES
                    for a, b in v.detected.nonzero().tolist()}
        ablations[cfg.ablation] = _effects(model, batches, cfg, sorted(detected), seed)
        exact = ablations[cfg.ablation].exact
        log.info("%s ablation: %d heads exactly (%.1f s)", cfg.ablation,
                 int(exact.sum()) if exact is not None else -1, time.perf_counter() - clock)
        if all_kinds:
            for kind in ("zero", "mean", "resample"):
                if kind not in ablations:
                    ablations[kind] = ablation_effects(model, batches.eval, kind, batches.other,
                                                       pattern_preserving=cfg.pattern_preserving)
        if role in verdicts:
            clock = time.perf_counter()
            group = group_check(model, batches, group_members(role, verdicts[role].detected), cfg, seed)
            log.info("group check of %s (%.1f s)", role, time.perf_counter() - clock)
    table = RoleTable.build(verdicts, ablations.get(cfg.ablation), null, emerged, cfg.effect_sigma, cfg.min_effect,
                            partners)
    return HeadMap(table, evidence, null or {}, ablations, group)


def _d_head(model: nn.Module) -> int:
    from headlab.heads import head_sites

    return head_sites(model)[0].d_head


def _effects(model: nn.Module, batches: Batches, cfg: DetectConfig, detected: list[tuple[int, int]],
             seed: int) -> AblationResult:
    """Exact ablation of every head for small models; screen-and-confirm for larger ones."""
    from headlab.heads import head_sites

    sites = head_sites(model)
    if len(sites) * sites[0].n_heads <= cfg.exact_heads:
        return ablation_effects(model, batches.eval, cfg.ablation, batches.other,
                                pattern_preserving=cfg.pattern_preserving)
    return screen_and_confirm(model, batches.eval, cfg.ablation, detected, batches.other, cfg.top_k, cfg.n_random,
                              seed)


def group_members(role: str, detected: torch.Tensor) -> torch.Tensor:
    """The detected heads ``[layer, head]`` that the group criterion ablates together: for the roles of
    :data:`roles.table.NEEDS_A_LAYER_BELOW`, those above layer 0, as for a single head's verdict (a group of
    layer-0 "iteration" heads, which read the diagonal off positions, once passed the criterion in a 2-head model)."""
    if role in NEEDS_A_LAYER_BELOW and detected.shape[0] > 1:
        detected = detected.clone()
        detected[0] = False
    return detected


def group_check(model: nn.Module, batches: Batches, detected: torch.Tensor, cfg: DetectConfig,
                seed: int) -> GroupCheck | None:
    """Ablate the ``detected`` heads together and random groups of the same size (:func:`random_groups`) on the
    first ``cfg.group_batch_size`` sequences; draws stop at :data:`SEQUENTIAL_HITS` groups hurting at least as
    much. None when fewer than two heads are detected."""
    heads = [(int(a), int(b)) for a, b in detected.nonzero().tolist()]
    if len(heads) < 2:
        return None
    size = cfg.group_batch_size or (16 if detected.numel() <= cfg.exact_heads else 4)
    evaluate = {k: v[:size] if torch.is_tensor(v) and v.ndim >= 2 else v for k, v in batches.eval.items()}
    other = {k: v[:size] if torch.is_tensor(v) and v.ndim >= 2 else v for k, v in batches.other.items()}
    randoms = random_groups(heads, tuple(detected.shape), cfg.random_groups, seed + 77)
    effect, *drawn = group_effects(model, evaluate, [heads, *randoms[:GROUP_CHUNK]], cfg.ablation, other)
    while len(drawn) < len(randoms) and sum(e >= effect for e in drawn) < SEQUENTIAL_HITS:
        drawn += group_effects(model, evaluate, randoms[len(drawn):len(drawn) + GROUP_CHUNK], cfg.ablation, other)
    return GroupCheck(heads, effect, drawn, planned=len(randoms))


@dataclass
class TargetSummary:
    """The task's target role in one run: its best (highest-scoring) head, the evidence, and the verdict."""

    role: str
    scored: bool
    formed: bool = False  # a functional head (layer >= 1 for induction, iteration), or the group beats random;
    # a toy iteration run also needs its two-head circuit (toymodels/circuits.py, applied in toymodels/run.py)
    layer: int | None = None
    head: int | None = None
    score: float | None = None
    floor: float | None = None
    control: float | None = None
    p_adjusted: float | None = None
    null_mean: float | None = None
    ablation_effect: float | None = None
    effect_stderr: float | None = None
    effect_method: str | None = None
    effect_reference: float | None = None
    n_detected: int = 0
    n_functional: int = 0
    group_size: int = 0  # heads ablated together (the detected ones, above layer 0 where the role needs it)
    group_ablation_effect: float | None = None
    group_reference: float | None = None
    group_p_value: float | None = None
    group_functional: bool = False
    emerged_step: int | None = None
    detected: bool = False
    functional: bool = False
    emerged_seconds: float | None = None

    @classmethod
    def of(cls, head_map: HeadMap, role: str, min_effect: float = 0.01) -> TargetSummary:
        table = head_map.table
        row = table.best_head(role)
        if row is None:
            return cls(role, scored=False)
        rows = table.rows(role)
        group = head_map.group
        group_ok = bool(group is not None and group.functional(min_effect))
        return cls(
            role=role, scored=True, formed=table.formed(role) or group_ok,
            layer=int(row["layer"]), head=int(row["head"]), score=float(row["score"]), floor=float(row["floor"]),
            control=float(row["control"]), p_adjusted=float(row["p_adjusted"]), null_mean=_float(row["null_mean"]),
            ablation_effect=_float(row["ablation_effect"]), effect_stderr=_float(row["effect_stderr"]),
            effect_method=None if pd.isna(row["effect_method"]) else str(row["effect_method"]),
            effect_reference=_float(row["effect_reference"]), n_detected=int(rows["detected"].sum()),
            n_functional=len(table.functional_rows(role)),
            group_size=len(group.heads) if group else 0,
            group_ablation_effect=group.effect if group else None, group_reference=group.reference if group else None,
            group_p_value=group.p_value if group else None, group_functional=group_ok,
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
        effect = "no causal check"
        if self.ablation_effect is not None:
            effect = (f"ablation effect {self.ablation_effect:+.3f} +- {self.effect_stderr:.3f} nats "
                      f"({self.effect_method}; random heads {self.effect_reference:+.3f})")
        group = ""
        if self.group_ablation_effect is not None:
            group = (f", {self.group_size} detected heads together {self.group_ablation_effect:+.3f} vs random "
                     f"groups {self.group_reference:+.3f} (p={self.group_p_value:.2f})")
        return (f"target role {self.role}: best head L{self.layer}H{self.head} score {self.score:.3f} (floor "
                f"{self.floor:.2f}, control {self.control:.3f}, p_adj {self.p_adjusted:.2g}), {effect}{group}; "
                f"detected {self.n_detected}, functional {self.n_functional}, emerged at step {self.emerged_step}, "
                f"formed={self.formed}")


def _float(value) -> float | None:
    return None if pd.isna(value) else float(value)


def ablation_frame(ablations: dict[str, AblationResult]) -> pd.DataFrame:
    """``ablations.csv``: one row per (layer, head, ablation kind) with its effect, standard error and method."""
    rows = [
        {"layer": layer, "head": head, "ablation": kind, "effect": float(result.effect[layer, head]),
         "stderr": float(result.stderr[layer, head]), "method": result.method(layer, head)}
        for kind, result in ablations.items()
        for layer in range(result.effect.shape[0])
        for head in range(result.effect.shape[1])
    ]
    return pd.DataFrame(rows)


def write_map(out: Path, head_map: HeadMap, title: str) -> None:
    """``roles.csv``, ``ablations.csv`` and ``role_map.png`` of a mapped model."""
    head_map.table.write(out / "roles.csv")
    if head_map.ablations:
        atomic_write_text(out / "ablations.csv", ablation_frame(head_map.ablations).to_csv(index=False))
    plot_role_map(head_map.table, out / "role_map.png", title)
