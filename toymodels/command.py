"""The ``toy`` command: train a toy transformer on a synthetic task and map its head functions.

``python train.py toy --task induction --out runs/toy`` writes into ``runs/toy``: ``model/`` (``save_pretrained``),
``roles.csv`` (see :mod:`roles.table`), ``scores.csv`` (every head's scores at every tracked step),
``ablations.csv``, ``eval_curve.csv``, ``metrics.json``, ``config.yaml`` and the plots ``scores_over_steps.png``,
``loss.png``, ``role_map.png`` (plus the W&B run under ``wandb/`` with ``--logger wandb``). With ``--seeds N`` it
trains N seeds into ``OUT/seed-S`` and writes the re-emergence report (:mod:`toymodels.seeds`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headlab.errors import HeadlabError
from headlab.runs import run_directory, to_plain
from headlab.tracking import LoggerKind
from roles.mapping import DetectConfig
from toymodels.run import RunConfig, train_single
from toymodels.training import ToyConfig, TrainConfig


def toy(
    task: str = "induction",
    task_options: dict[str, Any] | None = None,
    out: Path = Path("runs/toy"),
    model: ToyConfig = ToyConfig(),  # noqa: B008
    train: TrainConfig = TrainConfig(),  # noqa: B008
    detection: DetectConfig = DetectConfig(),  # noqa: B008
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
    config = RunConfig(task, to_plain(task_options or {}), str(out), model, train, detection, logger, seed, seeds,
                       stack_seeds)
    the_task = config.make_task()
    if seeds > 1:
        from toymodels.seeds import train_seeds

        with run_directory(out, "toy"):
            return train_seeds(the_task, config)
    train_single(the_task, config, report=True)
    return Path(out)
