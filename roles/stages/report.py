"""The stage map's report: one :class:`StageEntry` per model (or pooled toy group), the printed table and verdict
lines, ``stage_depths.csv`` rows and ``stage_map.png``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headlab.runs import save_figure
from roles.stages.statistics import depth_stats, ordering_test
from roles.stages.taxonomy import STAGE_NAMES, STAGE_ORDER, STAGES
from roles.stages.types import TYPE_COLUMNS, type_tests


@dataclass
class StageEntry:
    """One model's (or pooled toy group's) detected heads by stage, and the ordering test on them."""

    model: str
    kind: str
    n_layers: int | None
    scored_stages: list[str]
    n_detected: int
    stages: dict[str, dict[str, Any]]  # stage -> depth_stats
    ordering: dict[str, Any]  # ordering_test
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    group: str | None = None

    stage_passed: dict[str, bool] = field(default_factory=dict)  # stage -> whether any head was detected
    ordering_without_attribution: dict[str, Any] | None = None  # attribution favours late heads: the test without it
    extra: dict[str, Any] = field(default_factory=dict)  # a real model's group and steering checks
    types: dict[str, Any] = field(default_factory=dict)  # variant -> the type-level test (roles.stages.types)
    type_rows: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TYPE_COLUMNS), repr=False)

    @classmethod
    def of(cls, name: str, kind: str, n_layers: int | None, rows: pd.DataFrame, scored: list[str],
           notes: list[str], source: str | None = None, group: str | None = None,
           extra: dict[str, Any] | None = None, alpha: float = 0.05) -> StageEntry:
        """``rows``: every scored (head, role) with ``stage``, ``relative_depth``, ``detected`` and ``method``; the
        depths and the ordering tests (over heads, and over head types at ``alpha``) use the detected ones."""
        hits = rows[rows["detected"].astype(bool)] if len(rows) else rows
        stages = {s: depth_stats(hits.loc[hits["stage"] == s, "relative_depth"]) for s in STAGE_ORDER}
        passed = {s: bool((hits["stage"] == s).any()) for s in scored}
        without = None
        if "method" in hits and (hits["method"] == "attribution").any():
            without = ordering_test(hits[hits["method"] != "attribution"])
        type_rows, types = type_tests(rows, name, alpha)
        return cls(name, kind, n_layers, scored, len(hits), stages, ordering_test(hits), list(notes), source, group,
                   passed, without, dict(extra or {}), types, type_rows)

    def depth_rows(self) -> list[dict[str, Any]]:
        """This entry's rows of ``stage_depths.csv``: one per stage."""
        return [{"model": self.model, "stage": s, "stage_name": STAGE_NAMES[s], "scored": s in self.scored_stages,
                 **self.stages[s]} for s in STAGE_ORDER]

    def as_dict(self) -> dict[str, Any]:
        """The model's entry of ``summary.json``: the ordering test's headline (``rho``, ``rho_ci``, ``holds``) on
        top, then everything else."""
        out = {k: v for k, v in asdict(self).items() if k != "type_rows"}
        typed = self.types.get("all", {})
        head = {"model": self.model, "type_verdict": typed.get("verdict"), "type_tau": typed.get("tau"),
                "type_perm_p": typed.get("perm_p"), "type_min_p": typed.get("min_p"), "rho": self.ordering["rho"],
                "rho_ci": self.ordering["rho_ci"], "holds": self.ordering["holds"]}
        return {**head, **{k: v for k, v in out.items() if v is not None or k == "n_layers"}}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(stats: dict[str, Any], scored: bool) -> str:
    if not scored:
        return "n/s"
    return "-" if stats["n"] == 0 else f"{stats['mean']:.2f} (n={stats['n']})"


def report_lines(entries: list[StageEntry], groups: dict[str, dict[str, Any]]) -> list[str]:
    """The printed table (mean depth per stage), notes, and one ``stages: MODEL ordering ...`` line per entry."""
    header = ["model", "kind", "L", *(f"{s} depth" for s in STAGE_ORDER), "rho", "monotone", "holds"]
    body = []
    for e in entries:
        order = e.ordering
        cells = [_cell(e.stages[s], s in e.scored_stages) for s in STAGE_ORDER]
        layers = str(e.n_layers) if e.n_layers is not None else "-"
        body.append([e.model, e.kind, layers, *cells, _fmt(order["rho"]), str(order["monotone"]), str(order["holds"])])
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("depth = mean relative depth (layer + 0.5) / L of the detected heads; n/s = no detector of that stage")
    lines += [f"  {e.model}: {'; '.join(e.notes)}" for e in entries if e.notes]
    for e in entries:
        o = e.ordering
        lines.append(
            f"stages: {e.model} ordering rho={_fmt(o['rho'], 3)} p={_fmt(o['p_value'], 3)} n={o['n']} "
            f"monotone={o['monotone']} holds={o['holds']} significant={o['significant']}"
        )
    for e in entries:
        t = e.types.get("all")
        if t is not None:
            lines.append(f"stages: {e.model} types={t['n_types']} tau={_fmt(t['tau'], 3)} "
                         f"perm_p={_fmt(t['perm_p'], 4)} min_p={_fmt(t['min_p'], 4)} verdict={t['verdict']}")
    for name, g in groups.items():
        frac = _fmt(g["fraction_holds"], 3)
        lines.append(f"stages: {name} seeds holding={g['n_holds']}/{g['n_testable']} fraction={frac} of {g['n_seeds']}")
    return lines


def plot_stage_map(rows: pd.DataFrame, entries: list[StageEntry], path: Path) -> Path:
    """One panel per model: detected heads by relative depth (x), one band per stage (y), coloured by role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r in STAGES if r in set(rows["role"])] + sorted(set(rows["role"]) - set(STAGES))
    colours = {role: plt.get_cmap("tab10")(i % 10) for i, role in enumerate(roles)}
    n = max(len(entries), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows + 0.6), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, entry in zip(axes.flat, entries):
        mine = rows[rows["model"] == entry.model]
        for s_index, stage in enumerate(STAGE_ORDER):
            stage_roles = [r for r in roles if (mine.loc[mine["stage"] == stage, "role"] == r).any()]
            for k, role in enumerate(stage_roles):
                offset = (k - (len(stage_roles) - 1) / 2) * 0.18
                counts = mine[(mine["stage"] == stage) & (mine["role"] == role)].groupby("relative_depth").size()
                ax.scatter(
                    counts.index,
                    np.full(len(counts), s_index + offset),
                    s=18 + 14 * counts.to_numpy(),
                    color=colours[role],
                    alpha=0.8,
                    edgecolors="none",
                )
            mean = entry.stages[stage]["mean"]
            if mean is not None:
                ax.plot([mean, mean], [s_index - 0.35, s_index + 0.35], color="black", lw=1.5)
        order = entry.ordering
        ax.set_title(f"{entry.model}\nrho={_fmt(order['rho'])} holds={order['holds']}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("relative depth (layer + 0.5) / L")
        ax.set_yticks(range(len(STAGE_ORDER)), STAGE_ORDER)
        ax.set_ylim(-0.6, len(STAGE_ORDER) - 0.4)
        ax.grid(axis="x", alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=colours[r], label=f"{r} ({STAGES.get(r, '?')})") for r in roles
    ]
    handles.append(plt.Line2D([], [], color="black", label="stage mean"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    fig.suptitle("detected heads by stage and relative depth (marker size: heads at that depth)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * (len(handles) > 5), 1, 0.96))
    return save_figure(fig, path)
