"""``toy --seeds N``: many seeds of one toy run, one after another or stacked, then the re-emergence report.

Seeds ``seed .. seed + N - 1`` train into ``OUT/seed-S``, each an ordinary toy run directory (its ``config.yaml``
reruns that seed alone). One after another each seed is :func:`toymodels.run.train_single`; stacked they train as
one vmapped model (:mod:`toymodels.stacked`) and are finished one by one with the same
:func:`toymodels.run.finish_seed`. Then :func:`toymodels.reemergence.reemergence` writes the report into ``OUT``,
and ``OUT/metrics.json`` holds its headline numbers (``target_formed_fraction``, ...) where a sweep looks for its
objective.

A seed directory that already holds a finished run of the same config is reused, so an interrupted ``--seeds`` run
resumes at the first unfinished seed; a directory holding a different config is refused.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from data.tasks import Task
from headlab.errors import HeadlabError
from headlab.runs import atomic_write_json, load_config, run_directory, save_config
from headlab.tracking import finish, make_logger
from toymodels.reemergence import reemergence
from toymodels.run import RunConfig, finish_seed, make_trainer, setup_seed, train_single

CIRCUIT_KEYS = ("layer0_eoi_attention", "layer1_diagonal", "selectivity_abba", "selectivity_baba", "copy_score",
                "logit_diff_drop", "random_median_drop", "patched_selectivity", "head_formed")
"""The circuit scores copied into ``metrics.json``'s ``per_seed`` rows (iteration's and ioi's)."""


def _finished(config: RunConfig) -> bool:
    """True when the seed's directory holds a finished run of this config; an error when it holds another run."""
    run_dir = Path(config.out)
    if not (run_dir / "metrics.json").exists():
        return False
    ignore = {"logger", "out"}
    saved = {k: v for k, v in load_config(run_dir / "config.yaml").items() if k not in ignore}
    wanted = {k: v for k, v in config.plain().items() if k not in ignore}
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise HeadlabError(
            f"{run_dir} holds a finished run with a different config ({', '.join(changed)}); "
            "pass another --out or delete that directory"
        )
    return True


def train_seeds(the_task: Task, config: RunConfig) -> Path:
    """Train the missing seeds (stacked or one by one), then write the re-emergence report."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config.plain())
    stack = config.stack_seeds if config.stack_seeds is not None else config.train.accelerator != "cpu"
    all_seeds = [config.seed + k for k in range(config.seeds)]
    configs = {s: config.for_seed(s) for s in all_seeds}
    todo = [s for s in all_seeds if not _finished(configs[s])]
    if len(todo) < len(all_seeds):
        print(f"reusing {len(all_seeds) - len(todo)} finished seed run(s) in {out}", flush=True)
    started = time.perf_counter()
    stacked = bool(stack and len(todo) > 1)
    if stacked:
        with contextlib.ExitStack() as claims:
            for s in todo:
                claims.enter_context(run_directory(configs[s].out, "toy"))
            _train_stacked(the_task, [configs[s] for s in todo], out)
    else:
        for s in todo:
            train_single(the_task, configs[s])
    report = reemergence([out / f"seed-{s}" for s in all_seeds], out)
    report.summary["train_and_map_seconds"] = time.perf_counter() - started
    report.summary["stacked"] = stacked
    atomic_write_json(out / "seeds.json", report.summary)
    atomic_write_json(out / "metrics.json", {**_sweepable(report.summary), "per_seed": _per_seed(out, all_seeds)})
    return out


def _per_seed(out: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Each seed's verdict, accuracy and time, and its circuit's scores where the task has one (iteration, ioi)."""
    rows = []
    for s in seeds:
        m = json.loads((out / f"seed-{s}" / "metrics.json").read_text())
        circuit = {k: m["circuit"][k] for k in CIRCUIT_KEYS if k in m.get("circuit", {})}
        rows.append({"seed": s, "formed": bool(m["target"].get("formed")), **circuit,
                     "accuracy": m["final_eval"]["accuracy"], "total_seconds": m["total_seconds"]})
    return rows


def _sweepable(summary: dict[str, Any]) -> dict[str, Any]:
    """The seeds summary as the flat metrics a sweep can optimise (``target_formed_fraction``, ``final_eval.*``)."""
    roles = {row["role"]: row for row in summary["roles"]}
    return {
        "task": summary["task"],
        "seeds": summary["seeds"],
        "target_formed_fraction": summary["target_formed_fraction"],
        "target_emerged_fraction": roles.get(summary["target_role"], {}).get("emerged_fraction", 0.0),
        "final_eval": {"accuracy": summary["final_eval_accuracy"]["median"]},
        "phase_change_step": summary["phase_change_step"]["median"],
    }


def _train_stacked(the_task: Task, configs: list[RunConfig], out: Path) -> None:
    from toymodels.stacked import (
        StackedEmergenceTracker,
        StackedTaskDataModule,
        StackedToyLitModule,
        StackedToyModel,
    )

    started = time.perf_counter()
    seeds = [c.seed for c in configs]
    first = configs[0]
    runs = [setup_seed(the_task, c) for c in configs]
    stacked = StackedToyModel([run.net for run in runs])
    module = StackedToyLitModule(stacked, first.train, seeds)
    tracker = StackedEmergenceTracker(stacked, [run.net for run in runs], [run.tracker for run in runs], seeds)
    name = f"toy-{the_task.name}-seeds{seeds[0]}-{seeds[-1]}"
    run_logger = make_logger(first.logger, out, name=name, group=f"toy-{the_task.name}", config=first.plain())
    trainer = make_trainer(first.train, run_logger, [tracker], out)
    train_started = time.perf_counter()
    trainer.fit(module, datamodule=StackedTaskDataModule(the_task, first.train.batch_size, seeds))
    train_seconds = time.perf_counter() - train_started
    stacked.write_to([run.net for run in runs])
    for run, log in zip(runs, module.train_logs):
        result = finish_seed(run, the_task, log, train_seconds, started, {"stacked_seeds": len(seeds)})
        for line in result.lines():
            print(line, flush=True)
    finish(run_logger)
