"""The survey's four stages on a real causal LM, each head type measured with the method the survey names and given
a causal check:

====  =========================  ===========  ====================================================================
stage head type                  method       evidence and causal check
====  =========================  ===========  ====================================================================
KR    memory heads               knockout     attention knockout from the final position to the subject on the
                                              capital prompts answered correctly (:mod:`roles.memory_knockout`),
                                              a depth-neutral causal test; the detected group knocked out against
                                              depth-matched random groups. The attribution verdict (subject attention
                                              + direct logit attribution, :mod:`roles.knowledge`) is kept for
                                              comparison in ``localisers`` of the summary and a note
ICI   previous-token, duplicate, detector     attention detectors with controls (:mod:`roles.real`); ablated on the
      name-mover heads                        induction loss
LR    induction, successor       detector     as above (successor: OV succession over ordinal tokens)
LR    truthfulness heads         probe        a linear probe per head on true/false capital statements (cache +
                                              probe, the Inference-Time Intervention recipe); steering the top heads
                                              along their directions, read by answer scoring (R1,
                                              :mod:`roles.stages.truth_steering`) and by a few-shot TRUE/FALSE
                                              judgement edited at the probe's full stop (R2,
                                              :mod:`roles.stages.truth_judgement`), against random directions;
                                              functional when either readout passes
EP    amplification heads        patching     the head's final-position output patched from another prompt lowers
                                              the answer's log-probability (:mod:`roles.amplification_patching`),
                                              knockout memory heads excluded; the detected group patched against
                                              depth-matched random groups. The attribution verdict (direct logit
                                              attribution without subject attention) is kept for comparison
====  =========================  ===========  ====================================================================

Every scored (head, role) becomes a row with its method and evidence, detected or not, so negative findings show.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab.models import LoadedModel
from roles.amplification_patching import patching_amplification
from roles.knowledge import capitals_batch
from roles.mapping import Batches, DetectConfig, GroupCheck, map_heads
from roles.memory_knockout import agreement, knockout_memory
from roles.real import map_real_model, task_batches
from roles.registry import measure_heads
from roles.stages.controls import group_controls
from roles.stages.truth_judgement import combined_verdict, truth_judgement
from roles.stages.truth_steering import FUNCTIONAL, TruthSteeringConfig, mass_mean_units, truth_steering
from roles.table import RoleTable

log = logging.getLogger("headlab")

METHODS: dict[str, str] = {"memory": "knockout", "amplification": "patching", "truthfulness": "probe"}
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
    localisers: dict | None = None  # the memory and amplification localisers' summaries and agreement with attribution


def knowledge_map(loaded: LoadedModel, cfg: DetectConfig, seed: int, ablate: bool
                  ) -> tuple[RoleTable, dict, list[str], dict]:
    """Memory heads by knockout and amplification heads by final-position patching on the capital prompts the model
    answers correctly; the group checks of both, notes (how many prompts were kept, where the causal and the
    attribution verdicts agree), and the summaries of both localisers with that agreement."""
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
    attributed = map_heads(model, batches, "memory", cfg, seed, evidence=evidence, null={}, ablate=False).table
    evaluate = {k: v[:cfg.group_batch_size] if torch.is_tensor(v) and v.ndim >= 1 and k != "distractors" else v
                for k, v in batches.eval.items()}
    memory_rows, knocked, memory_group, memory = knockout_memory(model, detect, evaluate, cfg.alpha,
                                                                 cfg.min_effect, seed, ablate, cfg.random_groups)
    amplification_rows, patched, amplification_group, amplification = patching_amplification(
        model, detect, evaluate, knocked, cfg.alpha, cfg.min_effect, seed, ablate, cfg.random_groups)
    groups = {role: group for role, group in (("memory", memory_group), ("amplification", amplification_group))
              if group is not None}
    memory["agreement"] = agreement(knocked, _detected(attributed, "memory"), "knockout")
    amplification["agreement"] = agreement(patched, _detected(attributed, "amplification"), "patching")
    notes += [_agreement_note("KR memory", memory["agreement"], "knockout", "attention knockout"),
              _agreement_note("EP amplification", amplification["agreement"], "patching", "final-position patching")]
    table = RoleTable(pd.concat([memory_rows, amplification_rows], ignore_index=True))
    return table, groups, notes, {"memory": memory, "amplification": amplification}


def _detected(table: RoleTable, role: str) -> torch.Tensor:
    rows = table.rows(role)
    detected = torch.zeros(table.shape, dtype=torch.bool)
    for row in rows[rows["detected"]].itertuples():
        detected[row.layer, row.head] = True
    return detected


def _agreement_note(what: str, counts: dict, method: str, name: str) -> str:
    return (f"{what} heads: {counts[method]} by {name} (layers {counts[method + '_layers']}), "
            f"{counts['attribution']} by the attribution detector (layers {counts['attribution_layers']}); "
            f"{counts['both']} found by both, {counts[method + '_only']} by {method} only, "
            f"{counts['attribution_only']} by attribution only")


def _group_summary(check: GroupCheck, cfg: DetectConfig) -> dict:
    return {"heads": [list(h) for h in check.heads], "effect": check.effect, "random_mean": check.reference,
            "p_value": check.p_value, "min_attainable_p": check.min_attainable_p,
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
        config = TruthSteeringConfig(significance=cfg.alpha, n_random=cfg.random_directions)
        steering = steer_truth(loaded, HeadCache.open(cache_dir), probe_dir, heads[detected], seed, config=config)
        frame["functional"] = detected & (steering["verdict"] == FUNCTIONAL)
        frame["effect_method"] = steering["decided_by"]
    return frame, steering


@torch.no_grad()
def steer_truth(loaded: LoadedModel, cache, probe_dir: Path, detected: pd.DataFrame, seed: int,
                significance: float = 0.05, config: TruthSteeringConfig | None = None,
                pairs: list[tuple[str, str]] | None = None, examples: list[dict] | None = None) -> dict:
    """The steering checks of the detected heads, ranked by validation accuracy, along their mass-mean truth
    directions: R1 (:func:`roles.stages.truth_steering.truth_steering`; every head's direction is passed for the
    depth-matched random heads) and R2 (:func:`roles.stages.truth_judgement.truth_judgement`, under ``r2``), with
    the verdict of both (:func:`roles.stages.truth_judgement.combined_verdict`; R1's own in ``r1_verdict``).
    ``pairs``: (country, capital) pairs to prompt R1 with, ``examples``: labelled statements for R2 (default: the
    shipped capitals)."""
    from probes.report import load_directions

    config = config or TruthSteeringConfig(significance=significance)
    best = detected.sort_values("val_accuracy", ascending=False)
    ranked = [(int(r.layer), int(r.head)) for r in best.itertuples()]
    table, _ = load_directions(probe_dir / "directions.safetensors")
    units = mass_mean_units(table, cache.layers)
    n_heads = table["mass_mean_direction"].shape[1]
    r1 = truth_steering(loaded.model, loaded.tokenizer, ranked, units, n_heads, seed, config, pairs)
    started = time.perf_counter()
    r2 = truth_judgement(loaded.model, loaded.tokenizer, ranked, units, seed, config, examples)
    r2["seconds"] = time.perf_counter() - started
    log.info("truthfulness R2 steering check: %.0f s", r2["seconds"])
    return {**r1, "r1_verdict": r1["verdict"], **combined_verdict(r1, r2), "r2": r2}


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
        knowledge, groups, knowledge_notes, stages.localisers = knowledge_map(loaded, cfg, seed, ablate)
        stages.notes += knowledge_notes
        frames.append(knowledge.frame)
        stages.groups.update(groups)
        truth, stages.steering = truthfulness_rows(loaded, work, cfg, seed, probe_limit, steer=ablate)
        frames.append(truth)
        stages.notes.append("KR: memory heads by attention knockout, EP: amplification heads by final-position "
                            "patching, both on capital prompts; "
                            "LR: truthfulness heads by probing capitals statements"
                            + ("" if ablate else " (no causal checks: --ablate false)"))
    table = pd.concat(frames, ignore_index=True)
    table["method"] = table["role"].map(METHODS).fillna("detector")
    stages.table = table
    return stages


def any_detected(table: pd.DataFrame) -> dict[str, bool]:
    """role -> whether any head was detected."""
    return {role: bool(np.asarray(group["detected"], dtype=bool).any()) for role, group in table.groupby("role")}
