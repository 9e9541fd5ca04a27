"""Synthetic tasks for toy transformers, each a seeded infinite stream targeting one head function.

=================  ===================  ==============================================================
task               target head role     metric
=================  ===================  ==============================================================
induction          induction            loss on the repeated segment (random length and starts)
recall             induction            loss/accuracy of the queried value
ioi                name_mover           loss/accuracy of the indirect object (ABBA/BABA; ABC corrupted)
successor          successor            loss/accuracy of the successor of an ordinal token
icl                induction            query-label loss/accuracy; in-weights vs in-context splits
iteration          iteration            loss/accuracy of every chain-of-thought parity step
modular_addition   operand_attention    test accuracy on held-out pairs (grokking)
=================  ===================  ==============================================================

>>> task = make_task("induction", vocab=64, length=64)
>>> batch = task.batch(8, seed=0)   # {"input_ids": [8, 64], "targets": [8, 64], ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any

from data.tasks.base import IGNORE, Batch, Task
from data.tasks.icl import ICLTask
from data.tasks.induction import InductionTask
from data.tasks.ioi import IOITask
from data.tasks.iteration import IterationTask
from data.tasks.metrics import sequence_loss, target_accuracy, target_loss
from data.tasks.modular import ModularAdditionTask
from data.tasks.recall import RecallTask
from data.tasks.successor import SuccessorTask
from headlab.errors import HeadlabError

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (InductionTask, RecallTask, IOITask, SuccessorTask, ICLTask, IterationTask, ModularAdditionTask)
}


def make_task(name: str, **options: Any) -> Task:
    """The task registered as ``name`` with its options overridden (e.g. ``make_task("induction", vocab=32)``)."""
    if name not in TASKS:
        raise HeadlabError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise HeadlabError(
            f"task '{name}' has no option {', '.join(unknown)}; its options are: {', '.join(sorted(known))}"
        )
    if "cycles" in options:
        options["cycles"] = tuple(options["cycles"])
    for key, value in options.items():  # sizes and counts; seeds may be any integer
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and not key.endswith("seed") and v < 1:
                if key in cls.zero_options and v == 0:
                    continue
                raise HeadlabError(f"task '{name}': option {key}={value} must be a positive number")
    try:
        return cls(**options)
    except ValueError as error:
        raise HeadlabError(f"task '{name}': {error}") from error


__all__ = [
    "IGNORE",
    "TASKS",
    "Batch",
    "ICLTask",
    "IOITask",
    "InductionTask",
    "IterationTask",
    "ModularAdditionTask",
    "RecallTask",
    "SuccessorTask",
    "Task",
    "make_task",
    "sequence_loss",
    "target_accuracy",
    "target_loss",
]
