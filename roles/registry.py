"""The detector registry: head-function detectors are plain functions ``(model, batch) -> Evidence`` (a score, a
matched control and per-sample differences, :mod:`roles.evidence`), registered by name with the batch keys they
read.

They work on toy models and on Hugging Face models alike. Attention-pattern detectors (:mod:`roles.patterns`) read
the patterns of ``batch["input_ids"]``; weight detectors (:mod:`roles.ov`) read the OV circuit. A task's batches
carry the keys its own role needs (e.g. ``iteration_mask``); :func:`applicable` picks the detectors a batch serves.
Importing :mod:`roles` registers every built-in detector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from data.tasks import Batch
from headlab.errors import HeadlabError
from roles.evidence import Evidence

Detector = Callable[[nn.Module | None, Batch], Evidence]  # -> scores, controls [layer, head]

DETECTORS: dict[str, Detector] = {}
REQUIRES: dict[str, tuple[str, ...]] = {}
PATTERN_DETECTORS: set[str] = set()


def register(name: str, requires: tuple[str, ...] = ("input_ids",), uses_patterns: bool = True):
    """Register a detector under ``name``; ``requires`` are the batch keys it reads."""

    def decorate(fn: Detector) -> Detector:
        DETECTORS[name] = fn
        REQUIRES[name] = requires
        if uses_patterns:
            PATTERN_DETECTORS.add(name)
        return fn

    return decorate


def applicable(batch: Mapping[str, object], names: Iterable[str] | None = None) -> list[str]:
    """Detector names whose required batch keys are present (all registered ones when ``names`` is None)."""
    chosen = list(DETECTORS) if names is None else list(names)
    unknown = [n for n in chosen if n not in DETECTORS]
    if unknown:
        raise HeadlabError(f"unknown detector {', '.join(unknown)}; choose from: {', '.join(DETECTORS)}")
    return [n for n in chosen if all(key in batch for key in REQUIRES[n])]


@torch.no_grad()
def measure_heads(model: nn.Module, batch: Batch, names: Iterable[str] | None = None) -> dict[str, Evidence]:
    """The evidence of every applicable detector; attention patterns are computed once."""
    work = {k: v for k, v in batch.items() if k != "attentions"}  # fresh patterns for this model
    return {name: DETECTORS[name](model, work) for name in applicable(batch, names)}


def score_heads(model: nn.Module, batch: Batch, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores ``[layer, head]`` of every applicable detector (the effect sizes of :func:`measure_heads`)."""
    return {name: evidence.score for name, evidence in measure_heads(model, batch, names).items()}
