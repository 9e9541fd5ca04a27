"""Indirect object identification over synthetic name tokens (Wang et al. 2022, "Interpretability in the Wild").

A template is a fixed sequence of filler tokens with three name slots, ``... IO/S ... S/IO ... S ... END``
("When Mary and John went to the store, John gave a drink to" -> "Mary"): ABBA puts the indirect object first,
BABA the subject first. The model must output the name that occurs once (the indirect object) at the last
position. Target head function: the name mover, which attends from END to the IO name and copies it
(OV-circuit copy score). Metric: cross-entropy and accuracy of the IO name at the last position. Each batch
also carries ``corrupt_input_ids``, the ABC variant (the second subject replaced by a third name) used for
activation patching, ``name_tokens``, the ids of all names, and ``io_mask`` / ``s_mask`` ``[batch, seq]``, the
positions of the indirect object's and the subject's names (the name-mover detector's targets and controls).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from data.tasks.base import IGNORE, Batch, Task, randint


@dataclass(frozen=True)
class IOITask(Task):
    """Names are ids ``0 .. n_names - 1``; filler words follow; templates are drawn once from ``template_seed``."""

    name = "ioi"
    role = "name_mover"

    n_names: int = 24
    n_fillers: int = 40
    n_templates: int = 8
    length: int = 14
    template_seed: int = 1234

    def __post_init__(self) -> None:
        if self.length < 7:
            raise ValueError(f"length {self.length} too short for an IOI template (needs >= 7)")
        if self.n_names < 3:
            raise ValueError("IOI needs at least 3 names (the ABC corruption uses a third)")

    @property
    def vocab_size(self) -> int:
        return self.n_names + self.n_fillers

    @property
    def seq_len(self) -> int:
        return self.length

    @cached_property
    def templates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filler tokens ``[templates, length]`` and name slots ``[templates, 3]`` (first, second, subject)."""
        g = torch.Generator().manual_seed(self.template_seed)
        fillers = self.n_names + randint(self.n_fillers, (self.n_templates, self.length), g)
        slots = []
        for _ in range(self.n_templates):
            # the subject's second mention comes at least 2 tokens before the final END token
            s2 = int(torch.randint(4, self.length - 2, (1,), generator=g))
            first, second = sorted(torch.randperm(s2 - 1, generator=g)[:2].tolist())
            slots.append([first, second + (second == first), s2])
        return fillers, torch.tensor(slots)

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        n = batch_size
        fillers, slots = self.templates
        which = randint(self.n_templates, (n,), generator)
        tokens, slot = fillers[which].clone(), slots[which]  # [B, T], [B, 3]
        names = torch.rand(n, self.n_names, generator=generator).argsort(dim=1)[:, :3]  # [B, 3] distinct
        io, s, c = names[:, 0], names[:, 1], names[:, 2]
        baba = torch.rand(n, generator=generator) < 0.5
        rows = torch.arange(n)
        tokens[rows, slot[:, 0]] = torch.where(baba, s, io)
        tokens[rows, slot[:, 1]] = torch.where(baba, io, s)
        tokens[rows, slot[:, 2]] = s
        corrupt = tokens.clone()
        corrupt[rows, slot[:, 2]] = c
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = io
        io_mask = tokens == io[:, None]  # [B, T]: the indirect object's one mention
        s_mask = tokens == s[:, None]  # [B, T]: the subject's two mentions
        return {
            "input_ids": tokens,
            "targets": targets,
            "corrupt_input_ids": corrupt,
            "name_tokens": torch.arange(self.n_names),
            "io_mask": io_mask,
            "s_mask": s_mask,
        }
