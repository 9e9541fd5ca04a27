"""``python train.py detect``: score every head of a saved toy model or any Hugging Face model on a task's batches.

The model loads through :func:`headlab.models.load_model` (eager attention; a toy run's ``model/`` folder or any
Hugging Face model); the task is the one a toy model was trained on, or the one named. Outputs as in a toy run:
``roles.csv``, ``ablations.csv``, ``metrics.json``, ``role_map.png``, ``config.yaml``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from torch import nn

from data.tasks import Task, make_task
from headlab.errors import HeadlabError
from headlab.models import load_model
from headlab.runs import atomic_write_json, run_directory, save_config, to_plain
from roles.mapping import DetectConfig, TargetSummary, map_heads, write_map


def _task_for(model: nn.Module, task: str, task_options: dict[str, Any] | None) -> Task:
    """The task as the model was trained on it (a toy model records it), else sized to the model's vocabulary."""
    config = model.config
    recorded = getattr(config, "headlab_task", None)
    if task_options is None and recorded and recorded.get("name") == task:
        return make_task(task, **recorded["options"])
    options = dict(task_options or {})
    if task == "induction" and "vocab" not in options and not recorded:
        options["vocab"] = int(config.vocab_size)
    the_task = make_task(task, **options)
    if the_task.vocab_size > config.vocab_size:
        raise HeadlabError(
            f"task '{task}' uses {the_task.vocab_size} token ids but the model has only {config.vocab_size}; "
            "pass smaller --task_options"
        )
    n_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n_positions and the_task.seq_len > n_positions:
        raise HeadlabError(
            f"task '{task}' needs {the_task.seq_len} positions but the model has {n_positions}; "
            "pass a shorter length in --task_options"
        )
    return the_task


def detect(
    model: str,
    task: str = "induction",
    task_options: dict[str, Any] | None = None,
    out: Path | None = None,
    detection: DetectConfig = DetectConfig(),  # noqa: B008
    revision: str | None = None,
    seed: int = 0,
) -> Path:
    """Score every head of a saved toy model or Hugging Face causal LM: detectors, null thresholds, ablations.

    Args:
        model: a save_pretrained directory (e.g. runs/toy/model), a Hugging Face hub id, or ``minilm``. Encoders
            get detection only (they have no next-token loss to ablate).
        task: the task whose batches the detectors and ablations use (induction works on any model).
        task_options: the task's options; default: those the toy model was trained with, or for induction on a
            Hugging Face model random tokens from its whole vocabulary.
        out: output directory (default runs/detect/<model>-<task>).
        detection: detectors, null thresholds and ablation.
        revision: hub revision (branch, tag or commit) of a hub model.
        seed: seed of the detection and evaluation batches and of the null initialisations.

    Returns:
        The output directory (roles.csv, ablations.csv, metrics.json, role_map.png, config.yaml).
    """
    started = time.perf_counter()
    loaded = load_model(model, head="auto", attn_implementation="eager", revision=revision, need_tokenizer=False)
    net = loaded.model
    the_task = _task_for(net, task, task_options)
    ablate = loaded.kind == "causal_lm"
    if out is None:
        out = Path("runs/detect") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', str(model)).strip('_')}-{task}"
    out = Path(out)
    config = {"model": model, "task": task, "task_options": to_plain(task_options or {}), "out": str(out),
              "detection": detection, "revision": revision, "seed": seed}
    with run_directory(out, "detect"):
        save_config(out, config)
        head_map = map_heads(net, the_task, detection, seed, ablate=ablate)
        write_map(out, head_map, f"{Path(str(model)).name} on {task}")
        target = TargetSummary.of(head_map, the_task.role)
        clean = head_map.ablations[detection.ablation].clean_loss if ablate else None
        metrics = {"model": model, "task": task, "kind": loaded.kind, "target": target.as_dict(), "clean_loss": clean,
                   "seconds": time.perf_counter() - started}
        atomic_write_json(out / "metrics.json", metrics)
    last = (f"clean task loss {clean:.3f}" if ablate else "an encoder: detection only (no next-token loss)")
    for line in [f"run: {out}", target.line(), f"{last}; {metrics['seconds']:.1f} s"]:
        print(line, flush=True)
    return out
