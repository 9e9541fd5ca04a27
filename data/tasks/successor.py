"""Successor: one member of a cyclic ordinal sequence among distractors; predict its successor (Gould et al.
2023, "Successor Heads").

Ordinal sequences (digits 0-9, 7 weekdays, 12 months, 26 letters by default) get consecutive token ids; each wraps
around (Sunday -> Monday). A sequence holds distractor tokens, one ordinal token ``x`` at a random position and a
final ``NEXT`` token, which must predict ``succ(x)``. Target head function: the successor head, attending from
NEXT to ``x`` with an OV circuit that maps ``x`` to ``succ(x)`` (successor score). Metric: cross-entropy and
accuracy at the last position. ``successor_pairs`` ``[n_ordinal, 2]`` lists every (token, successor) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.tasks.base import IGNORE, Batch, Task, randint


@dataclass(frozen=True)
class SuccessorTask(Task):
    name = "successor"
    role = "successor"

    cycles: tuple[int, ...] = (10, 7, 12, 26)
    n_distractors: int = 32
    length: int = 12

    @property
    def n_ordinal(self) -> int:
        return sum(self.cycles)

    @property
    def vocab_size(self) -> int:
        return self.n_ordinal + self.n_distractors + 1  # + NEXT

    @property
    def seq_len(self) -> int:
        return self.length

    def successor_pairs(self) -> torch.Tensor:
        pairs, start = [], 0
        for size in self.cycles:
            pairs += [(start + i, start + (i + 1) % size) for i in range(size)]
            start += size
        return torch.tensor(pairs)

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        n = batch_size
        pairs = self.successor_pairs()
        tokens = self.n_ordinal + randint(self.n_distractors, (n, self.length), generator)
        tokens[:, -1] = self.vocab_size - 1  # NEXT
        pick = randint(len(pairs), (n,), generator)
        where = randint(self.length - 1, (n,), generator)
        tokens[torch.arange(n), where] = pairs[pick, 0]
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = pairs[pick, 1]
        return {"input_ids": tokens, "targets": targets, "successor_pairs": pairs}
