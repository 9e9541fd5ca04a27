"""The per-task re-emergence table of ``toymodels/README.md``: each task's default config over N seeds.

``python -m toymodels.table --out runs/toy-table --seeds 5`` runs, for every task in turn, exactly the documented
command ``python train.py toy --config configs/toy/TASK.yaml --seeds N --out OUT/TASK --logger none`` (finished seeds
are reused, so an interrupted table resumes), then reads each ``OUT/TASK`` and writes ``OUT/table.csv`` and
``OUT/table.md``: per task the target, in how many seeds it formed (a single head, or the group criterion), the
layer of its best head, its redundancy, its emergence step, the time per seed and the final accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.tasks import TASKS
from headlab.runs import atomic_write_text

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "toy"


def run_task(task: str, out: Path, seeds: int) -> None:
    """The documented command for one task (a subprocess, as a reader would run it)."""
    command = [sys.executable, "train.py", "toy", "--config", str(CONFIGS / f"{task}.yaml"), "--seeds", str(seeds),
               "--out", str(out), "--logger", "none"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=CONFIGS.parent.parent)


def _median_range(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.median(values):.0f} [{min(values):.0f}, {max(values):.0f}]"


def task_row(task: str, out: Path) -> dict[str, Any]:
    """One table row from a finished ``toy --seeds N`` directory."""
    summary = json.loads((out / "seeds.json").read_text())
    metrics = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in summary["seeds"]]
    targets = [m["target"] for m in metrics]
    n = len(metrics)
    formed = sum(bool(t.get("formed")) for t in targets)
    single = sum(bool(t.get("functional")) for t in targets)
    group = sum(bool(t.get("group_functional")) for t in targets)
    layers = pd.Series([t["layer"] for t in targets if t.get("functional") and t.get("layer") is not None],
                       dtype="Int64").value_counts()
    emerged = [float(t["emerged_step"]) for t in targets if t.get("formed") and t.get("emerged_step") is not None]
    row = {
        "task": task,
        "target": summary["target_role"],
        "seeds": n,
        "formed": formed,
        "single_head": single,
        "group": group,
        "best_layer": " ".join(f"L{layer}:{count}" for layer, count in sorted(layers.items())) or "-",
        "detected_heads_mean": float(np.mean([t.get("n_detected", 0) for t in targets])),
        "functional_heads_mean": float(np.mean([t.get("n_functional", 0) for t in targets])),
        "emerged_step": _median_range(emerged),
        "seconds_per_seed": float(np.mean([m["total_seconds"] for m in metrics])),
        "eval_accuracy": float(np.median([m["final_eval"]["accuracy"] for m in metrics])),
    }
    if "mechanism" in metrics[0]:  # a whole-model mechanism: no head, no layer
        keys = [tuple(m["mechanism"]["key_frequencies"]) for m in metrics]
        row.update(best_layer="-", detected_heads_mean=float("nan"), functional_heads_mean=float("nan"),
                   single_head=0, group=0, key_frequencies=" ".join(str(list(k)) for k in keys))
    return row


def markdown(frame: pd.DataFrame) -> str:
    lines = [
        "| task | target | formed | single head / group | best head's layer | detected (functional) heads per seed "
        "| emergence step median [min, max] | s per seed | eval accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in frame.to_dict(orient="records"):
        heads = "-" if pd.isna(r["detected_heads_mean"]) else (
            f"{r['detected_heads_mean']:.1f} ({r['functional_heads_mean']:.1f})")
        how = "-" if r["target"] == "fourier" else f"{r['single_head']} / {r['group']}"
        lines.append(f"| {r['task']} | {r['target']} | {r['formed']}/{r['seeds']} | {how} | {r['best_layer']} | "
                     f"{heads} | {r['emerged_step']} | {r['seconds_per_seed']:.0f} | {r['eval_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy-table"), help="one folder per task inside")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per task (0, 1, ...)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all seven)")
    parser.add_argument("--report_only", action="store_true", help="only read finished folders, train nothing")
    args = parser.parse_args(argv)
    rows = []
    for task in args.tasks.split(","):
        if not args.report_only:
            run_task(task, args.out / task, args.seeds)
        rows.append(task_row(task, args.out / task))
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "table.csv", frame.to_csv(index=False))
    atomic_write_text(args.out / "table.md", markdown(frame))
    print(markdown(frame), flush=True)
    return frame


if __name__ == "__main__":
    main()
