"""Head functions of a Hugging Face model (SmolLM2, GPT-2, Pythia, Llama, BERT...): the batches, the detectors each
architecture allows, and the causal check, in one path shared by ``detect`` and ``stages``.

* **Batches** (:mod:`roles.batches`): the repeated-segment batch of ordinary tokens framed like a text (previous-
  token, duplicate-token, induction, attention-sink detectors, and the ``induction`` task's loss), the built-in
  ``ioi`` prompts (name movers and the ``ioi`` task's loss), the tokenizer's ordinal tokens (successor heads).
* **Detectors**: the attention detectors on every architecture; the OV detectors (``copying``, ``successor``,
  ``name_copy``) where the model has an unembedding and a value projection headlab can read, with a note otherwise.
* **Causal check**: causal LMs only (an encoder has no next-token loss): screen every head by attribution patching,
  confirm exactly (:func:`roles.attribution.screen_and_confirm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from headlab.errors import HeadlabError
from headlab.models import LoadedModel
from roles.batches import ORDINAL_FAMILIES, ioi_batch, ordinal_batch, repeat_batch
from roles.evidence import Evidence
from roles.mapping import Batches, DetectConfig, HeadMap, map_heads
from roles.null import null_distribution
from roles.ov import reads_ov
from roles.registry import measure_heads
from roles.rule import floor_of

REAL_TASKS: dict[str, str] = {"induction": "induction", "ioi": "name_mover"}
"""Tasks a Hugging Face model is mapped on, and their target roles."""
PATTERN_DETECTORS: tuple[str, ...] = ("previous_token", "duplicate_token", "induction", "attention_sink")
NULL_SEQUENCES = 8
"""Sequences the reported random-initialisation null of a real model is scored on."""


@dataclass
class RealMap:
    head_map: HeadMap
    kind: str  # "causal_lm" or "encoder"
    notes: list[str] = field(default_factory=list)


def task_batches(loaded: LoadedModel, task: str, cfg: DetectConfig, length: int, seed: int) -> Batches:
    """The detection, evaluation and resampling batches of ``task`` on ``loaded``'s tokens."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if task not in REAL_TASKS:
        raise HeadlabError(f"task '{task}' is a toy task; on a Hugging Face model use --task induction or ioi")
    size = cfg.eval_size(toy=False)
    if task == "ioi":
        if tokenizer is None:
            raise HeadlabError(f"{loaded.model_id} has no tokenizer: the ioi prompts need one; use --task induction")
        return Batches(ioi_batch(tokenizer, cfg.batch_size, seed + 1), ioi_batch(tokenizer, size, seed + 2),
                       ioi_batch(tokenizer, size, seed + 3))
    return Batches(repeat_batch(model, tokenizer, cfg.batch_size, length, seed + 1),
                   repeat_batch(model, tokenizer, size, length, seed + 2),
                   repeat_batch(model, tokenizer, size, length, seed + 3))


def successor_by_family(model: nn.Module, ordinals: dict) -> list[dict]:
    """Gould et al. report successor heads per ordinal family: for each family of ``ordinals``
    (:func:`roles.batches.ordinal_batch`), its pairs, the best head of layer >= 1 (layer 0 reads raw embeddings)
    and that head's succession score on the family alone."""
    names = list(ORDINAL_FAMILIES)
    out = []
    for index in ordinals["successor_family"].unique().tolist():
        keep = ordinals["successor_family"] == index
        subset = {**ordinals, "successor_pairs": ordinals["successor_pairs"][keep],
                  "successor_family": ordinals["successor_family"][keep]}
        score = measure_heads(model, subset, ["successor"])["successor"].score[1:]  # [layer >= 1, head]
        best = int(score.argmax())
        layer, head = divmod(best, score.shape[1])
        out.append({"family": names[index], "pairs": int(keep.sum()), "layer": layer + 1, "head": head,
                    "score": float(score.max())})
    return out


def successor_families_note(model: nn.Module, ordinals: dict, floor: float) -> str:
    """One note line: each family's best successor head, its score and whether it clears ``floor`` (the successor
    rule's floor, :data:`roles.rule.FLOORS`: a majority of the family's tokens must map to their successor)."""
    parts = [f"{f['family']} ({f['pairs']} pairs) L{f['layer']}H{f['head']} {f['score']:.2f} "
             f"{'passes' if f['score'] >= floor else 'below'}" for f in successor_by_family(model, ordinals)]
    return f"successor heads by family (best head of layer >= 1, floor {floor}): " + "; ".join(parts)


def real_evidence(model: nn.Module, tokenizer, kind: str, cfg: DetectConfig, length: int, seed: int,
                  notes: list[str]) -> tuple[dict[str, Evidence], dict]:
    """Every detector the model allows, each on its own batch; returns the evidence and the null statistics of the
    attention detectors (on the repeated-segment batch)."""
    repeat = repeat_batch(model, tokenizer, cfg.batch_size, length, seed + 1)
    evidence = measure_heads(model, repeat, PATTERN_DETECTORS)
    null = {}
    if cfg.n_null:  # reported only: on a few sequences, random copies of a real model are costly
        few = {k: v[:NULL_SEQUENCES] for k, v in repeat.items()}
        null = null_distribution(model, few, list(evidence), cfg.n_null, seed + 10_000)
    if tokenizer is None:
        notes.append("no tokenizer: random tokens from the whole vocabulary, no special-token frame, no ioi or "
                     "successor detectors")
        return evidence, null
    if kind == "causal_lm":
        evidence.update(measure_heads(model, ioi_batch(tokenizer, cfg.batch_size, seed + 1), ["name_mover"]))
    why = reads_ov(model)
    if why is not None:
        notes.append(f"OV detectors (copying, successor, name copying) skipped: {why}")
        return evidence, null
    evidence.update(measure_heads(model, {}, ["copying"]))
    try:
        ordinals = ordinal_batch(tokenizer)
        evidence.update(measure_heads(model, ordinals, ["successor"]))
        notes.append(successor_families_note(model, ordinals, floor_of("successor", 0, cfg.floors)))
    except HeadlabError as error:
        notes.append(f"successor detector skipped: {error}")
    evidence.update(measure_heads(model, ioi_batch(tokenizer, cfg.batch_size, seed + 1), ["name_copy"]))
    return evidence, null


def map_real_model(loaded: LoadedModel, task: str, cfg: DetectConfig, length: int, seed: int,
                   ablate: bool = True) -> RealMap:
    """Evidence, verdicts and (for causal LMs, unless ``ablate`` is off) the causal check on ``task``'s loss."""
    model, kind, notes = loaded.model, loaded.kind, []
    evidence, null = real_evidence(model, loaded.tokenizer, kind, cfg, length, seed, notes)
    check = kind == "causal_lm" and ablate
    if not check:
        why = "an encoder has no next-token task loss" if kind == "encoder" else "--ablate false"
        notes.append(f"detection only, no ablation ({why})")
        batches = Batches({}, {}, {})
    else:
        batches = task_batches(loaded, task, cfg, length, seed)
        notes.append(f"{cfg.ablation} ablation on the {task} task's loss: attribution screen, exact confirmation")
    head_map = map_heads(model, batches, REAL_TASKS.get(task, task), cfg, seed, evidence=evidence, null=null,
                         ablate=check)
    return RealMap(head_map, kind, notes)
