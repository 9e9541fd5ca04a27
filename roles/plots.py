"""The layer x head role map: every functional head coloured and labelled with its role and score."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from headlab.runs import save_figure
from roles.table import RoleTable


def plot_role_map(table: RoleTable, path: Path, title: str = "") -> Path:
    """Layer x head grid; each functional head (:meth:`RoleTable.head_roles`) is coloured and labelled."""
    frame, roles = table.frame, table.head_roles()
    n_layers, n_heads = table.shape
    names = sorted(set(frame["role"]))
    grid = np.full((n_layers, n_heads), np.nan)
    for (layer, head), role in roles.items():
        grid[layer, head] = names.index(role)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * n_heads + 2), max(2.5, 0.7 * n_layers + 1.5)))
    cmap = plt.get_cmap("tab10", max(len(names), 1))
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
    for (layer, head), role in roles.items():
        row = frame[(frame["layer"] == layer) & (frame["head"] == head) & (frame["role"] == role)].iloc[0]
        ax.text(head, layer, f"{role}\n{row['score']:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "functional heads (detected and causally validated)")
    return save_figure(fig, path)
