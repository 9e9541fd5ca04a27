"""Experiment tracking: a Lightning logger for the run directory, W&B offline unless an account is configured.

Local files (config, CSV/JSON metrics, PNG plots) are always written by the commands themselves; W&B is an extra
view of the same numbers. ``--logger wandb`` (default) writes an offline W&B run under ``RUN/wandb`` when no
account is configured (sync later with ``wandb sync RUN/wandb/offline-run-*``), ``csv`` writes Lightning's CSV
log only, ``none`` disables logging.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from headlab.runs import to_plain, wandb_mode

LoggerKind = Literal["wandb", "csv", "none"]


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
    """A Lightning logger writing into ``run_dir`` (or ``False`` for ``none``)."""
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
        group=group,
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
