"""Pictures of a toy run: head scores over training and the loss with its phase change (the role map is
:func:`roles.plots.plot_role_map`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from headlab.runs import save_figure
from toymodels.emergence import Snapshot


def plot_scores_over_steps(history: list[Snapshot], floors: dict[str, float], path: Path) -> Path:
    """One panel per role: every head's score against the training step (log-x), with the role's effect-size floor
    (detection also needs the control test, :mod:`roles.rule`)."""
    roles = [r for r in history[-1].scores if r in floors]
    cols = min(3, len(roles))
    rows = -(-len(roles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = np.array([max(s.step, 1) for s in history])
    for ax, role in zip(axes.flat, roles):
        series = np.stack([s.scores[role].numpy() for s in history])  # [steps, L, H]
        for layer in range(series.shape[1]):
            for head in range(series.shape[2]):
                ax.plot(steps, series[:, layer, head], lw=1, label=f"L{layer}H{head}")
        ax.axhline(floors[role], color="k", ls="--", lw=1, label="floor")
        ax.set_xscale("log")
        ax.set_title(role)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(roles) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.suptitle("detector score per head over training")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss(
    history: list[Snapshot], phase_step: int | None, path: Path, train_log: pd.DataFrame | None = None
) -> Path:
    """The task loss (evaluation batch; training loss if given) against the step, the phase change marked."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if train_log is not None and not train_log.empty:
        ax.plot(train_log["step"], train_log["loss"], color="0.7", lw=1, label="train loss")
    ax.plot([s.step for s in history], [s.eval_loss for s in history], marker=".", label="eval loss (target positions)")
    if phase_step is not None:
        ax.axvline(phase_step, color="r", ls="--", label=f"phase change @ {phase_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    return save_figure(fig, path)
