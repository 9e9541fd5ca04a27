"""Pictures of a toy run: head scores over training, the loss with its phase change, the layer x head role map."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from toymodels.emergence import Snapshot


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_scores_over_steps(history: list[Snapshot], thresholds: dict[str, float], path: Path) -> Path:
    """One panel per role: every head's score against the training step (log-x), with the null threshold."""
    roles = [r for r in history[-1].scores if r in thresholds]
    cols = min(3, len(roles))
    rows = -(-len(roles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = np.array([max(s.step, 1) for s in history])
    for ax, role in zip(axes.flat, roles):
        series = np.stack([s.scores[role].numpy() for s in history])  # [steps, L, H]
        for layer in range(series.shape[1]):
            for head in range(series.shape[2]):
                ax.plot(steps, series[:, layer, head], lw=1, label=f"L{layer}H{head}")
        ax.axhline(thresholds[role], color="k", ls="--", lw=1, label="null threshold")
        ax.set_xscale("log")
        ax.set_title(role)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(roles) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.suptitle("detector score per head over training")
    fig.tight_layout()
    return _save(fig, path)


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
    return _save(fig, path)


def plot_role_map(table: pd.DataFrame, roles: dict[tuple[int, int], str], path: Path, title: str = "") -> Path:
    """Layer x head grid; each functional head is coloured and labelled with its role and score."""
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    names = sorted(set(table["role"]))
    grid = np.full((n_layers, n_heads), np.nan)
    for (layer, head), role in roles.items():
        grid[layer, head] = names.index(role)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * n_heads + 2), max(2.5, 0.7 * n_layers + 1.5)))
    cmap = plt.get_cmap("tab10", max(len(names), 1))
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
    for (layer, head), role in roles.items():
        row = table[(table["layer"] == layer) & (table["head"] == head) & (table["role"] == role)].iloc[0]
        ax.text(head, layer, f"{role}\n{row['score']:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "functional heads (detected and causally validated)")
    return _save(fig, path)
