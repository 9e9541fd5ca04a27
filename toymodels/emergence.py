"""Emergence tracking: judge every head during training and find when each role and the task's phase change appear.

:class:`EmergenceTracker` is a Lightning callback that, on a log-plus-linear step schedule, measures all heads with
the detectors on a fixed detection batch, applies the detection rule of :mod:`roles.rule` (floor and corrected
control test) and evaluates the task metric on a fixed evaluation batch; it logs both to the Trainer's logger (W&B
or CSV). :func:`emerged_steps` gives the first step from which each (role, head) stays detected;
:func:`phase_change_step` the step of the task metric's phase change.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch

from data.tasks import Batch, target_accuracy, target_loss
from headlab.heads import head_sites
from roles.registry import measure_heads
from roles.rule import apply_rule


def log_linear_schedule(max_steps: int, every: int) -> list[int]:
    """Steps ``0, 1, 2, 4, 8, ...`` (log-spaced, for the fast early changes) plus every ``every`` steps and the last."""
    steps = {0, max_steps}
    power = 1
    while power < max_steps:
        steps.add(power)
        power *= 2
    steps.update(range(every, max_steps, max(every, 1)))
    return sorted(s for s in steps if 0 <= s <= max_steps)


@dataclass
class Snapshot:
    """Everything measured at one step: the task metric, every detector's scores and verdicts ``[layer, head]``."""

    step: int
    seconds: float
    eval_loss: float
    eval_accuracy: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    detected: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def snapshot(model: torch.nn.Module, step: int, seconds: float, detect_batch: Batch, eval_batch: Batch,
             alpha: float = 0.05, floors: dict[str, float] | None = None) -> Snapshot:
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=eval_batch["input_ids"]).logits
        loss = float(target_loss(logits, eval_batch["targets"]))
        accuracy = float(target_accuracy(logits, eval_batch["targets"]))
        evidence = measure_heads(model, detect_batch)
        verdicts = apply_rule(evidence, head_sites(model)[0].d_head, alpha, floors)
    finally:
        model.train(was_training)
    return Snapshot(step, seconds, loss, accuracy, {r: e.score for r, e in evidence.items()},
                    {r: v.detected for r, v in verdicts.items()})


class EmergenceTracker(pl.Callback):
    """Measures and judges every head on ``schedule`` steps; ``history`` holds one :class:`Snapshot` per step.

    ``alpha`` and ``floors`` are the detection rule's (:func:`roles.rule.apply_rule`); ``floor_of`` maps each role to
    its floor for the plots. The logged ``emergence/{role}_detected`` counts the heads detected at each step.
    """

    def __init__(self, detect_batch: Batch, eval_batch: Batch, schedule: list[int], alpha: float = 0.05,
                 floors: dict[str, float] | None = None) -> None:
        self.detect_batch, self.eval_batch = detect_batch, eval_batch
        self.schedule = set(schedule)
        self.alpha, self.floors = alpha, dict(floors or {})
        self.history: list[Snapshot] = []
        self._start = 0.0

    def start_clock(self) -> None:
        self._start = time.perf_counter()

    def measure(self, model: torch.nn.Module, step: int, logger=None, prefix: str = "") -> Snapshot:
        """Score ``model`` at ``step``, append the snapshot to ``history`` and log it (keys under ``prefix``).

        A model trained on an accelerator is scored on a CPU copy (toy models are small; the detectors and the fixed
        batches live on the CPU)."""
        if next(model.parameters()).device.type != "cpu":
            model = copy.deepcopy(model).cpu()
        snap = snapshot(model, step, time.perf_counter() - self._start, self.detect_batch, self.eval_batch,
                        self.alpha, self.floors)
        self.history.append(snap)
        if logger:
            metrics = {"eval/loss": snap.eval_loss, "eval/accuracy": snap.eval_accuracy}
            for role, scores in snap.scores.items():
                metrics[f"emergence/{role}_max"] = float(scores.max())
                metrics[f"emergence/{role}_detected"] = int(snap.detected[role].sum())
            logger.log_metrics({prefix + key: value for key, value in metrics.items()}, step=step)
        return snap

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_clock()
        self.measure(pl_module.model, 0, trainer.logger)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.schedule and (not self.history or self.history[-1].step != step):
            self.measure(pl_module.model, step, trainer.logger)


def emerged_steps(history: list[Snapshot]) -> dict[tuple[str, int, int], int]:
    """``(role, layer, head) -> first step`` from which the head is detected at every later snapshot (so a transient
    blip at initialisation does not count); heads not detected at the last snapshot have none."""
    found: dict[tuple[str, int, int], int] = {}
    if not history:
        return found
    steps = [snap.step for snap in history]
    for role in history[-1].detected:
        detected = torch.stack([snap.detected[role] for snap in history])  # [S, L, H]
        for layer, head in detected[-1].nonzero().tolist():
            column = detected[:, layer, head].tolist()
            first = len(column) - 1
            while first > 0 and column[first - 1]:
                first -= 1
            found[(role, layer, head)] = steps[first]
    return found


def phase_change_step(steps: list[int], losses: list[float], min_drop: float = 0.2) -> int | None:
    """The step at which the task loss first falls halfway from its initial plateau to its final minimum.

    ``plateau = loss at the first snapshot``, ``floor = min loss``; returns the first step with
    ``loss <= (plateau + floor) / 2``, or None when the loss never fell by ``min_drop`` of its initial value
    (no phase change). For induction this is the step where the induction bump resolves (Olsson et al. 2022).
    """
    if len(losses) < 2:
        return None
    plateau, floor = losses[0], min(losses)
    if plateau - floor < min_drop * abs(plateau):
        return None
    middle = (plateau + floor) / 2
    return next(step for step, loss in zip(steps, losses) if loss <= middle)
