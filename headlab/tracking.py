"""Experiment tracking: a Lightning logger for the run directory, W&B offline unless an account is configured.

Local files (config, CSV/JSON metrics, PNG plots) are always written by the commands themselves; W&B is an extra
view of the same numbers. ``--logger wandb`` (default) writes an offline W&B run under ``RUN/wandb`` when no
account is configured (sync later with ``wandb sync RUN/wandb/offline-run-*``), ``csv`` writes Lightning's CSV
log only, ``none`` disables logging.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal

from headlab.runs import to_plain, wandb_mode

LoggerKind = Literal["wandb", "csv", "none"]

# The Optuna trial of the run in progress (None outside a sweep): training loops report to it for pruning.
current_trial: contextvars.ContextVar[Any] = contextvars.ContextVar("headlab_current_trial", default=None)


def make_logger(
    kind: LoggerKind,
    run_dir: str | Path,
    *,
    name: str | None = None,
    group: str | None = None,
    project: str | None = None,
    config: dict[str, Any] | None = None,
    tags: list[str] | None = None,
):
    """A Lightning logger writing into ``run_dir`` (or ``False`` for ``none``). Inside a sweep the W&B run joins
    the sweep's group (``WANDB_RUN_GROUP``, set per trial) instead of ``group``."""
    run_dir = Path(run_dir)
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="lightning_logs", version="")
    if kind != "wandb":
        raise ValueError(f"unknown logger {kind!r}; use wandb, csv or none")
    from lightning.pytorch.loggers import WandbLogger

    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    # log_model stays False: W&B raises when offline mode meets log_model; artifacts are logged explicitly.
    return WandbLogger(
        project=project or os.environ.get("WANDB_PROJECT", "headlab"),
        name=name or run_dir.name,
        group=os.environ.get("WANDB_RUN_GROUP") or group,
        save_dir=str(run_dir),
        mode=wandb_mode(),
        config=to_plain(config or {}),
        tags=tags,
        log_model=False,
    )


def finish(logger) -> None:
    """Close a W&B run so the next in-process run starts a fresh one (needed between sweep trials)."""
    if logger and type(logger).__name__ == "WandbLogger":
        finish_wandb()


def finish_wandb() -> None:
    """Close the current W&B run, if any (``wandb.finish()``), without importing wandb when unused."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def quiet_libraries() -> None:
    """Keep the terminal for headlab's own lines: Lightning's per-Trainer banners (accelerator, tips, "max_steps
    reached"), one of its deprecation warnings and the progress bars of ``save_pretrained`` say nothing a headlab
    user needs. Idempotent; call it after Lightning is imported (its import resets its loggers to INFO)."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class PruningCallback:
    """A Lightning callback that reports ``monitor`` to the current Optuna trial every ``every_n_steps`` training
    steps (and after each validation) and stops the run when the pruner says so. ``mode`` says whether the
    monitored value is better high (``max``) or low (``min``); it is sign-flipped when the study optimises the
    other way, so a sweep maximising accuracy can prune on training loss. Does nothing outside a sweep."""

    def __new__(cls, monitor: str, mode: Literal["min", "max"] = "min", every_n_steps: int = 100):
        from lightning.pytorch.callbacks import Callback

        class _Pruning(Callback):
            def _report(self, trainer) -> None:
                trial = current_trial.get()
                value = trainer.callback_metrics.get(monitor)
                if trial is None or value is None or trainer.sanity_checking:
                    return
                import optuna

                maximize = trial.study.direction == optuna.study.StudyDirection.MAXIMIZE
                value = float(value)
                trial.report(value if (mode == "max") == maximize else -value, step=trainer.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {trainer.global_step} ({monitor}={value:.4g})")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if trainer.global_step and trainer.global_step % every_n_steps == 0:
                    self._report(trainer)

            def on_validation_end(self, trainer, pl_module) -> None:
                self._report(trainer)

        return _Pruning()


def sweep_callbacks(monitor: str, mode: Literal["min", "max"] = "min") -> list:
    """Callbacks a training command adds so that sweeps can prune it: empty outside a sweep."""
    if current_trial.get() is None:
        return []
    return [PruningCallback(monitor, mode)]
