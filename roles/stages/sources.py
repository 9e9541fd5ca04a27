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

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from headlab.errors import HeadlabError
from headlab.models import load_model
from headlab.placement import Placement
from headlab.runs import find_runs, read_json_object, seed_number
from roles.mapping import DetectConfig
from roles.rule import PROPERTIES
from roles.stages.real import real_stages
from roles.stages.statistics import relative_depth
from roles.stages.taxonomy import STAGE_ORDER
from roles.table import RoleTable

ROW_COLUMNS = ["model", "layer", "head", "n_layers", "relative_depth", "role", "stage", "method", "score", "floor",
               "control", "p_adjusted", "detected", "ablation_effect", "effect_method", "functional", "kind"]
"""Columns of ``stages.csv``: one row per model x scored (head, role), detected or not."""


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
    extra: dict = field(default_factory=dict)  # group checks and the steering check of a real model

    def scored_rows(self, stages: dict[str, str]) -> pd.DataFrame:
        """The rows of ``stages.csv`` for this model: every scored (head, role) of a staged role, with its stage,
        method, evidence, verdict and depth (properties such as copying have no stage and are left out)."""
        frame = self.table.frame
        frame = frame[frame["role"].isin(stages) | ~frame["role"].isin(PROPERTIES)]  # properties: no stage
        unknown = sorted(set(frame["role"]) - set(stages))
        if unknown:
            raise HeadlabError(
                f"{self.name}: role(s) {', '.join(unknown)} have no stage; add them with "
                f'--stage_map \'{{"{unknown[0]}": "LR"}}\' (stages: {", ".join(STAGE_ORDER)})'
            )
        rows = frame.copy()
        if "method" not in rows:
            rows["method"] = "detector"
        for column in ("control", "p_adjusted", "ablation_effect", "effect_method", "functional"):
            if column not in rows:
                rows[column] = pd.NA
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
    config = read_json_object(config_path, "rerun the toy run that wrote it")
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


def map_hf_model(spec: str, detection: DetectConfig, length: int, seed: int, ablate: bool = True,
                 work: Path | None = None, probe_limit: int | None = None,
                 placement: Placement | None = None) -> ModelHeads:
    """Every stage's head types of a Hugging Face model (:mod:`roles.stages.real`); ``work`` holds the truthfulness
    probe's cache and run (default: a temporary folder)."""
    import tempfile

    loaded = load_model(spec, head="auto", attn_implementation="eager", need_tokenizer=False, placement=placement)
    name = spec if not Path(spec).exists() else Path(spec).resolve().name
    with tempfile.TemporaryDirectory() as tmp:
        real = real_stages(loaded, detection, length, seed, ablate, Path(work or tmp), probe_limit)
    table = RoleTable(real.table)
    n_layers, n_heads = table.shape
    extra = {"groups": real.groups, "steering": real.steering, "localisers": real.localisers}
    return ModelHeads(name, loaded.kind, int(n_layers), int(n_heads), table, spec, None, real.notes, extra)
