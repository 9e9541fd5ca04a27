"""Where the stage map's heads come from: finished toy runs (their ``roles.csv``) and Hugging Face models (mapped here).

* **Toy runs** are read from their role table, verdicts as they stand (the same rule as for real models, applied
  when the run finished). Seeds of one parent directory (``seed-*``) form a group, pooled in the report.
* **Hugging Face models** are mapped by :func:`roles.real.map_real_model` on the induction task's batches: the
  attention detectors on repeated segments of ordinary tokens, name movers on the ioi prompts, the OV detectors
  where the model allows them, and (causal LMs) the attribution screen with exact confirmation. In an encoder,
  attention_sink is attention to ``[CLS]`` and the duplicate/induction scores count attention to *earlier* positions
  only; an encoder has no next-token loss and gets detection only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from headlab.errors import HeadlabError
from headlab.models import load_model
from headlab.runs import find_runs, seed_number
from roles.mapping import DetectConfig
from roles.real import map_real_model
from roles.rule import PROPERTIES
from roles.stages.statistics import relative_depth
from roles.stages.taxonomy import STAGE_ORDER
from roles.table import RoleTable

ROW_COLUMNS = ["model", "layer", "head", "n_layers", "relative_depth", "role", "stage", "score", "floor", "control",
               "p_adjusted", "functional", "kind"]
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
        frame = frame[frame["role"].isin(stages) | ~frame["role"].isin(PROPERTIES)]  # properties: no stage
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


def load_toy_run(run_dir: Path) -> ModelHeads:
    """A finished toy run's role table (``roles.csv``, with its verdicts as they stand) and its depth
    (``model/config.json``)."""
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


def map_hf_model(spec: str, detection: DetectConfig, length: int, seed: int, ablate: bool = True) -> ModelHeads:
    """Map every head of a Hugging Face model on the induction task's batches (:mod:`roles.real`)."""
    loaded = load_model(spec, head="auto", attn_implementation="eager", need_tokenizer=False)
    real = map_real_model(loaded, "induction", detection, length, seed, ablate)
    n_layers, n_heads = real.head_map.table.shape
    name = spec if not Path(spec).exists() else Path(spec).resolve().name
    return ModelHeads(name, real.kind, int(n_layers), int(n_heads), real.head_map.table, spec, None, real.notes)
