"""Where the stage map's heads come from: finished toy runs (their ``roles.csv``) and Hugging Face models (scored here).

* **Toy runs** are read from their role table, re-thresholded with the same ``n_sigma`` from its null columns
  (:meth:`roles.table.RoleTable.rethresholded`); ``functional`` (the causal check) stays true only for heads still
  detected. Seeds of one parent directory (``seed-*``) form a group, pooled in the report.
* **Hugging Face models** load through :func:`headlab.models.load_model` (encoders with AutoModel, causal LMs with
  AutoModelForCausalLM, eager attention) and are scored with the pattern detectors (plus the OV ``copying`` detector
  for causal LMs whose weights headlab can read) on the induction batch of :mod:`roles.batches`, against null
  thresholds from random re-initialisations, so "detected" means what it means for toy models. In an encoder,
  attention_sink is attention to ``[CLS]`` and the duplicate/induction scores count attention to *earlier* positions
  only. Causal LMs are also ablated head by head on the repeated part's next-token loss (``functional``); an encoder
  has no such loss and gets detection only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import nn

from headlab.errors import HeadlabError
from headlab.models import load_model
from headlab.runs import find_runs, seed_number
from roles.ablation import ablation_effects
from roles.batches import repeat_batch
from roles.mapping import DetectConfig
from roles.null import null_distribution
from roles.ov import ov_circuit
from roles.registry import score_heads
from roles.stages.statistics import relative_depth
from roles.stages.taxonomy import STAGE_ORDER
from roles.table import RoleTable

HF_DETECTORS: tuple[str, ...] = ("previous_token", "duplicate_token", "induction", "attention_sink")
"""The pattern detectors that need only ``input_ids``: what every Hugging Face model is scored with."""

ROW_COLUMNS = ["model", "layer", "head", "n_layers", "relative_depth", "role", "stage", "score", "threshold",
               "functional", "kind"]
"""Columns of ``stages.csv``: one row per model x detected (head, role)."""


@dataclass
class ModelHeads:
    """One model's role table and what the model is."""

    name: str
    kind: str  # "toy", "encoder" or "causal_lm"
    n_layers: int
    n_heads: int
    table: RoleTable
    source: str
    group: str | None = None  # toy seeds of one parent directory are pooled under this label
    notes: list[str] = field(default_factory=list)

    def detected_rows(self, stages: dict[str, str]) -> pd.DataFrame:
        """The rows of ``stages.csv`` for this model: every detected (head, role) with its stage and depth."""
        frame = self.table.frame
        unknown = sorted(set(frame["role"]) - set(stages))
        if unknown:
            raise HeadlabError(
                f"{self.name}: role(s) {', '.join(unknown)} have no stage; add them with "
                f'--stage_map \'{{"{unknown[0]}": "LR"}}\' (stages: {", ".join(STAGE_ORDER)})'
            )
        rows = frame[frame["detected"]].copy()
        rows["model"] = self.name
        rows["kind"] = self.kind
        rows["n_layers"] = self.n_layers
        rows["relative_depth"] = relative_depth(rows["layer"].to_numpy(), self.n_layers)
        rows["stage"] = rows["role"].map(stages)
        rows = rows.sort_values(["layer", "head", "role"], kind="stable")
        return rows[ROW_COLUMNS].reset_index(drop=True)

    def scored_stages(self, stages: dict[str, str]) -> list[str]:
        roles = set(self.table.frame["role"])
        return [s for s in STAGE_ORDER if any(stages.get(r) == s for r in roles)]


def resolve_toy_runs(paths: list[Path]) -> list[Path]:
    """Toy run directories from ``paths`` (see :func:`headlab.runs.find_runs`)."""
    return find_runs(paths, "roles.csv", "python train.py toy --out DIR")


def load_toy_run(run_dir: Path, n_sigma: float | None = None) -> ModelHeads:
    """A finished toy run's role table (``roles.csv``) and its depth (``model/config.json``); with ``n_sigma``
    re-thresholded (see the module docstring), without it used as it stands."""
    run_dir = Path(run_dir)
    config_path = run_dir / "model" / "config.json"
    if not config_path.exists():
        raise HeadlabError(
            f"{run_dir} has roles.csv but no model/config.json; pass a complete toy run directory "
            "(rerun `python train.py toy --out DIR`)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HeadlabError(f"{config_path} is not valid JSON; rerun the toy run that wrote it") from error
    table = RoleTable.read(run_dir / "roles.csv")
    if n_sigma is not None:
        table = table.rethresholded(n_sigma)
    layers, heads = table.shape
    n_layers = int(config.get("num_hidden_layers") or layers)
    n_heads = int(config.get("num_attention_heads") or heads)
    if seed_number(run_dir) is not None:
        name, group = f"toy:{run_dir.parent.name}/{run_dir.name}", f"toy:{run_dir.parent.name}"
    else:
        name, group = f"toy:{run_dir.name}", None
    task = (config.get("headlab_task") or {}).get("name")
    notes = [f"toy model trained on {task}" if task else "toy model"]
    return ModelHeads(name, "toy", n_layers, n_heads, table, str(run_dir), group, notes)


def _reads_ov(model: nn.Module) -> bool:
    try:
        ov_circuit(model, 0)
    except HeadlabError:
        return False
    return True


def map_hf_model(spec: str, detection: DetectConfig, length: int, seed: int, ablate: bool = True) -> ModelHeads:
    """Score every head of a Hugging Face model on the repeated-segment batch against its null distribution."""
    loaded = load_model(spec, head="auto", attn_implementation="eager", need_tokenizer=False)
    model, tokenizer, kind = loaded.model, loaded.tokenizer, loaded.kind
    notes = []
    if tokenizer is None:
        notes.append("no tokenizer found: random tokens from the whole vocabulary, no special-token frame")
    names = list(HF_DETECTORS)
    if kind == "causal_lm" and _reads_ov(model):
        names.append("copying")
    batch = repeat_batch(model, tokenizer, detection.batch_size, length, seed + 1)
    scores = score_heads(model, batch, names)
    null = null_distribution(model, batch, names, n_models=detection.n_null, seed=seed + 10_000)
    ablation = None
    if kind == "causal_lm" and ablate:
        eval_batch = repeat_batch(model, tokenizer, detection.eval_batch_size, length, seed + 2)
        other = repeat_batch(model, tokenizer, detection.eval_batch_size, length, seed + 3)
        ablation = ablation_effects(model, eval_batch, detection.ablation, other)
        notes.append(f"{detection.ablation} ablation on the repeated part's next-token loss (functional column)")
    else:
        why = "an encoder has no next-token task loss" if kind == "encoder" else "--ablate false"
        notes.append(f"detection only, no ablation ({why})")
    table = RoleTable.build(scores, null, ablation, detection.n_sigma, detection.effect_sigma, None,
                            detection.min_effect)
    n_layers, n_heads = next(iter(scores.values())).shape
    name = spec if not Path(spec).exists() else Path(spec).resolve().name
    return ModelHeads(name, kind, int(n_layers), int(n_heads), table, spec, None, notes)
