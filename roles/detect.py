"""``python train.py detect``: map every head of a saved toy model or any Hugging Face model.

The model loads through :func:`headlab.models.load_model` (eager attention; a toy run's ``model/`` folder or any
Hugging Face model). A toy model is mapped on its task's batches (:func:`roles.mapping.map_heads`), a Hugging Face
model on real-text batches (:mod:`roles.real`). Outputs as in a toy run: ``roles.csv``, ``ablations.csv``,
``metrics.json``, ``role_map.png``, ``config.yaml``.
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
from headlab.placement import Placement
from headlab.runs import atomic_write_json, run_directory, save_config, to_plain
from roles.mapping import Batches, DetectConfig, TargetSummary, map_heads, write_map
from roles.real import REAL_TASKS, map_real_model
from roles.table import RoleTable
from toymodels.circuits import task_circuit


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
    length: int = 64,
    revision: str | None = None,
    seed: int = 0,
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
    offload_folder: Path | None = None,
) -> Path:
    """Map every head of a saved toy model or a Hugging Face model: detectors, controls, verdicts, the causal check.

    Args:
        model: a toy run's model/ folder, a save_pretrained directory, a Hugging Face hub id, ``smollm2`` (the
            built-in SmolLM2-135M-Instruct) or ``minilm`` (the built-in encoder, detection only).
        task: the task whose batches the detectors and ablations use: a toy model's task, or for a Hugging Face
            model ``induction`` (repeated segments of ordinary tokens) or ``ioi`` (the built-in ioi prompts).
        task_options: a toy task's options (default: those the toy model was trained with).
        out: output directory (default runs/detect/<model>-<task>).
        detection: detection rule (floors, alpha), reported null, and the causal check.
        length: tokens per sequence of a Hugging Face model's repeated-segment batch (capped by its context).
        revision: hub revision (branch, tag or commit) of a hub model.
        seed: seed of the detection and evaluation batches and of the null initialisations.
        device_map: spread a Hugging Face model over GPUs, CPU and disk with accelerate (auto, balanced,
            balanced_low_0, sequential) and print where each part went; default: the whole model on one device.
        max_memory: per-device memory for --device_map, e.g. '{"0": "70GiB", "cpu": "200GiB"}'; the rest: disk.
        offload_folder: folder for the weights --device_map offloads to disk.

    Returns:
        The output directory (roles.csv, ablations.csv, metrics.json, role_map.png, config.yaml).
    """
    started = time.perf_counter()
    loaded = load_model(model, head="auto", attn_implementation="eager", revision=revision, need_tokenizer=False,
                        placement=Placement(device_map, max_memory, offload_folder))
    toy = loaded.model.config.model_type == "headlab_toy"
    the_task = _task_for(loaded.model, task, task_options) if toy else None
    if out is None:
        out = Path("runs/detect") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', str(model)).strip('_')}-{task}"
    out = Path(out)
    config = {"model": model, "task": task, "task_options": to_plain(task_options or {}), "out": str(out),
              "detection": detection, "length": length, "revision": revision, "seed": seed,
              "device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    circuit = None
    if toy:
        batches = Batches(the_task.detection_batch(detection.batch_size, seed + 1),
                          the_task.batch(detection.eval_size(toy=True), seed + 2, the_task.eval_split),
                          the_task.batch(detection.eval_size(toy=True), seed + 3, the_task.eval_split))
        circuit = task_circuit(loaded.model, the_task, batches.detect, detection.floors)
        shape = loaded.model.config.num_hidden_layers, loaded.model.config.num_attention_heads
        partners = circuit.partners(*shape) if circuit is not None else None
        head_map = map_heads(loaded.model, batches, the_task.role, detection, seed, partners=partners)
        notes, role = [circuit.line()] if circuit is not None else [], the_task.role
    else:
        real = map_real_model(loaded, task, detection, length, seed)
        head_map, notes, role = real.head_map, real.notes, REAL_TASKS[task]
    target = TargetSummary.of(head_map, role, detection.min_effect)
    if circuit is not None:  # as a toy run judges it: the target also needs its circuit
        target.formed = target.formed and circuit.passed
    ablation = head_map.ablations.get(detection.ablation)
    clean = ablation.clean_loss if ablation else None
    metrics = {"model": model, "task": task, "kind": loaded.kind, "target": target.as_dict(), "clean_loss": clean,
               "detected": _counts(head_map.table, "detected"), "functional": _counts(head_map.table, "functional"),
               "notes": notes, "seconds": time.perf_counter() - started,
               **({"circuit": circuit.as_dict()} if circuit is not None else {})}
    with run_directory(out, "detect"):
        save_config(out, config)
        write_map(out, head_map, f"{Path(str(model)).name} on {task}")
        atomic_write_json(out / "metrics.json", metrics)
    last = f"clean task loss {clean:.3f}" if ablation else "detection only"
    lines = [f"run: {out}", target.line(), *notes, f"detected per role: {metrics['detected']}",
             f"functional per role: {metrics['functional']}", f"{last}; {metrics['seconds']:.1f} s"]
    for line in lines:
        print(line, flush=True)
    return out


def _counts(table: RoleTable, column: str) -> dict[str, int]:
    frame = table.frame
    return {role: int(frame.loc[frame["role"] == role, column].fillna(False).astype(bool).sum())
            for role in dict.fromkeys(frame["role"])}
