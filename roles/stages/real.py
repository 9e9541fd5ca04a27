"""The survey's four stages on a real causal LM, each head type measured with the method the survey names and given
a causal check:

====  =========================  ===========  ====================================================================
stage head type                  method       evidence and causal check
====  =========================  ===========  ====================================================================
KR    memory heads               attribution  attention to the subject + direct logit attribution on capital
                                              prompts (:mod:`roles.knowledge`); ablated against random heads on the
                                              answer's loss
ICI   previous-token, duplicate, detector     attention detectors with controls (:mod:`roles.real`); ablated on the
      name-mover heads                        induction loss
LR    induction, successor       detector     as above (successor: OV succession over ordinal tokens)
LR    truthfulness heads         probe        a linear probe per head on true/false capital statements (cache +
                                              probe, the Inference-Time Intervention recipe); steering the top heads
                                              along their directions, read by answer scoring (R1,
                                              :mod:`roles.stages.truth_steering`), against random directions
EP    amplification heads        attribution  direct logit attribution without subject attention; ablated against
                                              random heads on the answer's loss
====  =========================  ===========  ====================================================================

Every scored (head, role) becomes a row with its method and evidence, detected or not, so negative findings show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab.models import LoadedModel
from headlab.statistics import draws_for
from roles.knowledge import capitals_batch
from roles.mapping import Batches, DetectConfig, GroupCheck, group_check, map_heads
from roles.real import map_real_model, task_batches
from roles.registry import measure_heads
from roles.stages.controls import group_controls
from roles.stages.truth_steering import FUNCTIONAL, TruthSteeringConfig, mass_mean_units, truth_steering
from roles.table import RoleTable

log = logging.getLogger("headlab")

METHODS: dict[str, str] = {"memory": "attribution", "amplification": "attribution", "truthfulness": "probe"}
"""role -> the survey's method that measures it; every other role: ``detector``."""
TRUTH_FLOOR = 0.7
"""Held-out accuracy a truthfulness probe must reach (chance 0.5 on the balanced capitals set), with its BH-corrected
label-permutation p-value below alpha; the probe's control task gives the control column (selectivity)."""


@dataclass
class RealStages:
    """Every scored (head, role) of a real model, the group checks and what was done."""

    table: pd.DataFrame
    groups: dict[str, dict] = field(default_factory=dict)
    steering: dict | None = None
    notes: list[str] = field(default_factory=list)


def knowledge_map(loaded: LoadedModel, cfg: DetectConfig, seed: int, ablate: bool
                  ) -> tuple[RoleTable, dict, list[str]]:
    """Memory and amplification heads on the capital prompts the model answers correctly, ablated on the answer's
    loss; the group checks of both, and a note of how many prompts were kept."""
    model, tokenizer = loaded.model, loaded.tokenizer
    detect = capitals_batch(tokenizer, cfg.batch_size, seed + 1, model=model)
    right, total = int(detect["n_correct"]), int(detect["n_candidates"])
    notes = [f"KR/EP prompts: the {right} of {total} capital prompts answered correctly (top-1)" if right >= 4 else
             f"KR/EP prompts: all {total} capital prompts, since the model answers only {right} correctly (its "
             "memory and amplification verdicts say little)"]
    evidence = measure_heads(model, detect, ["memory", "amplification"])
    size = cfg.eval_size(toy=False)
    batches = Batches(detect, capitals_batch(tokenizer, size, seed + 2, model=model),
                      capitals_batch(tokenizer, size, seed + 3, model=model))
    head_map = map_heads(model, batches, "memory", cfg, seed, evidence=evidence, null={}, ablate=ablate)
    groups = {}
    if ablate:
        for role in ("memory", "amplification"):
            rows = head_map.table.rows(role)
            detected = torch.zeros(head_map.table.shape, dtype=torch.bool)
            for row in rows[rows["detected"]].itertuples():
                detected[row.layer, row.head] = True
            check = group_check(model, batches, detected, cfg, seed)
            if check is not None:
                groups[role] = {**_group_summary(check, cfg), **group_controls(
                    model, batches, check, head_map.table.frame, head_map.table.shape, cfg, seed)}
    return head_map.table, groups, notes


def _group_summary(check: GroupCheck, cfg: DetectConfig) -> dict:
    return {"heads": [list(h) for h in check.heads], "effect": check.effect, "random_mean": check.reference,
            "p_value": check.p_value, "min_attainable_p": 1 / (1 + len(check.random_effects)),
            "functional": check.functional(cfg.min_effect, cfg.alpha)}


def truthfulness_rows(loaded: LoadedModel, work: Path, cfg: DetectConfig, seed: int, limit: int | None,
                      steer: bool) -> tuple[pd.DataFrame, dict | None]:
    """Cache and probe every head on the capitals true/false statements; a row per head, and the steering check of
    the detected heads (the causal check of the role, shared by its heads)."""
    from data.cache import HeadCache
    from data.cache_command import cache
    from probes import ControlConfig, probe

    where = loaded.placement
    placed = {} if where is None else {"device_map": where.device_map, "max_memory": where.max_memory,
                                       "offload_folder": where.offload_folder}
    cache_dir = cache(model=loaded.model_id, dataset="capitals", out=work / "cache-capitals", positions="last",
                      limit=limit, **placed)
    probe_dir = probe(cache_dir, out=work / "probe-capitals", logger="none",
                      control=ControlConfig(permutations=1000, bootstrap=200))
    heads = pd.read_csv(probe_dir / "heads.csv")
    detected = (heads["accuracy"] >= TRUTH_FLOOR) & (heads["p_value_bh"] < cfg.alpha)
    frame = pd.DataFrame({
        "layer": heads["layer"], "head": heads["head"], "role": "truthfulness", "score": heads["accuracy"],
        "floor": TRUTH_FLOOR, "control": heads["control_accuracy"], "p_value": heads["p_value"],
        "p_adjusted": heads["p_value_bh"], "detected": detected,
    })
    steering = None
    if steer and detected.any():
        steering = steer_truth(loaded, HeadCache.open(cache_dir), probe_dir, heads[detected], seed,
                               significance=cfg.alpha)
        frame["functional"] = detected & (steering["verdict"] == FUNCTIONAL)
        frame["effect_method"] = steering["decided_by"]
    return frame, steering


@torch.no_grad()
def steer_truth(loaded: LoadedModel, cache, probe_dir: Path, detected: pd.DataFrame, seed: int,
                significance: float = 0.05, config: TruthSteeringConfig | None = None,
                pairs: list[tuple[str, str]] | None = None) -> dict:
    """The R1 steering check (:func:`roles.stages.truth_steering.truth_steering`) of the detected heads, ranked by
    validation accuracy, along their mass-mean truth directions; every head's direction is passed for the
    depth-matched random heads. ``pairs``: (country, capital) pairs to prompt with (default: the shipped table)."""
    from probes.report import load_directions

    config = config or TruthSteeringConfig(significance=significance, n_random=draws_for(significance / 5))
    best = detected.sort_values("val_accuracy", ascending=False)
    ranked = [(int(r.layer), int(r.head)) for r in best.itertuples()]
    table, _ = load_directions(probe_dir / "directions.safetensors")
    units = mass_mean_units(table, cache.layers)
    n_heads = table["mass_mean_direction"].shape[1]
    return truth_steering(loaded.model, loaded.tokenizer, ranked, units, n_heads, seed, config, pairs)


def real_stages(loaded: LoadedModel, cfg: DetectConfig, length: int, seed: int, ablate: bool, work: Path,
                probe_limit: int | None = None) -> RealStages:
    """Every stage's head types on a causal LM (see the module docstring); detection only for an encoder."""
    induction = map_real_model(loaded, "induction", cfg, length, seed, ablate)
    frames = [induction.head_map.table.frame]
    stages = RealStages(pd.DataFrame(), notes=list(induction.notes))
    if induction.head_map.group is not None:
        check, table = induction.head_map.group, induction.head_map.table
        batches = task_batches(loaded, "induction", cfg, length, seed)  # the batches map_real_model checked on
        stages.groups["induction"] = {**_group_summary(check, cfg), **group_controls(
            loaded.model, batches, check, table.frame, table.shape, cfg, seed)}
    if loaded.kind == "causal_lm" and loaded.tokenizer is not None:
        knowledge, groups, knowledge_notes = knowledge_map(loaded, cfg, seed, ablate)
        stages.notes += knowledge_notes
        frames.append(knowledge.frame)
        stages.groups.update(groups)
        truth, stages.steering = truthfulness_rows(loaded, work, cfg, seed, probe_limit, steer=ablate)
        frames.append(truth)
        stages.notes.append("KR/EP: memory and amplification heads by direct logit attribution on capital prompts; "
                            "LR: truthfulness heads by probing capitals statements"
                            + ("" if ablate else " (no causal checks: --ablate false)"))
    table = pd.concat(frames, ignore_index=True)
    table["method"] = table["role"].map(METHODS).fillna("detector")
    stages.table = table
    return stages


def any_detected(table: pd.DataFrame) -> dict[str, bool]:
    """role -> whether any head was detected."""
    return {role: bool(np.asarray(group["detected"], dtype=bool).any()) for role, group in table.groupby("role")}
