"""The ``toy`` and ``detect`` commands: train a toy transformer and map its heads; map the heads of any model.

``python train.py toy --task induction --out runs/toy`` writes into ``runs/toy``: ``model/`` (``save_pretrained``),
``roles.csv`` (see :mod:`toymodels.report`), ``scores.csv`` (every head's scores at every tracked step),
``ablations.csv``, ``metrics.json``, ``config.yaml`` and the plots ``scores_over_steps.png``, ``loss.png``,
``role_map.png`` (plus the W&B run under ``wandb/`` with ``--logger wandb``).
``python train.py detect --model PATH_OR_ID --task induction`` runs the detectors, null thresholds and ablations
on a saved toy model or any Hugging Face causal LM.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from torch import nn

from data.tasks import Batch, Task, make_task
from headlab.errors import HeadlabError
from headlab.runs import atomic_write_json, atomic_write_text, save_config, to_plain
from headlab.sweep import sweep_callbacks
from headlab.tracking import LoggerKind, finish, make_logger, quiet_libraries
from toymodels.ablation import (
    AblationKind,
    AblationResult,
    ablation_effects,
    group_effect,
    target_accuracy,
    target_loss,
)
from toymodels.detectors import NullStats, null_distribution, score_heads, use_eager_attention
from toymodels.emergence import EmergenceTracker, emerged_steps, log_linear_schedule, phase_change_step
from toymodels.modeling import ToyTransformer
from toymodels.plots import plot_loss, plot_role_map, plot_scores_over_steps
from toymodels.report import best_head, head_roles, role_table
from toymodels.training import TaskDataModule, ToyConfig, ToyLitModule, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectConfig:
    """How heads are scored, thresholded and causally checked."""

    batch_size: int = 32
    """sequences in the fixed detection batch"""
    n_null: int = 5
    """random initialisations of the architecture forming each detector's null distribution"""
    n_sigma: float = 3.0
    """a head is detected when its score exceeds null_mean + n_sigma * null_std"""
    ablation: AblationKind = "mean"
    """ablation reported in roles.csv: zero, mean or resample (all three go to ablations.csv)"""
    effect_sigma: float = 3.0
    """a detected head is functional when its ablation effect exceeds the mean effect of the role's other heads by
    effect_sigma standard errors"""
    min_effect: float = 0.01
    """and by at least this many nats (a floor for tasks solved to ~0 loss)"""
    pattern_preserving: bool = False
    """freeze every attention pattern to its clean value while ablating (toy models only)"""
    eval_batch_size: int = 128
    """sequences used to measure ablation effects"""


@dataclass
class HeadMap:
    """Result of mapping one model's heads on one task."""

    table: pd.DataFrame
    scores: dict[str, torch.Tensor]
    null: dict[str, NullStats]
    ablations: dict[str, AblationResult]
    group_effect: float  # ablating every head detected for the task's role at once


def map_heads(
    model: nn.Module,
    task: Task,
    cfg: DetectConfig,
    seed: int,
    scores: dict[str, torch.Tensor] | None = None,
    null: dict[str, NullStats] | None = None,
    emerged: dict[tuple[str, int, int], int] | None = None,
) -> HeadMap:
    """Detector scores, null statistics and all three ablations of every head of ``model`` on ``task``."""
    detect_batch = task.detection_batch(cfg.batch_size, seed + 1)
    eval_batch = task.batch(cfg.eval_batch_size, seed + 2, task.eval_split)
    other_batch = task.batch(cfg.eval_batch_size, seed + 3, task.eval_split)
    model.eval()
    scores = scores if scores is not None else score_heads(model, detect_batch)
    null = null if null is not None else null_distribution(model, detect_batch, n_models=cfg.n_null, seed=seed + 10_000)
    ablations = {
        kind: ablation_effects(model, eval_batch, kind, other_batch, pattern_preserving=cfg.pattern_preserving)
        for kind in ("zero", "mean", "resample")
    }
    table = role_table(scores, null, ablations[cfg.ablation], cfg.n_sigma, cfg.effect_sigma, emerged, cfg.min_effect)
    detected = table[(table["role"] == task.role) & table["detected"]]
    heads = [(int(r.layer), int(r.head)) for r in detected.itertuples()]
    joint = group_effect(model, eval_batch, heads, cfg.ablation, other_batch)
    return HeadMap(table, scores, null, ablations, joint)


def _ablation_frame(ablations: dict[str, AblationResult]) -> pd.DataFrame:
    rows = [
        {
            "layer": layer,
            "head": head,
            "ablation": kind,
            "effect": float(result.effect[layer, head]),
            "stderr": float(result.stderr[layer, head]),
        }
        for kind, result in ablations.items()
        for layer in range(result.effect.shape[0])
        for head in range(result.effect.shape[1])
    ]
    return pd.DataFrame(rows)


def _target_summary(head_map: HeadMap, role: str) -> dict[str, Any]:
    """The best head of the task's target role; ``formed`` needs it functional (and in layer >= 1 for induction)."""
    row = best_head(head_map.table, role)
    if row is None:
        return {"role": role, "scored": False, "formed": False}
    table = head_map.table
    candidates = table[(table["role"] == role) & table["functional"]]
    if role == "induction":
        candidates = candidates[candidates["layer"] >= 1]
    return {
        "role": role,
        "scored": True,
        "layer": int(row["layer"]),
        "head": int(row["head"]),
        "score": float(row["score"]),
        "null_mean": float(row["null_mean"]),
        "null_std": float(row["null_std"]),
        "threshold": float(row["threshold"]),
        "ablation_effect": float(row["ablation_effect"]),
        "effect_stderr": float(row["effect_stderr"]),
        "n_detected": int(table[(table["role"] == role) & table["detected"]].shape[0]),
        "group_ablation_effect": head_map.group_effect,
        "effect_reference": float(row["effect_reference"]),
        "emerged_step": None if pd.isna(row["emerged_step"]) else int(row["emerged_step"]),
        "detected": bool(row["detected"]),
        "functional": bool(row["functional"]),
        "formed": not candidates.empty,
    }


@torch.no_grad()
def _split_metrics(model: nn.Module, task: Task, seed: int, n: int) -> dict[str, dict[str, float]]:
    model.eval()
    out = {}
    for split in task.splits:
        batch = task.batch(n, seed + 4, split)
        logits = model(input_ids=batch["input_ids"]).logits
        out[split] = {
            "loss": float(target_loss(logits, batch["targets"])),
            "accuracy": float(target_accuracy(logits, batch["targets"])),
        }
    return out


def _write_map(out: Path, head_map: HeadMap, title: str) -> None:
    atomic_write_text(out / "roles.csv", head_map.table.to_csv(index=False))
    atomic_write_text(out / "ablations.csv", _ablation_frame(head_map.ablations).to_csv(index=False))
    plot_role_map(head_map.table, head_roles(head_map.table), out / "role_map.png", title)


def _print_summary(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)


@dataclass
class SeedRun:
    """One seed's model and fixed measurement inputs, set up exactly as a single ``toy --seed`` run."""

    seed: int
    out: Path
    net: ToyTransformer
    null: dict[str, NullStats]
    tracker: EmergenceTracker  # its thresholds: null_mean + n_sigma * null_std per role


def _setup_seed(
    the_task: Task, config: dict[str, Any], model: ToyConfig, train: TrainConfig, detection: DetectConfig, seed: int
) -> SeedRun:
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config)
    pl.seed_everything(seed, verbose=False)
    task_record = {"name": the_task.name, "options": to_plain(dataclasses.asdict(the_task))}
    net = ToyTransformer(model.hf_config(the_task.vocab_size, the_task.seq_len, headlab_task=task_record))
    detect_batch: Batch = the_task.detection_batch(detection.batch_size, seed + 1)
    eval_batch: Batch = the_task.batch(train.eval_batch_size, seed + 2, the_task.eval_split)
    null = null_distribution(net, detect_batch, n_models=detection.n_null, seed=seed + 10_000)
    thresholds = {role: stats.threshold(detection.n_sigma) for role, stats in null.items()}
    schedule = log_linear_schedule(train.steps, train.track_every)
    return SeedRun(seed, out, net, null, EmergenceTracker(detect_batch, eval_batch, schedule, thresholds))


def _trainer(train: TrainConfig, run_logger, callbacks: list[pl.Callback], out: Path) -> pl.Trainer:
    quiet_libraries()
    return pl.Trainer(
        max_steps=train.steps,
        max_epochs=-1,
        accelerator=train.accelerator,
        devices=1,
        logger=run_logger,
        callbacks=[*callbacks, *sweep_callbacks("train/loss", mode="min")],
        enable_checkpointing=False,
        enable_progress_bar=sys.stdout.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=train.log_every,
        default_root_dir=str(out),
    )


def _finish_seed(
    run: SeedRun,
    the_task: Task,
    detection: DetectConfig,
    train: TrainConfig,
    train_log: list[tuple[int, float]],
    train_seconds: float,
    started: float,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Everything after training: the head map, the files and plots of the run directory, ``metrics.json``.

    Returns the metrics and the role table."""
    out, net, null, seed = run.out, run.net, run.null, run.seed
    net.eval()
    history = run.tracker.history
    emerged = emerged_steps(history, null, detection.n_sigma)
    head_map = map_heads(net, the_task, detection, seed, scores=history[-1].scores, null=null, emerged=emerged)
    steps, losses = [s.step for s in history], [s.eval_loss for s in history]
    phase = phase_change_step(steps, losses)
    target = _target_summary(head_map, the_task.role)
    if target.get("emerged_step") is not None:
        target["emerged_seconds"] = next(s.seconds for s in history if s.step == target["emerged_step"])

    net.save_pretrained(out / "model")
    _write_map(out, head_map, f"{the_task.name}: functional heads")
    score_rows = [
        {"step": snap.step, "role": role, "layer": layer, "head": head, "score": float(values[layer, head])}
        for snap in history
        for role, values in snap.scores.items()
        for layer in range(values.shape[0])
        for head in range(values.shape[1])
    ]
    atomic_write_text(out / "scores.csv", pd.DataFrame(score_rows).to_csv(index=False))
    curve = pd.DataFrame({"step": steps, "eval_loss": losses, "eval_accuracy": [s.eval_accuracy for s in history]})
    atomic_write_text(out / "eval_curve.csv", curve.to_csv(index=False))
    plot_scores_over_steps(history, run.tracker.thresholds, out / "scores_over_steps.png")
    plot_loss(history, phase, out / "loss.png", pd.DataFrame(train_log, columns=["step", "loss"]))
    metrics = {
        "task": the_task.name,
        "seed": seed,
        "target": target,
        "phase_change_step": phase,
        "final_eval": {"loss": losses[-1], "accuracy": history[-1].eval_accuracy},
        "splits": _split_metrics(net, the_task, seed, train.eval_batch_size),
        "clean_loss": head_map.ablations[detection.ablation].clean_loss,
        "steps": train.steps,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "seconds_per_step": train_seconds / max(train.steps, 1),
        **(extra or {}),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics, head_map.table


def toy(
    task: str = "induction",
    task_options: dict[str, Any] | None = None,
    out: Path = Path("runs/toy"),
    model: ToyConfig = ToyConfig(),  # noqa: B008
    train: TrainConfig = TrainConfig(),  # noqa: B008
    detection: DetectConfig = DetectConfig(),
    logger: LoggerKind = "wandb",
    seed: int = 0,
    seeds: int = 1,
    stack_seeds: bool | None = None,
) -> Path:
    """Train a toy transformer on a synthetic task, track which head functions emerge, and map its heads.

    Args:
        task: synthetic task: induction, recall, ioi, successor, icl, iteration or modular_addition.
        task_options: the task's own options, e.g. '{"vocab": 32, "fixed_offset": 32}' (see data.tasks).
        out: run directory (model/, roles.csv, scores.csv, metrics.json, plots, config.yaml); with --seeds N,
            one such directory per seed (OUT/seed-S) plus the re-emergence report in OUT.
        model: toy transformer architecture.
        train: optimisation and tracking schedule.
        detection: detectors, null thresholds and ablation.
        logger: wandb (offline unless an account is configured), csv or none.
        seed: seed of the initialisation, the data stream and the fixed evaluation batches (the first seed with
            --seeds).
        seeds: train this many seeds (seed, seed + 1, ...) and report which head functions re-emerge across them.
        stack_seeds: with --seeds N, train the seeds side by side as one stacked, vmapped model (each seed's result
            is the same as its single run, up to float rounding) instead of one after another. Default: stacked
            when training on an accelerator, where it pays; one after another on a CPU, where it does not.
    Returns:
        The run directory.
    """
    if seeds < 1:
        raise HeadlabError(f"--seeds must be at least 1, got {seeds}")
    the_task = make_task(task, **(task_options or {}))
    config = {
        "task": task,
        "task_options": to_plain(task_options or {}),
        "out": str(out),
        "model": model,
        "train": train,
        "detection": detection,
        "logger": logger,
        "seed": seed,
        "seeds": seeds,
        "stack_seeds": stack_seeds,
    }
    if seeds > 1:
        from toymodels.seeds import train_seeds

        if stack_seeds is None:
            stack_seeds = train.accelerator != "cpu"
        return train_seeds(the_task, config, model, train, detection, logger, seed, seeds, stack_seeds)
    started = time.perf_counter()
    out = Path(out)
    run = _setup_seed(the_task, config, model, train, detection, seed)
    run_logger = make_logger(logger, out, name=f"toy-{task}-s{seed}", group=f"toy-{task}", config=to_plain(config))
    module = ToyLitModule(run.net, train)
    trainer = _trainer(train, run_logger, [run.tracker], out)
    train_started = time.perf_counter()
    trainer.fit(module, datamodule=TaskDataModule(the_task, train.batch_size, seed))
    train_seconds = time.perf_counter() - train_started
    run.net.cpu()
    metrics, table = _finish_seed(run, the_task, detection, train, module.train_log, train_seconds, started)
    _log_to_wandb(run_logger, out, table, metrics)
    finish(run_logger)
    _print_summary(_summary_lines(out, metrics["target"], metrics["phase_change_step"], metrics))
    return out


def _target_line(target: dict[str, Any]) -> str:
    if target.get("scored"):
        return (
            f"target role {target['role']}: best head L{target['layer']}H{target['head']} score "
            f"{target['score']:.3f} (null {target['null_mean']:.3f} +- {target['null_std']:.3f}, threshold "
            f"{target['threshold']:.3f}), ablation effect {target['ablation_effect']:+.3f} +- "
            f"{target['effect_stderr']:.3f} nats (random heads {target['effect_reference']:+.3f}), "
            f"all {target['n_detected']} detected heads ablated together {target['group_ablation_effect']:+.3f}, "
            f"emerged at step {target['emerged_step']}, "
            f"formed={target['formed']}"
        )
    return f"target role {target['role']}: not scored (the task's batch lacks its inputs)"


def _summary_lines(out: Path, target: dict[str, Any], phase: int | None, metrics: dict[str, Any]) -> list[str]:
    return [
        f"run: {out}",
        _target_line(target),
        f"phase change at step {phase}; final eval loss {metrics['final_eval']['loss']:.3f}, "
        f"accuracy {metrics['final_eval']['accuracy']:.3f}; {metrics['total_seconds']:.1f} s",
    ]


def _log_to_wandb(run_logger, out: Path, table: pd.DataFrame, metrics: dict[str, Any]) -> None:
    """The plots as images, the role table as a long-form W&B table, the summary metrics."""
    if not run_logger or type(run_logger).__name__ != "WandbLogger":
        return
    import wandb

    images = {p.stem: wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}
    plain = table.astype({"emerged_step": "float"})
    run_logger.experiment.log({**images, "roles": wandb.Table(dataframe=plain)})
    target = metrics["target"]
    run_logger.experiment.summary.update(
        {f"target/{k}": v for k, v in target.items() if isinstance(v, (int, float, bool, str))}
    )


def _load_model(name: str, revision: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    import toymodels  # noqa: F401  (registers the toy model with the Auto classes)

    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, attn_implementation="eager")
    except OSError as error:
        raise HeadlabError(
            f"cannot load model '{name}': not a save_pretrained directory, and not a Hugging Face hub id reachable "
            f"offline ({str(error).splitlines()[0]}); pass a run's model/ folder or a cached hub id"
        ) from error
    use_eager_attention(model)
    return model.eval()


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
    detection: DetectConfig = DetectConfig(),
    revision: str | None = None,
    seed: int = 0,
) -> Path:
    """Score every head of a saved toy model or Hugging Face causal LM: detectors, null thresholds, ablations.

    Args:
        model: a save_pretrained directory (e.g. runs/toy/model) or a Hugging Face hub id.
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
    net = _load_model(model, revision)
    the_task = _task_for(net, task, task_options)
    if out is None:
        out = Path("runs/detect") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', str(model)).strip('_')}-{task}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": model,
        "task": task,
        "task_options": to_plain(task_options or {}),
        "out": str(out),
        "detection": detection,
        "revision": revision,
        "seed": seed,
    }
    save_config(out, config)
    head_map = map_heads(net, the_task, detection, seed)
    _write_map(out, head_map, f"{Path(str(model)).name} on {task}")
    target = _target_summary(head_map, the_task.role)
    metrics = {
        "model": model,
        "task": task,
        "target": target,
        "clean_loss": head_map.ablations[detection.ablation].clean_loss,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "metrics.json", metrics)
    last = f"clean task loss {metrics['clean_loss']:.3f}; {metrics['seconds']:.1f} s"
    _print_summary([f"run: {out}", _target_line(target), last])
    return out
