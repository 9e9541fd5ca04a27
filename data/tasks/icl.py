"""In-context classification with bursty sequences (Reddy 2023, "The mechanistic basis of data dependence and
abrupt learning in an in-context classification task"; Chan et al. 2022).

Items belong to classes; each class has a fixed label (drawn once from ``mapping_seed``). A sequence shows
``n_context`` (item, label) pairs and then a query item; the model predicts the query's label at the last
position. In *bursty* training sequences (probability ``p_bursty``) ``ways`` classes, the query's among them, each
appear ``burst`` times in the context (Chan et al. 2022's few-shot "shots x ways" sequences, 3 x 2 in their
configs), so copying the label that followed a matching item (an induction head) solves it; otherwise the
context is random and only the memorised mapping helps. With ``ways = 1`` the query's label is the only label
that repeats in the context, and "copy the most frequent label" answers without matching any item (a shortcut
that made this task's ``ic`` accuracy say nothing about induction heads). Splits: ``train``; ``iw`` (in-weights:
the query's class is absent from the context, only the mapping can answer; every non-bursty context is like that);
``ic`` (in-context: novel items, whose
labels are drawn at random per sequence, only the context can answer); ``flip`` (training classes in bursty
contexts whose labels are all shifted to ``(label + 1) mod n_labels``, Reddy's ``flip_labels`` test set: context
and memorised mapping disagree, accuracy is scored against the context). Target head function: induction.
Metric: cross-entropy and accuracy of the query label, per split.

``p_novel`` of the training sequences use the novel items (Reddy's ``p_C``), always in bursty contexts
(``bursty_novel``); with ``bursty_novel`` off they follow ``p_bursty`` like the rest (Chan et al.'s non-bursty arm
sets ``p_bursty = 0`` as well). A non-bursty novel sequence cannot be answered at all, and a few of them slow the
circuit a lot: with 10% of them (``bursty_novel`` off, ``p_bursty`` 0.9), ``configs/toy/icl.yaml`` stayed on the
"one of the two repeated labels" plateau (ic accuracy 0.49-0.54) through 6000 steps in 3 of 3 seeds, where with
them all bursty it forms at ~2000 steps.
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
    splits = ("train", "iw", "ic", "flip")
    eval_split = "ic"

    n_classes: int = 128
    n_novel: int = 32
    n_labels: int = 8
    n_context: int = 8
    burst: int = 3
    p_bursty: float = 0.9
    mapping_seed: int = 4321
    p_novel: float = 0.5
    zipf_alpha: float = 0.0
    ways: int = 2
    bursty_novel: bool = True  # novel-item training sequences always bursty (Reddy's p_C); False: they follow p_bursty

    def __post_init__(self) -> None:
        if not 1 <= self.burst <= self.n_context:
            raise ValueError(f"burst {self.burst} must lie in [1, n_context={self.n_context}]")
        if self.ways < 1 or self.ways * self.burst > self.n_context:
            raise ValueError(f"ways * burst = {self.ways} * {self.burst} must lie in [1, n_context={self.n_context}]")
        if not 0 <= self.p_novel < 1:
            raise ValueError(f"p_novel {self.p_novel} must lie in [0, 1)")
        if self.n_novel < self.n_context + self.ways:
            raise ValueError(f"n_novel {self.n_novel} must be at least n_context + ways (distinct classes)")

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

    def _order(self, n: int, pool: int, generator: torch.Generator, zipf: bool) -> torch.Tensor:
        """``[n, pool]``: a random order of the classes per sequence (the first ``k`` are ``k`` distinct classes
        drawn without replacement, with Zipf weights ``(rank + 1)^-alpha`` when ``zipf``; Gumbel top-k)."""
        u = torch.rand(n, pool, generator=generator)
        if not zipf or self.zipf_alpha == 0:
            return u.argsort(dim=1)
        log_w = -self.zipf_alpha * torch.log(torch.arange(1, pool + 1, dtype=torch.float32))
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))
        return (log_w + gumbel).argsort(dim=1, descending=True)

    def _sequences(
        self, n: int, generator: torch.Generator, novel: bool, bursty: torch.Tensor, flip: bool = False
    ) -> Batch:
        c, label0 = self.n_context, self.n_classes + self.n_novel
        if novel:
            pool, first = self.n_novel, self.n_classes
            labels_of = randint(self.n_labels, (n, self.n_novel), generator)  # fresh labels per sequence
        else:
            pool, first = self.n_classes, 0
            labels_of = ((self.mapping + int(flip)) % self.n_labels).expand(n, -1)
        # distinct classes: the query class, then context classes that differ from it
        order = self._order(n, pool, generator, zipf=not novel)  # [B, pool]
        query = order[:, 0]
        context = order[:, self.ways : self.ways + c].clone()  # [B, C] singletons, none of the `ways` classes
        # bursty: `ways` classes (the query's first) fill `burst` random slots each; the rest stay singletons
        slots = torch.rand(n, c, generator=generator).argsort(dim=1)  # [B, C] a random order of the slots
        for way in range(self.ways):
            where = slots[:, way * self.burst : (way + 1) * self.burst]  # [B, burst]
            burst_mask = torch.zeros(n, c, dtype=torch.bool).scatter(1, where, True) & bursty[:, None]
            context = torch.where(burst_mask, order[:, way : way + 1], context)
        ctx_labels = label0 + labels_of.gather(1, context)
        items = torch.stack((first + context, ctx_labels), dim=2).flatten(1)  # [B, 2C]
        tokens = torch.cat((items, (first + query)[:, None]), dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = label0 + labels_of.gather(1, query[:, None])[:, 0]
        return {"input_ids": tokens, "targets": targets}

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        n = batch_size
        if split == "ic":
            return self._sequences(n, generator, novel=True, bursty=torch.ones(n, dtype=torch.bool))
        if split == "flip":
            return self._sequences(n, generator, novel=False, bursty=torch.ones(n, dtype=torch.bool), flip=True)
        if split == "iw":
            return self._sequences(n, generator, novel=False, bursty=torch.zeros(n, dtype=torch.bool))
        bursty = torch.rand(n, generator=generator) < self.p_bursty
        batch = self._sequences(n, generator, novel=False, bursty=bursty)
        if self.p_novel > 0:
            use = (torch.rand(n, generator=generator) < self.p_novel)[:, None]  # [B, 1]
            novel_bursty = torch.ones(n, dtype=torch.bool) if self.bursty_novel else bursty
            novel = self._sequences(n, generator, novel=True, bursty=novel_bursty)
            batch = {k: torch.where(use, novel[k], batch[k]) for k in batch}
        return batch
