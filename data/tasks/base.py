"""The task interface: a seeded, infinite stream of token batches with the positions the loss is taken on.

A batch is a dict of tensors: ``input_ids`` ``[batch, seq]`` (long), ``targets`` ``[batch, seq]`` (long; the token
position ``i`` must predict, ``-100`` where no loss is taken) and task-specific extras the detectors read (e.g.
``iteration_mask`` ``[batch, seq, seq]``, the keys an iteration head should attend to). Targets are *aligned*:
``logits[:, i]`` is scored against ``targets[:, i]``; no shifting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

Batch = dict[str, torch.Tensor]
IGNORE = -100


@dataclass(frozen=True)
class Task(ABC):
    """A synthetic task. Subclasses are frozen dataclasses whose fields are the task's options.

    Class attributes: ``name`` (registry key), ``role`` (the head function it targets, a detector name) and
    ``splits`` (the evaluation splits it supports; ``"train"`` is the training distribution).
    """

    name: ClassVar[str]
    role: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train",)
    eval_split: ClassVar[str] = "train"  # the split ablation effects are measured on
    zero_options: ClassVar[frozenset[str]] = frozenset()  # count options that may be 0 (the rest must be >= 1)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the task uses (ids are ``0 .. vocab_size - 1``)."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Length of every sequence."""

    @abstractmethod
    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        """One batch drawn with ``generator``."""

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> Batch:
        """One batch of ``batch_size`` sequences drawn with ``generator`` from ``split``."""
        if split not in self.splits:
            raise ValueError(f"task {self.name} has no split {split!r}; choose one of {', '.join(self.splits)}")
        return self._sample(batch_size, generator, split)

    def stream(self, batch_size: int, seed: int, split: str = "train") -> Iterator[Batch]:
        """An infinite stream of batches, identical for the same ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, generator, split)

    def batch(self, batch_size: int, seed: int, split: str = "train") -> Batch:
        """A single fixed batch (the first of ``stream(batch_size, seed, split)``)."""
        return next(self.stream(batch_size, seed, split))

    def detection_batch(self, batch_size: int, seed: int) -> Batch:
        """The batch head detectors score on: by default an evaluation-split batch of the task itself."""
        return self.batch(batch_size, seed, self.eval_split)


def randint(high: int, size: tuple[int, ...], generator: torch.Generator, low: int = 0) -> torch.Tensor:
    return torch.randint(low, high, size, generator=generator)


def uniform_int(low: torch.Tensor | int, high: torch.Tensor | int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` integers, the k-th uniform in ``[low_k, high_k]`` (inclusive; tensors broadcast)."""
    low = torch.as_tensor(low)
    high = torch.as_tensor(high)
    u = torch.rand(n, generator=generator)
    return (low + (u * (high - low + 1)).floor().long()).clamp(max=high)
