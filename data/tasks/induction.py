"""Induction: random tokens with one segment repeated later (Olsson et al. 2022, "In-context learning and
induction heads").

Target head function: the induction head, which at a token ``A`` attends to the token that *followed* an
earlier ``A`` and copies it. Metric: cross-entropy on the repeated part (each repeated token after the first is
predicted from its predecessor). The segment's length and both of its starts are random per sequence, so
neither absolute nor relative position solves the task; ``fixed_offset`` makes the repeat distance constant,
a variant a purely positional head can solve (used to check that the detector tells the two apart).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from data.tasks.base import IGNORE, Batch, Task, randint, uniform_int


@dataclass(frozen=True)
class InductionTask(Task):
    """Options: ``vocab``, ``length``, segment length range ``min_segment..max_segment``, ``fixed_offset``."""

    name = "induction"
    role = "induction"

    vocab: int = 64
    length: int = 64
    min_segment: int = 8
    max_segment: int = 24
    fixed_offset: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.min_segment <= self.max_segment:
            raise ValueError(f"need 2 <= min_segment <= max_segment, got {self.min_segment}, {self.max_segment}")
        if 2 * self.max_segment > self.length:
            raise ValueError(f"max_segment {self.max_segment} does not fit twice in length {self.length}")
        if (
            self.fixed_offset is not None
            and not self.max_segment <= self.fixed_offset <= self.length - self.max_segment
        ):
            raise ValueError(f"fixed_offset {self.fixed_offset} must lie in [max_segment, length - max_segment]")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def seq_len(self) -> int:
        return self.length

    def detection_batch(self, batch_size: int, seed: int) -> Batch:
        """Always random offsets: on fixed-offset data a positional head would pass for an induction head."""
        return dataclasses.replace(self, fixed_offset=None).batch(batch_size, seed)

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        n, t = batch_size, self.length
        tokens = randint(self.vocab, (n, t), generator)  # [B, T]
        seg = uniform_int(self.min_segment, self.max_segment, n, generator)  # [B]
        if self.fixed_offset is None:
            start1 = uniform_int(0, t - 2 * seg, n, generator)
            start2 = uniform_int(start1 + seg, t - seg, n, generator)
        else:
            start1 = uniform_int(0, t - self.fixed_offset - seg, n, generator)
            start2 = start1 + self.fixed_offset
        pos = torch.arange(t)[None, :]  # [1, T]
        in_repeat = (pos >= start2[:, None]) & (pos < (start2 + seg)[:, None])  # [B, T]
        source = (pos - (start2 - start1)[:, None]).clamp(min=0)
        tokens = torch.where(in_repeat, tokens.gather(1, source), tokens)
        # position i in the repeat (except its last token) predicts token i + 1, also in the repeat
        predicts = in_repeat & (pos < (start2 + seg - 1)[:, None])
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = torch.where(predicts[:, :-1], tokens[:, 1:], IGNORE)
        return {"input_ids": tokens, "targets": targets, "repeat_mask": in_repeat}
