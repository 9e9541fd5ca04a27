"""Whole-model mechanism checks: a task's target that is not one head's role.

Modular addition's known mechanism (Nanda et al. 2023) is a Fourier algorithm spread over the embedding, the heads
and the MLP; attention over three tokens cannot show it (the operand-attention score is bounded by 1 and says
nothing). For such a task the ``toy`` command's target verdict comes from here instead of the head map, and
``metrics.json`` holds the whole report under ``mechanism``. The head map is still written (``roles.csv``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from data.tasks import Task
from toymodels.fourier import FourierThresholds, fourier_report, train_mask_of


@dataclass
class MechanismTarget:
    """The target verdict of a whole-model mechanism, shaped like a head role's ``TargetSummary`` where they meet:
    ``role``, ``scored``, ``detected`` (the signature is present), ``functional`` (removing it breaks the task),
    ``formed`` (both), ``emerged_step`` (not tracked: ``None``)."""

    role: str
    detected: bool
    functional: bool
    evidence: dict[str, Any] = field(default_factory=dict)
    scored: bool = True
    emerged_step: int | None = None

    @property
    def formed(self) -> bool:
        return self.detected and self.functional

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "formed": self.formed}

    def line(self) -> str:
        evidence = ", ".join(f"{k} {_fmt(v)}" for k, v in self.evidence.items())
        return (f"target mechanism {self.role}: {evidence}; detected={self.detected}, functional={self.functional}, "
                f"formed={self.formed}")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def fourier_mechanism(model: nn.Module, task: Task) -> tuple[MechanismTarget, dict[str, Any]]:
    """Nanda et al.'s Fourier mechanism (``toymodels/fourier.py``), judged by :class:`FourierThresholds`.

    ``detected``: key frequencies exist and hold ``>= min_sparsity`` of the embedding's energy (the signature).
    ``functional``: the logits restricted to the key frequencies keep the loss ``<= max_restricted_loss`` nats on
    all pairs, and removing them raises the training loss by ``>= min_excluded_gap`` nats (the causal half: the
    model needs those frequencies and they suffice). Calibration: 0 of 100 untrained models pass
    (``tests/test_fourier.py``).
    """
    thresholds = FourierThresholds()
    report = fourier_report(model, task.p, train_mask_of(task), thresholds)
    detected = bool(report["key_frequencies"]) and report["sparsity"] >= thresholds.min_sparsity
    functional = (report["restricted_loss"] <= thresholds.max_restricted_loss
                  and report["excluded_gap"] >= thresholds.min_excluded_gap)
    evidence = {"key_frequencies": report["key_frequencies"], "sparsity": report["sparsity"],
                "restricted_loss": report["restricted_loss"], "excluded_gap": report["excluded_gap"],
                "test_accuracy": report["test_accuracy"]}
    return MechanismTarget("fourier", detected, functional, evidence), report


MECHANISMS: dict[str, Callable[[nn.Module, Task], tuple[MechanismTarget, dict[str, Any]]]] = {
    "modular_addition": fourier_mechanism,
}
"""Task name -> its whole-model check; tasks absent here are judged by their target head role."""
