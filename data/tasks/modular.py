"""Modular addition ``a + b mod p`` on a fixed fraction of all pairs (Power et al. 2022, "Grokking"; Nanda et al.
2023, "Progress measures for grokking via mechanistic interpretability").

Sequence ``a b =``; the ``=`` position predicts ``(a + b) mod p``. Training sees ``train_fraction`` of the
``p * p`` pairs (fixed by ``split_seed``); the ``test`` split holds the rest, so test accuracy jumping long after
train accuracy is the grokking signature. Target head function: operand attention (Nanda et al.'s heads read
``a`` and ``b`` from ``=``; ``operand_mask`` marks those keys). Metric: test accuracy and cross-entropy.
Tokens ``0 .. p - 1`` are numbers, ``p`` is ``=``.

A batch of at most as many pairs as the split holds draws them without replacement, so ``batch_size`` equal to the
number of training pairs (``int(train_fraction * p * p)``) is exactly one pass over the training set, Nanda et
al.'s full-batch training. (Drawn with replacement, such a batch held only ~63% of the distinct pairs, some twice.)
Larger batches draw with replacement.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from data.tasks.base import IGNORE, Batch, Task, randint


@dataclass(frozen=True)
class ModularAdditionTask(Task):
    name = "modular_addition"
    role = "operand_attention"
    splits = ("train", "test")
    eval_split = "test"

    p: int = 113
    train_fraction: float = 0.3
    split_seed: int = 598

    def __post_init__(self) -> None:
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must lie in (0, 1), got {self.train_fraction}")

    @property
    def vocab_size(self) -> int:
        return self.p + 1

    @property
    def seq_len(self) -> int:
        return 3

    @cached_property
    def pairs(self) -> dict[str, torch.Tensor]:
        """Pair indices ``a * p + b`` of each split."""
        order = torch.randperm(self.p * self.p, generator=torch.Generator().manual_seed(self.split_seed))
        cut = int(self.train_fraction * len(order))
        return {"train": order[:cut], "test": order[cut:]}

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        pool = self.pairs[split]
        if batch_size <= len(pool):  # distinct pairs; the whole split when batch_size == len(pool)
            index = pool[torch.randperm(len(pool), generator=generator)[:batch_size]]
        else:
            index = pool[randint(len(pool), (batch_size,), generator)]
        a, b = index // self.p, index % self.p
        tokens = torch.stack((a, b, torch.full_like(a, self.p)), dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = (a + b) % self.p
        operand_mask = torch.zeros(batch_size, 3, 3, dtype=torch.bool)
        operand_mask[:, 2, :2] = True
        return {"input_ids": tokens, "targets": targets, "operand_mask": operand_mask}
