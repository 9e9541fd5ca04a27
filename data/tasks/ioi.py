"""Indirect object identification over synthetic name tokens (Wang et al. 2022, "Interpretability in the Wild").

A template is a fixed sequence of filler tokens with three name slots, ``... IO/S ... S/IO ... S ... END``
("When Mary and John went to the store, John gave a drink to" -> "Mary"): ABBA puts the indirect object first,
BABA the subject first. The model must output the name that occurs once (the indirect object) at the last
position. Target head function: the name mover, which attends from END to the IO name and copies it
(OV-circuit copy score). Metric: cross-entropy and accuracy of the IO name at the last position. Each batch
also carries ``corrupt_input_ids``, the ABC variant (the second subject replaced by a third name) used for
activation patching, ``name_tokens``, the ids of all names, and ``io_mask`` / ``s_mask`` ``[batch, seq]``, the
positions of the indirect object's and the subject's names (the name-mover detector's targets and controls).

Two layouts. ``templates`` (the default, unchanged) is the naive format above. Adhikari 2025 (arXiv 2510.25013)
shows that a 1-layer, 2-head model solves it with "additive and contrastive" heads, without name movers. The
``clauses`` layout (issue 19) removes the shortcuts the naive format allows:

* every token is a random filler drawn per sequence, except the names and the final token, a fixed query token
  (``n_names``, "... gave a drink to"), never a name;
* the first clause holds ``k`` names, uniform in ``2 .. max_first_names``, one filler apart ("A and B and C"), at a
  random offset; then ``1 + gap`` random fillers, ``gap`` uniform in ``0 .. max_gap``; then the second clause's name
  S2; then at least one filler before the query token;
* S2 repeats one of the first clause's names, chosen uniformly, and the target is uniform over the *other* first
  names (soft when ``k = 3``); with probability ``abc_fraction`` S2 is a new name instead (ABC) and the target is
  uniform over all ``k`` first names;
* with probability ``distractor_fraction`` an IOI sequence (not an ABC one) also holds a distractor, a new name at a
  random position between S2 and the query token: the last name is then not the subject, and the target is unchanged
  (the distractor was never in the first clause).

Soft targets: ``target_probs`` ``[batch, n_names]`` holds the distribution; ``targets`` holds one name drawn from it,
so the usual cross-entropy has the soft cross-entropy as its expectation (``E_{y ~ p}[-log q_y] = H(p, q)``).
``io_mask`` marks the answer names' mentions, ``s_mask`` S2's mentions. The ``ioi`` split (the detection and
ablation batches) is the two-name IOI case of the same layout (``k = 2``, no ABC), on which ABBA and BABA are defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from data.tasks.base import IGNORE, Batch, Task, randint, uniform_int

LAYOUTS = ("templates", "clauses")


@dataclass(frozen=True)
class IOITask(Task):
    """Names are ids ``0 .. n_names - 1``; filler words follow; templates are drawn once from ``template_seed``.
    ``layout``, ``max_gap``, ``max_first_names``, ``abc_fraction`` and ``distractor_fraction``: see the module
    docstring."""

    name = "ioi"
    role = "name_mover"
    splits = ("train", "ioi")
    eval_split = "ioi"
    zero_options = frozenset({"max_gap"})

    n_names: int = 24
    n_fillers: int = 40
    n_templates: int = 8
    length: int = 14
    template_seed: int = 1234
    layout: str = "templates"
    max_gap: int = 0
    max_first_names: int = 2
    abc_fraction: float = 0.0
    distractor_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.length < 7:
            raise ValueError(f"length {self.length} too short for an IOI template (needs >= 7)")
        if self.n_names < 3:
            raise ValueError("IOI needs at least 3 names (the ABC corruption uses a third)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.layout == "templates":
            if (self.max_gap, self.max_first_names, self.abc_fraction, self.distractor_fraction) != (0, 2, 0.0, 0.0):
                raise ValueError("max_gap, max_first_names, abc_fraction and distractor_fraction need layout='clauses'")
            return
        self._check_clauses()

    def _check_clauses(self) -> None:
        if self.max_first_names not in (2, 3):
            raise ValueError(f"max_first_names={self.max_first_names}; choose 2 or 3")
        for option in ("abc_fraction", "distractor_fraction"):
            if not 0 <= getattr(self, option) <= 1:
                raise ValueError(f"{option}={getattr(self, option)} is not between 0 and 1")
        if self.n_names < self.max_first_names + 2 or self.n_fillers < 2:
            raise ValueError("the clauses layout needs max_first_names + 2 names and at least 2 fillers")
        need = 5 + 2 * (self.max_first_names - 1) + self.max_gap
        if self.length < need:
            raise ValueError(f"length {self.length} too short for max_first_names={self.max_first_names} and "
                             f"max_gap={self.max_gap} (needs >= {need})")

    @property
    def query_token(self) -> int:
        """The final token of every ``clauses`` sequence (a filler id reserved for it)."""
        return self.n_names

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
        if self.layout == "clauses":
            return self._clauses(batch_size, generator, split)
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

    def _clauses(self, n: int, generator: torch.Generator, split: str) -> Batch:
        """A batch of the ``clauses`` layout (see the module docstring); the ``ioi`` split has two first names and no
        ABC sequences."""
        top = self.max_first_names if split == "train" else 2
        k = uniform_int(2, top, n, generator)  # [B] first-clause names
        abc = torch.rand(n, generator=generator) < (self.abc_fraction if split == "train" else 0.0)
        tokens = self.n_names + 1 + randint(self.n_fillers - 1, (n, self.length), generator)
        tokens[:, -1] = self.query_token
        names = torch.rand(n, self.n_names, generator=generator).argsort(dim=1)[:, : top + 2]  # [B, top + 2] distinct
        gap = uniform_int(0, self.max_gap, n, generator)
        offset = uniform_int(0, self.length - 5 - 2 * (k - 1) - gap, n, generator)
        slots = torch.arange(top)
        first = offset[:, None] + 2 * slots  # [B, top]: the first clause's name positions
        valid = slots[None, :] < k[:, None]
        rows = torch.arange(n)
        tokens[rows[:, None].expand_as(first)[valid], first[valid]] = names[:, :top][valid]
        repeated = names[rows, (torch.rand(n, generator=generator) * k).long()]
        subject = torch.where(abc, names[:, top], repeated)  # S2: a first name, or (ABC) a new one
        s2 = offset + 2 * (k - 1) + 2 + gap
        tokens[rows, s2] = subject
        if self.distractor_fraction and split == "train":
            self._distract(tokens, ~abc, s2, names[:, top + 1], generator)
        return self._clause_batch(tokens, names[:, :top], valid, subject, names[:, top], s2, generator)

    def _distract(self, tokens: torch.Tensor, allowed: torch.Tensor, s2: torch.Tensor, distractor: torch.Tensor,
                  generator: torch.Generator) -> None:
        """Put ``distractor`` ``[B]`` at a random position between S2 and the query token of a
        ``distractor_fraction`` share of the ``allowed`` sequences (in place)."""
        n = tokens.shape[0]
        chosen = allowed & (torch.rand(n, generator=generator) < self.distractor_fraction)
        where = uniform_int(s2 + 1, self.length - 2, n, generator)
        rows = torch.arange(n)[chosen]
        tokens[rows, where[chosen]] = distractor[chosen]

    def _clause_batch(self, tokens: torch.Tensor, first: torch.Tensor, valid: torch.Tensor, subject: torch.Tensor,
                      new_name: torch.Tensor, s2: torch.Tensor, generator: torch.Generator) -> Batch:
        """Soft and drawn targets, masks and the ABC corruption of ``clauses`` sequences ``tokens`` ``[B, T]``;
        ``first`` ``[B, top]`` the first clause's names (``valid`` where present), ``subject`` S2's name."""
        n = tokens.shape[0]
        answer = valid & (first != subject[:, None])  # [B, top]
        probs = torch.zeros(n, self.n_names)
        probs.scatter_add_(1, first, answer.float())
        probs = probs / probs.sum(1, keepdim=True)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        is_answer = (tokens[:, :, None] == torch.where(answer, first, -1)[:, None, :]).any(-1)  # [B, T]
        corrupt = tokens.clone()
        corrupt[torch.arange(n), s2] = new_name
        return {
            "input_ids": tokens,
            "targets": targets,
            "target_probs": probs,
            "corrupt_input_ids": corrupt,
            "name_tokens": torch.arange(self.n_names),
            "io_mask": is_answer,
            "s_mask": tokens == subject[:, None],
        }
