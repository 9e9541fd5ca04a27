"""The ``stages`` command: toy vs real, and the survey's four-stage map of head functions by relative depth.

Toy runs and Hugging Face models (:mod:`roles.stages.sources`) side by side: every detected head tagged with its
stage (:mod:`roles.stages.taxonomy`), its relative depth, and the ordering test per model and across the seeds of a
toy group (:mod:`roles.stages.statistics`). The ordering *holds* when at least two stages have detected heads, rho > 0
and the means are monotone; it is untestable (``null``) with fewer than two stages or three observations;
``significant`` adds p < 0.05. Across the seeds of a toy group: the fraction of testable seeds where it holds.

Outputs (``--out``): ``stages.csv`` (one row per model x detected head and role: ``model, layer, head, n_layers,
relative_depth, role, stage, score, floor, control, p_adjusted, functional, kind``), ``stage_depths.csv`` (per
model x stage: count, mean, median, quartiles, min, max of relative depth; pooled toy groups as models named
``GROUP (pooled, N seeds)``),
``stage_types.csv`` (per model x head type with a detected head: ``model, stage, role, n_detected, n_functional,
median_depth, depth_lo, depth_hi``, and the type-level ordering test of :mod:`roles.stages.types`, whose verdict
line ``stages: MODEL types=N tau=T perm_p=P min_p=M verdict=V`` is the survey's claim tested at the level it states
it), ``stage_map.png`` (one panel per model), ``summary.json`` and ``config.yaml``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pandas as pd

from headlab.errors import HeadlabError, at_least
from headlab.placement import Placement
from headlab.runs import atomic_write_json, atomic_write_text, run_directory, save_config, to_plain
from roles.mapping import DetectConfig
from roles.stages.controls import check_entries
from roles.stages.report import StageEntry, plot_stage_map, report_lines
from roles.stages.sources import ROW_COLUMNS, ModelHeads, load_toy_run, map_hf_model, resolve_toy_runs
from roles.stages.taxonomy import SELF_CONTRADICTIONS, STAGE_ORDER, stage_table
from roles.stages.types import TYPE_COLUMNS


def _slug(spec: str) -> str:
    """A folder name for a model spec (its last path part, unsafe characters replaced)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec.rstrip("/")).name or spec).strip("_") or "model"


def _unique_names(models: list[ModelHeads]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        count = seen.get(m.name, 0)
        seen[m.name] = count + 1
        if count:
            m.name = f"{m.name}#{count + 1}"


def _pooled_groups(heads: list[ModelHeads], entries: list[StageEntry], rows: pd.DataFrame,
                   stage_of: dict[str, str]) -> tuple[list[StageEntry], dict[str, dict[str, Any]]]:
    """One pooled entry per toy group of >= 2 seeds, and the fraction of seeds where the ordering holds."""
    groups: dict[str, dict[str, Any]] = {}
    pooled_entries = []
    for group in dict.fromkeys(m.group for m in heads if m.group):
        members = [(m, e) for m, e in zip(heads, entries) if m.group == group]
        if len(members) < 2:
            continue
        pooled = pd.concat([rows[rows["model"] == m.name] for m, _ in members], ignore_index=True)
        scored = sorted({s for m, _ in members for s in m.scored_stages(stage_of)}, key=STAGE_ORDER.index)
        verdicts = [e.ordering["holds"] for _, e in members]
        testable = [v for v in verdicts if v is not None]
        groups[group] = {
            "seeds": [m.name for m, _ in members],
            "n_seeds": len(members),
            "n_testable": len(testable),
            "n_holds": sum(testable),
            "fraction_holds": sum(testable) / len(testable) if testable else None,
        }
        label = f"{group} (pooled, {len(members)} seeds)"
        pooled_entries.append(StageEntry.of(label, "toy (pooled)", None, pooled, scored, [], group=group))
    return pooled_entries, groups


def stages(
    toy_runs: list[Path] | None = None,
    models: list[str] | None = None,
    out: Path = Path("runs/stages"),
    stage_map: dict[str, str] | None = None,
    detection: DetectConfig = DetectConfig(),  # noqa: B008
    length: int = 64,
    ablate: bool = True,
    probe_limit: int | None = None,
    seed: int = 0,
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
    offload_folder: Path | None = None,
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
        out: output directory (stages.csv, stage_depths.csv, stage_map.png, summary.json, config.yaml; the real
            models' truthfulness caches and probe runs in work/MODEL, reused when run again).
        stage_map: role -> stage overrides, e.g. '{"name_mover": "ICI"}' (stages: KR, ICI, LR, EP).
        detection: the detection rule (floors, alpha), reported null, batch sizes and the causal check used for
            Hugging Face causal LMs (toy runs keep the verdicts they were written with).
        length: tokens of random text per sequence in the Hugging Face models' repeated-segment batch (capped by
            the model's context).
        ablate: run the causal checks of a causal LM: ablation (attribution screen, exact confirmation, random heads
            and groups) on each role's task loss, and the truthfulness heads' steering check.
        probe_limit: statements of the capitals set cached and probed for the truthfulness heads (default all 906).
        seed: seed of the Hugging Face models' batches and null initialisations.
        device_map: spread each Hugging Face model over GPUs, CPU and disk with accelerate (auto, balanced,
            balanced_low_0, sequential; its truthfulness cache too) and print where each part went.
        max_memory: per-device memory for --device_map, e.g. '{"0": "70GiB", "cpu": "200GiB"}'; the rest: disk.
        offload_folder: folder for the weights --device_map offloads to disk.

    Returns:
        The output directory.
    """
    started = time.perf_counter()
    stage_of = stage_table(stage_map)
    if not toy_runs and not models:
        raise HeadlabError("nothing to compare: pass --toy_runs '[DIR, ...]' and/or --models '[minilm, ...]'")
    run_dirs = resolve_toy_runs(list(toy_runs or []))
    at_least("length", length, 4)
    placement = Placement(device_map, max_memory, offload_folder)
    out = Path(out)
    config = {"toy_runs": [str(p) for p in toy_runs or []], "models": list(models or []), "out": str(out),
              "stage_map": dict(stage_map or {}), "detection": detection, "length": length, "ablate": ablate,
              "probe_limit": probe_limit, "seed": seed, "device_map": device_map, "max_memory": max_memory,
              "offload_folder": offload_folder}
    heads = [load_toy_run(d) for d in run_dirs]
    with run_directory(out, "stages"):
        heads += [map_hf_model(spec, detection, length, seed, ablate, out / "work" / _slug(spec), probe_limit,
                               placement) for spec in models or []]
        save_config(out, config)
        summary = _write(out, heads, stage_of, started, detection.alpha)
    for line in [f"run: {out}", *report_lines(summary["entries"], summary["toy_groups"])]:
        print(line, flush=True)
    return out


def _write(out: Path, heads: list[ModelHeads], stage_of: dict[str, str], started: float,
           alpha: float = 0.05) -> dict[str, Any]:
    """stages.csv, stage_depths.csv, stage_types.csv, stage_map.png and summary.json; returns the summary with its
    entries."""
    _unique_names(heads)
    per_model = [m.scored_rows(stage_of) for m in heads]
    rows = pd.concat(per_model, ignore_index=True) if per_model else pd.DataFrame(columns=ROW_COLUMNS)
    entries = [StageEntry.of(m.name, m.kind, m.n_layers, mine, m.scored_stages(stage_of), m.notes, m.source,
                             extra=m.extra, alpha=alpha) for m, mine in zip(heads, per_model)]
    pooled_entries, groups = _pooled_groups(heads, entries, rows, stage_of)
    all_entries = entries + pooled_entries

    atomic_write_text(out / "stages.csv", rows.to_csv(index=False))
    depth_rows = [row for e in all_entries for row in e.depth_rows()]
    atomic_write_text(out / "stage_types.csv", pd.concat([e.type_rows for e in all_entries], ignore_index=True)
                      .reindex(columns=TYPE_COLUMNS).to_csv(index=False))
    atomic_write_text(out / "stage_depths.csv", pd.DataFrame(depth_rows).to_csv(index=False))
    plot_stage_map(rows[rows["detected"].astype(bool)], entries, out / "stage_map.png")
    checks = [{"model": e.model, **c} for e in entries
              for c in check_entries(e.extra.get("groups") or {}, e.extra.get("steering"), alpha)]
    summary = {
        "checks": checks,
        "stage_map": stage_of,
        "stage_order": list(STAGE_ORDER),
        "taxonomy_notes": SELF_CONTRADICTIONS,
        "relative_depth": "(layer + 0.5) / n_layers",
        "models": [e.as_dict() for e in all_entries],
        "toy_groups": groups,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "summary.json", to_plain(summary))
    return {**summary, "entries": all_entries}
