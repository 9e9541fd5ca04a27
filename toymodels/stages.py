"""The ``stages`` command: toy vs real, and the survey's four-stage map of head functions by relative depth.

Zheng et al. 2024 (*Attention Heads of Large Language Models: A Survey*) sort head functions into four stages of
reasoning and claim that they run from shallow to deep layers: Knowledge Recalling (**KR**), In-Context
Identification (**ICI**), Latent Reasoning (**LR**) and Expression Preparation (**EP**). This command puts the
detected heads of toy models (finished ``toy`` runs, pooled over seeds) and of Hugging Face models (the offline
all-MiniLM-L6-v2 encoder, any causal LM) side by side, tags each with its stage, and tests the ordering claim.

Stage of each detector (:data:`STAGES`; override with ``--stage_map '{"name_mover": "ICI"}'``):

* ``previous_token``, ``duplicate_token``: ICI (they locate tokens in the context; the survey's table).
* ``induction``, ``successor``, ``iteration``, ``operand_attention``: LR (they compute a new relation from the
  located tokens: copy-what-followed, the next ordinal, the next step of a chain, the operands of a sum).
* ``copying``: EP (amplification/copying of the output into the logits).
* ``name_mover``: EP, as the issue asks (the head writes the chosen name into the output). The survey's own table
  lists Name Mover Heads under ICI; pass ``--stage_map '{"name_mover": "ICI"}'`` to follow it.
* ``attention_sink``: KR. The survey has no sink type; its closest is the KR "constant head" (attends to a fixed
  position regardless of content, reading what the model already holds rather than the context), so a head that
  parks its attention on the first token is counted there.

Definitions:

* **detected**: score above ``null_mean + n_sigma * null_std`` of random re-initialisations of the same architecture
  (:func:`toymodels.detectors.null_distribution`), exactly as for toy runs. Toy runs are read from their
  ``roles.csv`` (it also holds the causal check, ``functional``), re-thresholded with the same ``n_sigma`` from its
  null columns. Hugging Face models are scored with the pattern detectors (previous_token, duplicate_token,
  induction, attention_sink; plus the OV ``copying`` detector for causal LMs whose value/output weights headlab can
  read) on the induction task's batch: random tokens with one segment repeated, drawn from the tokenizer's ordinary
  tokens (no special, ``[unused]`` or ``<...>`` tokens) and framed the way the tokenizer frames a text (MiniLM:
  ``[CLS] ... [SEP]``). In an encoder, attention_sink is attention to ``[CLS]`` and the duplicate/induction scores
  count attention to *earlier* positions only (as for causal models). Causal LMs are also mean-ablated head by head
  on the repeated part's next-token loss (``functional`` as for toy models); an encoder has no such loss, so
  encoders get detection only.
* **relative depth** of layer ``l`` (0-based) in an ``L``-layer model: ``(l + 0.5) / L``, the layer's centre on
  ``[0, 1]``, comparable across depths (a 2-layer toy has heads at 0.25 and 0.75).
* **observations**: every detected (head, role) pair; a head detected for two roles counts once for each.
* **ordering test**: Spearman's rho between the stage rank (KR=0 < ICI=1 < LR=2 < EP=3) and relative depth over the
  observations, and whether the per-stage mean depths are non-decreasing in stage order. The ordering *holds* when
  at least two stages have detected heads, rho > 0 and the means are monotone; otherwise it fails, or is untestable
  (``null``) with fewer than two stages or three observations; ``significant`` adds p < 0.05. Across the seeds of a
  toy group (the ``seed-*`` directories of one parent), the fraction of testable seeds where it holds.

Outputs (``--out``, default ``runs/stages``): ``stages.csv`` (one row per model x detected head and role:
``model, layer, head, n_layers, relative_depth, role, stage, score, threshold, functional, kind``),
``stage_depths.csv`` (per model x stage: count, mean, median, quartiles, min, max of relative depth; pooled toy
groups as models named ``GROUP (pooled, N seeds)``), ``stage_map.png`` (one panel per model: detected heads by
relative depth, one row per stage, coloured by role, each stage's mean marked), ``summary.json`` and
``config.yaml``.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from data.tasks.base import IGNORE, Batch
from data.tasks.induction import InductionTask
from headlab.errors import HeadlabError
from headlab.models import context_length, resolve_model_source
from headlab.runs import atomic_write, atomic_write_json, atomic_write_text, save_config, to_plain
from toymodels.ablation import ablation_effects
from toymodels.command import DetectConfig
from toymodels.detectors import DETECTORS, NullStats, null_distribution, ov_circuit, score_heads
from toymodels.report import role_table

STAGE_ORDER: tuple[str, ...] = ("KR", "ICI", "LR", "EP")
STAGE_NAMES: dict[str, str] = {
    "KR": "Knowledge Recalling",
    "ICI": "In-Context Identification",
    "LR": "Latent Reasoning",
    "EP": "Expression Preparation",
}
STAGES: dict[str, str] = {
    "attention_sink": "KR",
    "previous_token": "ICI",
    "duplicate_token": "ICI",
    "induction": "LR",
    "successor": "LR",
    "iteration": "LR",
    "operand_attention": "LR",
    "copying": "EP",
    "name_mover": "EP",
}
"""role (detector name) -> survey stage; see the module docstring for the reasons."""

HF_DETECTORS: tuple[str, ...] = ("previous_token", "duplicate_token", "induction", "attention_sink")
"""The pattern detectors that need only ``input_ids``: what every Hugging Face model is scored with."""

ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "electra",
        "camembert",
        "distilbert",
        "albert",
        "mpnet",
        "deberta",
        "deberta-v2",
        "modernbert",
    }
)
"""model_type values loaded with AutoModel (bidirectional encoders); everything else as a causal LM."""

ROW_COLUMNS = [
    "model",
    "layer",
    "head",
    "n_layers",
    "relative_depth",
    "role",
    "stage",
    "score",
    "threshold",
    "functional",
    "kind",
]
TOY_REQUIRED = ("layer", "head", "role", "score", "threshold", "detected")


# --------------------------------------------------------------------------------------------------------------
# the stage table and the statistics


def stage_table(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """:data:`STAGES` with ``overrides`` applied; an unknown role or stage is a one-line error."""
    table = dict(STAGES)
    for role, stage in (overrides or {}).items():
        if role not in DETECTORS and role not in STAGES:
            raise HeadlabError(f"--stage_map: unknown role '{role}'; roles are the detectors: {', '.join(DETECTORS)}")
        if str(stage).upper() not in STAGE_ORDER:
            raise HeadlabError(
                f"--stage_map: unknown stage '{stage}' for role '{role}'; valid stages: "
                + ", ".join(f"{s} ({STAGE_NAMES[s]})" for s in STAGE_ORDER)
            )
        table[role] = str(stage).upper()
    return table


def relative_depth(layer: int | np.ndarray, n_layers: int | np.ndarray) -> float | np.ndarray:
    """``(layer + 0.5) / n_layers``: the centre of 0-based ``layer`` on ``[0, 1]``."""
    return (np.asarray(layer) + 0.5) / np.asarray(n_layers)


def depth_stats(depths: pd.Series | np.ndarray) -> dict[str, float | int | None]:
    """Count, mean, median, quartiles, min and max of relative depths (``None`` when there are none)."""
    values = np.asarray(depths, dtype=float)
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "q25": None, "q75": None, "min": None, "max": None}
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def ordering_test(rows: pd.DataFrame) -> dict[str, Any]:
    """Does depth grow with stage (KR < ICI < LR < EP)? ``rows``: detected heads with ``stage``, ``relative_depth``.

    Returns ``rho`` and ``p_value`` (Spearman, stage rank vs depth), ``n`` observations, ``stages_present``,
    ``stage_means``, ``monotone`` (means non-decreasing in stage order), ``holds`` (rho > 0 and monotone; ``None``
    when untestable: fewer than 2 stages or 3 observations, or no spread in depth) and ``significant`` (holds with
    two-sided p < 0.05; a direction alone can come from a rho near 0).
    """
    from scipy.stats import spearmanr

    rank = rows["stage"].map({s: i for i, s in enumerate(STAGE_ORDER)}).to_numpy(dtype=float)
    depth = rows["relative_depth"].to_numpy(dtype=float)
    present = [s for s in STAGE_ORDER if (rows["stage"] == s).any()]
    means = {s: float(rows.loc[rows["stage"] == s, "relative_depth"].mean()) for s in present}
    ordered = [means[s] for s in present]
    monotone = all(a <= b for a, b in itertools.pairwise(ordered)) if len(present) >= 2 else None
    rho = p_value = None
    if len(present) >= 2 and len(rows) >= 3 and np.ptp(depth) > 0:
        result = spearmanr(rank, depth)
        rho, p_value = float(result.statistic), float(result.pvalue)
    holds = None if rho is None else bool(rho > 0 and monotone)
    significant = None if holds is None else bool(holds and p_value < 0.05)
    return {
        "rho": rho,
        "p_value": p_value,
        "n": len(rows),
        "stages_present": present,
        "stage_means": means,
        "monotone": monotone,
        "holds": holds,
        "significant": significant,
    }


# --------------------------------------------------------------------------------------------------------------
# the models' head tables


@dataclass
class ModelHeads:
    """One model's head table (``layer, head, role, score, threshold, detected, functional``) and what it is."""

    name: str
    kind: str  # "toy", "encoder" or "causal_lm"
    n_layers: int
    n_heads: int
    table: pd.DataFrame
    source: str
    group: str | None = None  # toy seeds of one parent directory are pooled under this label
    notes: list[str] = field(default_factory=list)

    def detected_rows(self, stages: dict[str, str]) -> pd.DataFrame:
        """The rows of ``stages.csv`` for this model: every detected (head, role) with its stage and depth."""
        unknown = sorted(set(self.table["role"]) - set(stages))
        if unknown:
            raise HeadlabError(
                f"{self.name}: role(s) {', '.join(unknown)} have no stage; add them with "
                f'--stage_map \'{{"{unknown[0]}": "LR"}}\' (stages: {", ".join(STAGE_ORDER)})'
            )
        rows = self.table[self.table["detected"].astype(bool)].copy()
        rows["model"] = self.name
        rows["kind"] = self.kind
        rows["n_layers"] = self.n_layers
        rows["relative_depth"] = relative_depth(rows["layer"].to_numpy(), self.n_layers)
        rows["stage"] = rows["role"].map(stages)
        if "functional" not in rows:
            rows["functional"] = pd.NA
        rows = rows.sort_values(["layer", "head", "role"], kind="stable")
        return rows[ROW_COLUMNS].reset_index(drop=True)

    def scored_stages(self, stages: dict[str, str]) -> list[str]:
        roles = set(self.table["role"])
        return [s for s in STAGE_ORDER if any(stages.get(r) == s for r in roles)]


def _bool_column(values: pd.Series) -> pd.Series:
    if values.dtype == bool:
        return values
    return values.map(lambda v: str(v).strip().lower() in {"true", "1", "1.0"})


def resolve_toy_runs(paths: list[Path]) -> list[Path]:
    """Toy run directories from ``paths``: glob patterns expanded, a parent with ``seed-*/roles.csv`` expanded."""
    runs: list[Path] = []
    for raw in paths:
        text = str(raw)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches:
            raise HeadlabError(f"toy run pattern {text} matches nothing; pass directories written by `train.py toy`")
        for match in matches:
            path = Path(match)
            if not path.is_dir():
                raise HeadlabError(
                    f"toy run directory {path} does not exist; pass a directory written by "
                    "`python train.py toy --out DIR` (or its parent with seed-* runs)"
                )
            if (path / "roles.csv").exists():
                runs.append(path)
                continue
            seeds = [p for p in path.glob("seed-*") if (p / "roles.csv").exists()]
            if not seeds:
                raise HeadlabError(
                    f"{path} has no roles.csv and no seed-*/roles.csv; pass a finished toy run directory "
                    "(python train.py toy --out DIR writes DIR/roles.csv and DIR/model/)"
                )
            runs.extend(sorted(seeds, key=lambda p: _seed_number(p) if _seed_number(p) is not None else math.inf))
    return runs


def _seed_number(path: Path) -> int | None:
    m = re.fullmatch(r"seed-(\d+)", path.name)
    return int(m.group(1)) if m else None


def load_toy_run(run_dir: Path, n_sigma: float | None = None) -> ModelHeads:
    """A finished toy run's role table (``roles.csv``) and its depth (``model/config.json``).

    With ``n_sigma`` the heads are re-thresholded at ``null_mean + n_sigma * null_std`` from the table's own null
    columns (the same rule as for Hugging Face models; ``functional`` stays true only for heads still detected);
    without it the table is used as it stands.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "model" / "config.json"
    if not config_path.exists():
        raise HeadlabError(
            f"{run_dir} has roles.csv but no model/config.json; pass a complete toy run directory "
            "(rerun `python train.py toy --out DIR`)"
        )
    config = json.loads(config_path.read_text())
    table = pd.read_csv(run_dir / "roles.csv")
    missing = [c for c in TOY_REQUIRED if c not in table.columns]
    if missing:
        raise HeadlabError(f"{run_dir / 'roles.csv'} lacks column(s) {', '.join(missing)}; is it a toy run's table?")
    table["detected"] = _bool_column(table["detected"])
    if n_sigma is not None and {"null_mean", "null_std"} <= set(table.columns):
        table["threshold"] = table["null_mean"] + n_sigma * table["null_std"]
        table["detected"] = table["score"] > table["threshold"]
    if "functional" in table:
        table["functional"] = _bool_column(table["functional"]) & table["detected"]
    n_layers = int(config.get("num_hidden_layers") or table["layer"].max() + 1)
    n_heads = int(config.get("num_attention_heads") or table["head"].max() + 1)
    seed = _seed_number(run_dir)
    if seed is not None:
        name, group = f"toy:{run_dir.parent.name}/{run_dir.name}", f"toy:{run_dir.parent.name}"
    else:
        name, group = f"toy:{run_dir.name}", None
    task = (config.get("headlab_task") or {}).get("name")
    notes = [f"toy model trained on {task}" if task else "toy model"]
    return ModelHeads(name, "toy", n_layers, n_heads, table, str(run_dir), group, notes)


def load_hf_model(spec: str) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer or None, kind)``: encoders with AutoModel, others with AutoModelForCausalLM (eager)."""
    import transformers

    import toymodels  # noqa: F401  (registers the toy transformer with the Auto classes)

    transformers.utils.logging.disable_progress_bar()
    source = resolve_model_source(spec)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        kind = "encoder" if config.model_type in ENCODER_TYPES else "causal_lm"
        auto = transformers.AutoModel if kind == "encoder" else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(source, attn_implementation="eager")
    except (OSError, ValueError) as error:
        why = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        if Path(source).exists():
            raise HeadlabError(
                f"cannot load model '{spec}' from {source} ({why}); pass a save_pretrained directory"
            ) from error
        raise HeadlabError(
            f"cannot load model '{spec}': not a local directory, and the hub is offline here or has no such model "
            f"({why}); pass a local save_pretrained directory, `minilm` for the built-in encoder, or a cached hub id"
        ) from error
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer, kind


_BRACKETED = re.compile(r"^(\[.*\]|<.*>)$")


def usable_token_ids(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    """Ordinary token ids of the vocabulary: no special tokens and no bracketed ones (``[unused7]``, ``<|x|>``)."""
    config = model.config
    size = int(config.vocab_size)
    excluded: set[int] = set()
    if tokenizer is not None:
        size = min(size, len(tokenizer))
        excluded |= set(tokenizer.all_special_ids)
        names = tokenizer.convert_ids_to_tokens(list(range(size)))
        excluded |= {i for i, name in enumerate(names) if name is None or _BRACKETED.match(str(name))}
    else:
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
            value = getattr(config, key, None)
            excluded |= set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
    ids = torch.tensor([i for i in range(size) if i not in excluded], dtype=torch.long)
    if len(ids) < 4:
        raise HeadlabError(f"model vocabulary has only {len(ids)} ordinary tokens; the induction batch needs 4")
    return ids


def _frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text (BERT: [CLS] / [SEP]; Llama: <s> / none)."""
    if tokenizer is None:
        return [], []
    empty = list(tokenizer("", add_special_tokens=True)["input_ids"])
    leading = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    k = 0
    while k < len(empty) and empty[k] in leading:
        k += 1
    return empty[:k], empty[k:]


def repeat_batch(model: nn.Module, tokenizer: Any, batch_size: int, length: int, seed: int) -> Batch:
    """The induction task's batch (random tokens, one segment repeated) on ``model``'s ordinary tokens.

    Framed like a text of the tokenizer; targets (next token on the repeated part) are -100 on the frame.
    """
    allowed = usable_token_ids(model, tokenizer)
    prefix, suffix = _frame(tokenizer)
    limit = context_length(model, tokenizer) or length + len(prefix) + len(suffix)
    length = min(length, limit - len(prefix) - len(suffix))
    if length < 4:
        raise HeadlabError(f"model context of {limit} tokens is too short for the induction batch (needs >= 4)")
    max_segment = min(24, length // 2)
    task = InductionTask(vocab=len(allowed), length=length, min_segment=min(8, max_segment), max_segment=max_segment)
    raw = task.detection_batch(batch_size, seed)
    ids = allowed[raw["input_ids"]]
    targets = torch.where(raw["targets"] == IGNORE, IGNORE, allowed[raw["targets"].clamp(min=0)])
    n = ids.shape[0]
    before, after = torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)
    ids = torch.cat([before.expand(n, -1), ids, after.expand(n, -1)], dim=1)
    pad = torch.full((n, len(prefix)), IGNORE), torch.full((n, len(suffix)), IGNORE)
    targets = torch.cat([pad[0], targets, pad[1]], dim=1)
    return {"input_ids": ids, "targets": targets}


def _detection_table(scores: dict[str, torch.Tensor], null: dict[str, NullStats], n_sigma: float) -> pd.DataFrame:
    """The role table without an ablation check (``functional`` empty)."""
    rows = []
    for role, values in scores.items():
        threshold = null[role].threshold(n_sigma)
        for layer in range(values.shape[0]):
            for head in range(values.shape[1]):
                score = float(values[layer, head])
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "role": role,
                        "score": score,
                        "null_mean": null[role].mean,
                        "null_std": null[role].std,
                        "threshold": threshold,
                        "detected": score > threshold,
                        "functional": pd.NA,
                    }
                )
    return pd.DataFrame(rows)


def _reads_ov(model: nn.Module) -> bool:
    try:
        ov_circuit(model, 0)
    except HeadlabError:
        return False
    return True


def map_hf_model(spec: str, detection: DetectConfig, length: int, seed: int, ablate: bool = True) -> ModelHeads:
    """Score every head of a Hugging Face model on the repeated-segment batch against its null distribution."""
    model, tokenizer, kind = load_hf_model(spec)
    notes = []
    if tokenizer is None:
        notes.append("no tokenizer found: random tokens from the whole vocabulary, no special-token frame")
    names = list(HF_DETECTORS)
    if kind == "causal_lm" and _reads_ov(model):
        names.append("copying")
    batch = repeat_batch(model, tokenizer, detection.batch_size, length, seed + 1)
    scores = score_heads(model, batch, names)
    null = null_distribution(model, batch, names, n_models=detection.n_null, seed=seed + 10_000)
    if kind == "causal_lm" and ablate:
        eval_batch = repeat_batch(model, tokenizer, detection.eval_batch_size, length, seed + 2)
        other = repeat_batch(model, tokenizer, detection.eval_batch_size, length, seed + 3)
        result = ablation_effects(model, eval_batch, detection.ablation, other)
        table = role_table(scores, null, result, detection.n_sigma, detection.effect_sigma, None, detection.min_effect)
        notes.append(f"{detection.ablation} ablation on the repeated part's next-token loss (functional column)")
    else:
        table = _detection_table(scores, null, detection.n_sigma)
        why = "an encoder has no next-token task loss" if kind == "encoder" else "--ablate false"
        notes.append(f"detection only, no ablation ({why})")
    n_layers, n_heads = next(iter(scores.values())).shape
    name = spec if not Path(spec).exists() else Path(spec).resolve().name
    return ModelHeads(name, kind, int(n_layers), int(n_heads), table, spec, None, notes)


# --------------------------------------------------------------------------------------------------------------
# outputs


def _unique_names(models: list[ModelHeads]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        count = seen.get(m.name, 0)
        seen[m.name] = count + 1
        if count:
            m.name = f"{m.name}#{count + 1}"


def _summary_rows(name: str, rows: pd.DataFrame, scored: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "model": name,
            "stage": s,
            "stage_name": STAGE_NAMES[s],
            "scored": s in scored,
            **depth_stats(rows.loc[rows["stage"] == s, "relative_depth"]),
        }
        for s in STAGE_ORDER
    ]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(stats: dict[str, Any], scored: bool) -> str:
    if not scored:
        return "n/s"
    return "-" if stats["n"] == 0 else f"{stats['mean']:.2f} (n={stats['n']})"


def _print_table(entries: list[dict[str, Any]], groups: dict[str, dict[str, Any]]) -> list[str]:
    header = ["model", "kind", "L", *(f"{s} depth" for s in STAGE_ORDER), "rho", "monotone", "holds"]
    body = []
    for e in entries:
        order = e["ordering"]
        cells = [_cell(e["stages"][s], s in e["scored_stages"]) for s in STAGE_ORDER]
        layers = str(e["n_layers"]) if e["n_layers"] is not None else "-"
        body.append(
            [e["model"], e["kind"], layers, *cells, _fmt(order["rho"]), str(order["monotone"]), str(order["holds"])]
        )
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("depth = mean relative depth (layer + 0.5) / L of the detected heads; n/s = no detector of that stage")
    for e in entries:
        if e["notes"]:
            lines.append(f"  {e['model']}: {'; '.join(e['notes'])}")
    for e in entries:
        o = e["ordering"]
        lines.append(
            f"stages: {e['model']} ordering rho={_fmt(o['rho'], 3)} p={_fmt(o['p_value'], 3)} n={o['n']} "
            f"monotone={o['monotone']} holds={o['holds']} significant={o['significant']}"
        )
    for name, g in groups.items():
        frac = _fmt(g["fraction_holds"], 3)
        lines.append(f"stages: {name} seeds holding={g['n_holds']}/{g['n_testable']} fraction={frac} of {g['n_seeds']}")
    return lines


def plot_stage_map(rows: pd.DataFrame, entries: list[dict[str, Any]], path: Path) -> Path:
    """One panel per model: detected heads by relative depth (x), one band per stage (y), coloured by role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r in STAGES if r in set(rows["role"])] + sorted(set(rows["role"]) - set(STAGES))
    colours = {role: plt.get_cmap("tab10")(i % 10) for i, role in enumerate(roles)}
    n = max(len(entries), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows + 0.6), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, entry in zip(axes.flat, entries):
        mine = rows[rows["model"] == entry["model"]]
        for s_index, stage in enumerate(STAGE_ORDER):
            stage_roles = [r for r in roles if (mine.loc[mine["stage"] == stage, "role"] == r).any()]
            for k, role in enumerate(stage_roles):
                offset = (k - (len(stage_roles) - 1) / 2) * 0.18
                counts = mine[(mine["stage"] == stage) & (mine["role"] == role)].groupby("relative_depth").size()
                ax.scatter(
                    counts.index,
                    np.full(len(counts), s_index + offset),
                    s=18 + 14 * counts.to_numpy(),
                    color=colours[role],
                    alpha=0.8,
                    edgecolors="none",
                )
            mean = entry["stages"][stage]["mean"]
            if mean is not None:
                ax.plot([mean, mean], [s_index - 0.35, s_index + 0.35], color="black", lw=1.5)
        order = entry["ordering"]
        ax.set_title(f"{entry['model']}\nrho={_fmt(order['rho'])} holds={order['holds']}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("relative depth (layer + 0.5) / L")
        ax.set_yticks(range(len(STAGE_ORDER)), STAGE_ORDER)
        ax.set_ylim(-0.6, len(STAGE_ORDER) - 0.4)
        ax.grid(axis="x", alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=colours[r], label=f"{r} ({STAGES.get(r, '?')})") for r in roles
    ]
    handles.append(plt.Line2D([], [], color="black", label="stage mean"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    fig.suptitle("detected heads by stage and relative depth (marker size: heads at that depth)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * (len(handles) > 5), 1, 0.96))

    def save(handle) -> None:
        fig.savefig(handle, format="png", dpi=110)

    atomic_write(path, save)
    plt.close(fig)
    return path


def _entry(name: str, kind: str, n_layers: int | None, rows: pd.DataFrame, scored: list[str], notes, extra=None):
    return {
        "model": name,
        "kind": kind,
        "n_layers": n_layers,
        "scored_stages": scored,
        "n_detected": len(rows),
        "stages": {s: depth_stats(rows.loc[rows["stage"] == s, "relative_depth"]) for s in STAGE_ORDER},
        "ordering": ordering_test(rows),
        "notes": list(notes),
        **(extra or {}),
    }


def stages(
    toy_runs: list[Path] | None = None,
    models: list[str] | None = None,
    out: Path = Path("runs/stages"),
    stage_map: dict[str, str] | None = None,
    detection: DetectConfig = DetectConfig(),  # noqa: B008
    length: int = 64,
    ablate: bool = True,
    seed: int = 0,
) -> Path:
    """Toy vs real: tag every detected head with the survey's stage (KR, ICI, LR, EP) and test shallow-to-deep.

    Lists on the command line are JSON-like: --toy_runs '[runs/toy, runs/many/seed-*]' --models '[minilm, gpt2]'
    (or one item at a time: --toy_runs+ runs/toy --models+ minilm).

    Args:
        toy_runs: finished toy run directories (written by `train.py toy --out DIR`), glob patterns such as
            runs/toy/seed-* (quoted; expanded here), or a parent whose seed-* subdirectories are runs (what
            `toy --seeds N` writes). Seeds of one parent are also pooled, and the fraction of seeds where the
            ordering holds is reported.
        models: Hugging Face models: hub ids (cached, offline), local save_pretrained directories, or `minilm` for
            the built-in all-MiniLM-L6-v2 encoder. Encoders are scored without ablation (no next-token loss).
        out: output directory (stages.csv, stage_depths.csv, stage_map.png, summary.json, config.yaml).
        stage_map: role -> stage overrides, e.g. '{"name_mover": "ICI"}' (stages: KR, ICI, LR, EP).
        detection: null distribution (n_null, n_sigma), batch sizes and the ablation used for causal LMs; n_sigma
            also re-thresholds the toy runs' heads (from their null_mean and null_std columns).
        length: tokens of random text per sequence in the Hugging Face models' repeated-segment batch (capped by
            the model's context).
        ablate: mean-ablate each head of a causal LM on the repeated part's next-token loss (the functional column).
        seed: seed of the Hugging Face models' batches and null initialisations.

    Returns:
        The output directory.
    """
    started = time.perf_counter()
    stage_of = stage_table(stage_map)
    if not toy_runs and not models:
        raise HeadlabError("nothing to compare: pass --toy_runs '[DIR, ...]' and/or --models '[minilm, ...]'")
    run_dirs = resolve_toy_runs(list(toy_runs or []))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "toy_runs": [str(p) for p in toy_runs or []],
        "models": list(models or []),
        "out": str(out),
        "stage_map": dict(stage_map or {}),
        "detection": detection,
        "length": length,
        "ablate": ablate,
        "seed": seed,
    }
    save_config(out, config)

    heads = [load_toy_run(d, detection.n_sigma) for d in run_dirs]
    heads += [map_hf_model(spec, detection, length, seed, ablate) for spec in models or []]
    _unique_names(heads)
    per_model = [m.detected_rows(stage_of) for m in heads]
    rows = pd.concat(per_model, ignore_index=True) if per_model else pd.DataFrame(columns=ROW_COLUMNS)

    entries, summary_rows = [], []
    for m, mine in zip(heads, per_model):
        scored = m.scored_stages(stage_of)
        entries.append(_entry(m.name, m.kind, m.n_layers, mine, scored, m.notes, {"source": m.source}))
        summary_rows += _summary_rows(m.name, mine, scored)
    groups: dict[str, dict[str, Any]] = {}
    pooled_entries = []
    for group in dict.fromkeys(m.group for m in heads if m.group):
        members = [(m, e) for m, e in zip(heads, entries) if m.group == group]
        if len(members) < 2:
            continue
        pooled = pd.concat([rows[rows["model"] == m.name] for m, _ in members], ignore_index=True)
        scored = sorted({s for m, _ in members for s in m.scored_stages(stage_of)}, key=STAGE_ORDER.index)
        label = f"{group} (pooled, {len(members)} seeds)"
        verdicts = [e["ordering"]["holds"] for _, e in members]
        testable = [v for v in verdicts if v is not None]
        groups[group] = {
            "seeds": [m.name for m, _ in members],
            "n_seeds": len(members),
            "n_testable": len(testable),
            "n_holds": sum(testable),
            "fraction_holds": sum(testable) / len(testable) if testable else None,
        }
        pooled_entries.append(_entry(label, "toy (pooled)", None, pooled, scored, [], {"group": group}))
        summary_rows += _summary_rows(label, pooled, scored)
    all_entries = entries + pooled_entries

    atomic_write_text(out / "stages.csv", rows.to_csv(index=False))
    atomic_write_text(out / "stage_depths.csv", pd.DataFrame(summary_rows).to_csv(index=False))
    plot_stage_map(rows, entries, out / "stage_map.png")
    summary = {
        "stage_map": stage_of,
        "stage_order": list(STAGE_ORDER),
        "relative_depth": "(layer + 0.5) / n_layers",
        "models": all_entries,
        "toy_groups": groups,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "summary.json", to_plain(summary))
    for line in [f"run: {out}", *_print_table(all_entries, groups)]:
        print(line, flush=True)
    return out
