"""In-context classification with bursty sequences (Reddy 2023, "The mechanistic basis of data dependence and
abrupt learning in an in-context classification task"; Chan et al. 2022).

Items belong to classes; each class has a fixed label (drawn once from ``mapping_seed``). A sequence shows
``n_context`` (item, label) pairs and then a query item; the model predicts the query's label at the last
position. In *bursty* training sequences (probability ``p_bursty``) the query's class appears ``burst`` times in
the context, so copying the label that followed a matching item (an induction head) solves it; otherwise the
context is random and only the memorised mapping helps. Splits: ``train``; ``iw`` (in-weights: the query's
class is absent from the context, only the mapping can answer); ``ic`` (in-context: novel items never seen in
training, labels assigned at random per sequence, only the context can answer). Target head function: induction.
Metric: cross-entropy and accuracy of the query label, per split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from data.tasks.base import IGNORE, Batch, Task, randint


@dataclass(frozen=True)
class ICLTask(Task):
    """Items ``0 .. n_classes + n_novel - 1`` (one item per class), then labels."""

    name = "icl"
    role = "induction"
    splits = ("train", "iw", "ic")
    eval_split = "ic"

    n_classes: int = 128
    n_novel: int = 32
    n_labels: int = 8
    n_context: int = 8
    burst: int = 3
    p_bursty: float = 0.9
    mapping_seed: int = 4321

    def __post_init__(self) -> None:
        if not 1 <= self.burst <= self.n_context:
            raise ValueError(f"burst {self.burst} must lie in [1, n_context={self.n_context}]")

    @property
    def vocab_size(self) -> int:
        return self.n_classes + self.n_novel + self.n_labels

    @property
    def seq_len(self) -> int:
        return 2 * self.n_context + 1

    @cached_property
    def mapping(self) -> torch.Tensor:
        """The in-weights label of every training class, ``[n_classes]``."""
        return randint(self.n_labels, (self.n_classes,), torch.Generator().manual_seed(self.mapping_seed))

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        n, c, label0 = batch_size, self.n_context, self.n_classes + self.n_novel
        if split == "ic":
            pool, first = self.n_novel, self.n_classes
            labels_of = randint(self.n_labels, (n, self.n_novel), generator)  # fresh labels per sequence
        else:
            pool, first = self.n_classes, 0
            labels_of = self.mapping.expand(n, -1)
        # distinct classes: the query class, then context classes that differ from it
        order = torch.rand(n, pool, generator=generator).argsort(dim=1)  # [B, pool]
        query = order[:, 0]
        context = order[:, 1 : c + 1].clone()  # [B, C], none equal to the query class
        if split == "train":
            bursty = torch.rand(n, generator=generator) < self.p_bursty
        else:
            bursty = torch.full((n,), split == "ic")
        slots = torch.rand(n, c, generator=generator).argsort(dim=1)[:, : self.burst]  # where the bursts go
        burst_mask = torch.zeros(n, c, dtype=torch.bool).scatter(1, slots, True) & bursty[:, None]
        context = torch.where(burst_mask, query[:, None], context)
        ctx_labels = label0 + labels_of.gather(1, context)
        items = torch.stack((first + context, ctx_labels), dim=2).flatten(1)  # [B, 2C]
        tokens = torch.cat((items, (first + query)[:, None]), dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = label0 + labels_of.gather(1, query[:, None])[:, 0]
        return {"input_ids": tokens, "targets": targets}
