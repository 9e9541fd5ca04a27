"""The probe run's outputs: heads.csv, summary.json, heatmap.png, directions.safetensors, and the W&B view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headlab.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, save_figure, to_plain
from probes.data import ProbeProblem, describe
from probes.evaluate import rank_column, top_heads
from probes.mass_mean import MassMean
from probes.metrics import primary_metric
from probes.newton import HeadFits
from probes.trust import assess


def write_heads(run: Path, frame: pd.DataFrame) -> Path:
    path = run / "heads.csv"
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))
    return path


def summary(frame: pd.DataFrame, problem: ProbeProblem, top_k: int, metric: str, settings: dict[str, Any],
            seconds: float) -> dict[str, Any]:
    """summary.json: the top-k heads (chosen on validation, scored on test, with intervals) and the settings."""
    trust = assess(problem)
    columns = [c for c in frame.columns if c not in {"converged", "iterations", "degenerate_dims"}]
    top = top_heads(frame, top_k)[columns]
    out: dict[str, Any] = {
        "problem": describe(problem),
        "ranked_by": rank_column(frame, problem.kind),
        "reported_on": "test",
        "metric": metric,
        "top_heads": json.loads(top.to_json(orient="records")),
        "heads": len(frame),
        f"mean_{metric}": float(frame[metric].mean()),
        f"max_{metric}": float(frame[metric].max()),
        "not_converged": int((~frame["converged"]).sum()),
        "trusted": trust.trusted,
        "warnings": trust.warnings,
        "seconds": round(seconds, 3),
        "settings": to_plain(settings),
    }
    if "p_value_bh" in frame:
        out["significant_heads_fdr_0.05"] = int((frame["p_value_bh"] < 0.05).sum())
    if "selectivity" in frame:
        out["top_mean_selectivity"] = float(top["selectivity"].mean())
    if "degenerate_dims" in frame:
        flat = frame[frame["degenerate_dims"] > 0]
        out["degenerate_heads"] = [{"layer": int(r.layer), "head": int(r.head), "dims": int(r.degenerate_dims)}
                                   for r in flat.itertuples()]
    return out


def plot_heatmap(path: Path, frame: pd.DataFrame, n_layers: int, n_heads: int, layers: list[int], metric: str,
                 top: pd.DataFrame, title: str) -> Path:
    """Layer x head heatmap of the test metric, the top heads (ranked on validation) outlined. Cell values are
    written in the cells up to 16 x 16 heads; the figure grows with the grid so 32 x 32 stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = frame[metric].to_numpy().reshape(n_layers, n_heads)  # [layers, heads]
    width = min(22.0, 3.0 + 0.42 * n_heads)
    height = min(20.0, 2.0 + 0.36 * n_layers)
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    vmin = 0.5 if metric in {"accuracy", "auroc"} and np.nanmin(grid) >= 0.4 else float(np.nanmin(grid))
    image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=float(np.nanmax(grid)), aspect="auto",
                      interpolation="nearest")
    step_h = 1 if n_heads <= 16 else 2
    step_l = 1 if n_layers <= 16 else 2
    ax.set_xticks(np.arange(0, n_heads, step_h))
    ax.set_yticks(np.arange(0, n_layers, step_l))
    ax.set_yticklabels([layers[i] for i in range(0, n_layers, step_l)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if n_layers * n_heads <= 256:
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < (vmin + np.nanmax(grid)) / 2 else "black")
    position = {layer: i for i, layer in enumerate(layers)}
    for rank, (_, row) in enumerate(top.iterrows(), start=1):
        i, j = position[int(row["layer"])], int(row["head"])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
        ax.text(j + 0.45, i - 0.45, str(rank), ha="right", va="top", fontsize=6, color="red")
    fig.colorbar(image, ax=ax, label=f"test {metric}", fraction=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_directions(path: Path, fits: HeadFits, mass: MassMean | None, problem: ProbeProblem, layers: list[int],
                    n_heads: int) -> Path:
    """directions.safetensors: per head (``[layers, heads, ...]``) the task probe's raw-space weights and bias, and
    the mass-mean unit directions with their norms and the activations' std along them."""
    from safetensors.numpy import save

    n_layers = len(layers)
    f = problem.report_fit
    tensors = {
        "probe_weight": fits.weight[f].reshape(n_layers, n_heads, *fits.weight.shape[2:]),  # [L, H, d, out]
        "probe_bias": fits.bias[f].reshape(n_layers, n_heads, -1),  # [L, H, out]
    }
    if mass is not None:
        tensors["mass_mean_direction"] = mass.direction.reshape(n_layers, n_heads, *mass.direction.shape[1:])
        tensors["mass_mean_norm"] = mass.norm.reshape(n_layers, n_heads, -1)
        tensors["mass_mean_std"] = mass.std.reshape(n_layers, n_heads, -1)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    metadata = {"layers": json.dumps(layers), "n_heads": str(n_heads), "label": problem.label,
                "kind": problem.kind, "classes": json.dumps(to_plain(problem.classes))}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_directions(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a directions.safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def log_to_tracker(logger, frame: pd.DataFrame, scalars: dict[str, float], heatmap: Path, directions: Path,
                   name: str) -> None:
    """Scalars, the heatmap image, the per-head table and the directions artifact (W&B); scalars only (CSV)."""
    if not logger:
        return
    if type(logger).__name__ == "WandbLogger":
        import wandb

        run = logger.experiment
        run.log({**scalars, "heatmap": wandb.Image(str(heatmap)), "heads": wandb.Table(dataframe=frame)})
        artifact = wandb.Artifact(f"{name}-directions", type="probe-directions")
        artifact.add_file(str(directions))
        run.log_artifact(artifact)
    else:
        logger.log_metrics(scalars)
        logger.save()


def write_summary(run: Path, data: dict[str, Any]) -> Path:
    path = run / "summary.json"
    atomic_write_json(path, data)
    return path


def default_metric(problem: ProbeProblem, requested: str | None, frame: pd.DataFrame) -> str:
    """The heatmap/ranking metric: ``requested`` if the table has it, else accuracy or r2."""
    from headlab.errors import HeadlabError

    metric = requested or primary_metric(problem.kind)
    if metric not in frame.columns:
        raise HeadlabError(f"--report.metric {metric!r} is not a column of heads.csv; use one of: "
                           f"{', '.join(c for c in frame.columns if c not in {'layer', 'head'})}")
    return metric
