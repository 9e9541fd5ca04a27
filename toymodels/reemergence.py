"""The re-emergence report: which head functions come back across seeds of one toy architecture, where, and when.

Written by ``toy --seeds N`` into ``OUT`` (``reemergence`` does the same for run directories trained anywhere):

``reemergence.csv``
    one row per role: the fraction of seeds where it was *detected* (a head passes the detection rule of
    :mod:`roles.rule`: effect-size floor and within-head control) and where it *emerged* (a detected head that is
    also functional, i.e. passes the ablation check), the layers its best head sits in, its redundancy (functional
    heads per seed that has it; ``detected_mean``: detected heads per seed) and the spread of its emergence step.
``matching.csv`` / ``slots.csv``
    heads matched across seeds. Heads of one layer are interchangeable (permuting them changes nothing), so each
    seed's heads are matched, layer by layer, to canonical *slots* with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) on the distance between role-score vectors: per head, each role's
    score's effect over its control in units of the role's floor, log-compressed (:func:`role_vectors`). Slot
    centres start at the first
    seed's heads and are re-estimated as the mean of the matched vectors until the matching stops changing.
    ``slots.csv`` gives each slot's most frequent functional role and in how many seeds it holds it.
``reemergence.md``, ``reemergence.png``, ``seeds.json``
    the tables as Markdown, a plot, the summary as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headlab.errors import HeadlabError
from headlab.runs import (
    atomic_write_json,
    atomic_write_text,
    find_runs,
    read_json_object,
    run_directory,
    run_owner,
    save_figure,
    to_plain,
)
from roles.table import RoleTable


@dataclass
class Reemergence:
    roles: pd.DataFrame  # one row per role
    matching: pd.DataFrame  # one row per (seed, layer, head): its slot
    slots: pd.DataFrame  # one row per slot
    summary: dict[str, Any]


def _read_runs(run_dirs: Sequence[Path]) -> list[tuple[int, pd.DataFrame, dict[str, Any]]]:
    runs = []
    for index, run_dir in enumerate(run_dirs):
        run_dir = Path(run_dir)
        roles, metrics = run_dir / "roles.csv", run_dir / "metrics.json"
        if not roles.exists() or not metrics.exists():
            raise HeadlabError(
                f"{run_dir} is not a finished toy run (no roles.csv or metrics.json); pass directories written by "
                "`train.py toy`"
            )
        record = read_json_object(metrics, "rerun the toy run that wrote it")
        runs.append((int(record.get("seed", index)), RoleTable.read(roles).frame, record))
    shapes = {(int(t["layer"].max()) + 1, int(t["head"].max()) + 1) for _, t, _ in runs}
    if len(shapes) > 1:
        raise HeadlabError(f"the runs have different shapes (layers, heads) {sorted(shapes)}; compare one architecture")
    return runs


def role_vectors(table: pd.DataFrame, roles: Sequence[str]) -> np.ndarray:
    """``[layers, heads, roles]`` log-compressed effect sizes ``sign(e) log1p(|e|)``, ``e = (score - control) /
    floor``: how far each head's score sits above its own control, in units of the role's effect-size floor (the
    same ingredients as the verdict of :mod:`roles.rule`, comparable across roles). A missing control counts as 0.
    The random-initialisation null is not used: it is optional (``--detection.n_null 0``) and says only "more
    structured than an untrained head"."""
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    out = np.zeros((n_layers, n_heads, len(roles)))
    for r, role in enumerate(roles):
        rows = table[table["role"] == role]
        effect = (rows["score"] - rows["control"].fillna(0.0)) / rows["floor"].clip(lower=1e-8)
        effect = effect.fillna(0.0).to_numpy()
        out[rows["layer"].to_numpy(), rows["head"].to_numpy(), r] = np.sign(effect) * np.log1p(np.abs(effect))
    return out


def match_heads(vectors: Sequence[np.ndarray], max_iter: int = 10) -> np.ndarray:
    """Hungarian matching of every seed's heads to canonical slots, layer by layer.

    ``vectors``: per seed ``[layers, heads, roles]``. Returns ``assignment`` ``[seeds, layers, slots]``: the head of
    each seed that fills each slot. Centres start at seed 0's heads and are re-estimated as the matched means until
    the assignment stops changing.
    """
    from scipy.optimize import linear_sum_assignment

    stack = np.stack(vectors)  # [S, L, H, R]
    n_seeds, n_layers, n_heads, _ = stack.shape
    assignment = np.tile(np.arange(n_heads), (n_seeds, n_layers, 1))
    centres = stack[0].copy()
    for _ in range(max_iter):
        new = np.empty_like(assignment)
        for s in range(n_seeds):
            for layer in range(n_layers):
                cost = np.linalg.norm(centres[layer][:, None, :] - stack[s, layer][None, :, :], axis=-1)  # slot x head
                slots, heads = linear_sum_assignment(cost)
                new[s, layer, slots] = heads
        matched = np.take_along_axis(stack, new[..., None], axis=2)  # [S, L, slots, R]
        centres = matched.mean(axis=0)
        if np.array_equal(new, assignment):
            break
        assignment = new
    return assignment


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None, "std": None}
    array = np.asarray(values, dtype=float)
    return {
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
    }


def _emergence_steps(runs, role: str) -> list[float]:
    """Per seed where ``role`` emerged: the emergence step of its best (highest-scoring) functional head."""
    steps = []
    for _, table, _ in runs:
        functional = table[(table["role"] == role) & table["functional"].fillna(False).astype(bool)]
        if not functional.empty:
            best = functional.sort_values("score", ascending=False).iloc[0]
            if not pd.isna(best["emerged_step"]):
                steps.append(float(best["emerged_step"]))
    return steps


def _role_rows(runs, roles: Sequence[str]) -> list[dict[str, Any]]:
    n_seeds = len(runs)
    rows = []
    for role in roles:
        detected_seeds = emerged_seeds = 0
        layers: list[int] = []
        redundancy: list[int] = []
        n_detected: list[int] = []
        for _, table, _ in runs:
            rows_role = table[table["role"] == role]
            detected = rows_role[rows_role["detected"].astype(bool)]
            functional = rows_role[rows_role["functional"].fillna(False).astype(bool)]
            detected_seeds += not detected.empty
            n_detected.append(len(detected))
            if functional.empty:
                continue
            emerged_seeds += 1
            best = functional.sort_values("score", ascending=False).iloc[0]
            layers.append(int(best["layer"]))
            redundancy.append(len(functional))
        counts = pd.Series(layers).value_counts().sort_index()
        spread = _spread(_emergence_steps(runs, role))
        rows.append(
            {
                "role": role,
                "seeds": n_seeds,
                "detected_fraction": detected_seeds / n_seeds,
                "emerged_fraction": emerged_seeds / n_seeds,
                "layers": " ".join(f"L{layer}:{count}" for layer, count in counts.items()),
                "redundancy_mean": float(np.mean(redundancy)) if redundancy else 0.0,
                "redundancy_max": int(max(redundancy)) if redundancy else 0,
                "detected_mean": float(np.mean(n_detected)),
                **{f"emerged_step_{key}": value for key, value in spread.items()},
            }
        )
    return rows


def reemergence(run_dirs: Sequence[Path], out: Path, min_runs: int = 2) -> Reemergence:
    """The re-emergence report of finished toy runs of one architecture (one per seed); writes it into ``out``.

    ``min_runs`` is 2 for the ``reemergence`` command (one run re-emerges trivially); ``toy --seeds 1`` writes the
    one-seed report with ``min_runs=1`` so that every ``--seeds N`` run has the same files."""
    runs = _read_runs(run_dirs)
    if len(runs) < min_runs:
        raise HeadlabError("a re-emergence report needs at least 2 runs; pass more seeds")
    roles = [role for role in dict.fromkeys(runs[0][1]["role"]) if all(role in set(t["role"]) for _, t, _ in runs)]
    role_frame = pd.DataFrame(_role_rows(runs, roles))

    vectors = [role_vectors(table, roles) for _, table, _ in runs]
    assignment = match_heads(vectors)
    matching_rows, slot_rows = [], []
    n_layers, n_slots = assignment.shape[1:]
    centres = np.mean([np.take_along_axis(v, a[..., None], axis=1) for v, a in zip(vectors, assignment)], axis=0)
    for layer in range(n_layers):
        for slot in range(n_slots):
            counts = dict.fromkeys(roles, 0)
            for (seed, table, _), vec, assign in zip(runs, vectors, assignment):
                head = int(assign[layer, slot])
                here = table[(table["layer"] == layer) & (table["head"] == head)]
                functional = list(here.loc[here["functional"].fillna(False).astype(bool), "role"])
                for role in functional:
                    counts[role] += 1
                matching_rows.append(
                    {
                        "seed": seed,
                        "layer": layer,
                        "slot": slot,
                        "head": head,
                        "distance": float(np.linalg.norm(vec[layer, head] - centres[layer, slot])),
                        "functional_roles": "+".join(functional),
                    }
                )
            held = sorted((role for role in roles if counts[role]), key=lambda role: -counts[role])
            slot_rows.append(
                {
                    "layer": layer,
                    "slot": slot,
                    "seeds": len(runs),
                    "roles": " ".join(f"{role}:{counts[role]}" for role in held),
                    **{f"n_{role}": counts[role] for role in roles},
                    **{f"centre_{role}": float(centres[layer, slot, r]) for r, role in enumerate(roles)},
                }
            )
    matching, slots = pd.DataFrame(matching_rows), pd.DataFrame(slot_rows)
    summary = _summary(runs, role_frame, slots)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "reemergence.csv", role_frame.to_csv(index=False))
    atomic_write_text(out / "matching.csv", matching.to_csv(index=False))
    atomic_write_text(out / "slots.csv", slots.to_csv(index=False))
    atomic_write_text(out / "reemergence.md", _markdown(role_frame, slots, summary))
    atomic_write_json(out / "seeds.json", summary)
    _plot(runs, role_frame, out / "reemergence.png")
    report = Reemergence(role_frame, matching, slots, summary)
    print(_markdown(role_frame, slots, summary), flush=True)
    return report


def _summary(runs, role_frame: pd.DataFrame, slots: pd.DataFrame) -> dict[str, Any]:
    target = runs[0][2].get("target", {}).get("role")
    formed = [bool(record.get("target", {}).get("formed")) for _, _, record in runs]
    phase = [record.get("phase_change_step") for _, _, record in runs]
    return {
        "seeds": [seed for seed, _, _ in runs],
        "task": runs[0][2].get("task"),
        "target_role": target,
        "target_formed_fraction": sum(formed) / len(formed),
        "phase_change_step": _spread([float(p) for p in phase if p is not None]),
        "final_eval_accuracy": _spread([float(r["final_eval"]["accuracy"]) for _, _, r in runs if "final_eval" in r]),
        "roles": to_plain(role_frame.replace({np.nan: None}).to_dict(orient="records")),
        "slots": to_plain(slots[["layer", "slot", "roles"]].to_dict(orient="records")),
    }


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if not value.is_integer() else f"{int(value)}"
    return str(value)


def _markdown(role_frame: pd.DataFrame, slots: pd.DataFrame, summary: dict[str, Any]) -> str:
    n = len(summary["seeds"])
    lines = [
        f"# Re-emergence over {n} seeds ({summary['task']}; target role {summary['target_role']} formed in "
        f"{round(summary['target_formed_fraction'] * n)}/{n})",
        "",
        "| role | detected | emerged | best head's layer (seeds) | redundancy mean / max | emergence step median "
        "[min, max], std |",
        "|---|---|---|---|---|---|",
    ]
    for row in role_frame.to_dict(orient="records"):
        steps = (
            f"{_fmt(row['emerged_step_median'])} [{_fmt(row['emerged_step_min'])}, {_fmt(row['emerged_step_max'])}], "
            f"{_fmt(row['emerged_step_std'])}"
        )
        lines.append(
            f"| {row['role']} | {round(row['detected_fraction'] * n)}/{n} | {round(row['emerged_fraction'] * n)}/{n} "
            f"| {row['layers'] or '-'} | {row['redundancy_mean']:.2f} / {row['redundancy_max']} | {steps} |"
        )
    lines += [
        "",
        "Head slots (heads matched across seeds by the Hungarian algorithm on their role-score vectors): the "
        "functional roles of the matched heads, with the number of seeds in which each holds.",
        "",
        f"| slot | functional roles (seeds out of {n}) |",
        "|---|---|",
    ]
    for row in slots.to_dict(orient="records"):
        lines.append(f"| L{row['layer']}.{row['slot']} | {row['roles'] or '-'} |")
    return "\n".join(lines) + "\n"


def _plot(runs, role_frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(role_frame["role"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(roles) + 2), constrained_layout=True)
    y = np.arange(len(roles))
    left.barh(y - 0.2, role_frame["detected_fraction"], height=0.4, label="detected", color="#9ecae1")
    left.barh(y + 0.2, role_frame["emerged_fraction"], height=0.4, label="emerged (functional)", color="#3182bd")
    left.set(yticks=y, yticklabels=roles, xlim=(0, 1), xlabel="fraction of seeds", title="re-emergence")
    left.invert_yaxis()
    left.legend(loc="lower right", fontsize=8)
    for r, role in enumerate(roles):
        steps = _emergence_steps(runs, role)
        right.scatter(steps, np.full(len(steps), r), color="#3182bd", alpha=0.7)
    right.set(yticks=y, yticklabels=roles, xlabel="emergence step of the best functional head", title="when")
    right.invert_yaxis()
    save_figure(fig, path)


def reemergence_command(runs: list[Path], out: Path = Path("runs/reemergence")) -> Path:
    """Re-emergence report of finished toy runs (one per seed, one architecture): roles across seeds, matched heads.

    Args:
        runs: toy run directories, e.g. --runs '[runs/a/seed-0, runs/b/seed-1]', or one directory whose seed-*
            subdirectories are runs (what toy --seeds writes).
        out: output directory (reemergence.csv, matching.csv, slots.csv, reemergence.md, reemergence.png, seeds.json).

    Returns:
        The output directory.
    """
    run_dirs = find_runs(runs, "roles.csv", "python train.py toy --out DIR")
    if run_owner(Path(out)) == "toy":  # toy --seeds writes the same report: only its own runs may rewrite it
        own = find_runs([out], "roles.csv", "python train.py toy --out DIR")
        if sorted(p.resolve() for p in own) != sorted(p.resolve() for p in run_dirs):
            raise HeadlabError(f"--out {out} is a toy run whose report covers its own seeds; a report of other runs "
                               "would replace it: choose another --out")
    with run_directory(out, "reemergence", accepts=("toy",)):
        reemergence(run_dirs, out)
    return Path(out)
