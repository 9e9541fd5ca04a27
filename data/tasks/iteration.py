"""Iteration / parity with a chain of thought (Cabannes et al. 2024, "Iteration Head: A Mechanistic Study of
Chain-of-Thought").

Input: ``n`` random bits (``n`` uniform in ``min_bits..max_bits``), ``SEP``, then the chain of thought
``s_1 .. s_n`` with ``s_t = s_{t-1} XOR x_t`` (``s_0 = 0``, so ``s_n`` is the parity), then ``PAD``. Every CoT
step is a target: the position holding ``s_{t-1}`` (``SEP`` for ``t = 1``) predicts ``s_t``. Target head function:
the iteration head, which at that position attends to the input bit ``x_t`` (``iteration_mask`` marks it),
found by Cabannes et al. as a clean attention "diagonal". Metric: cross-entropy and accuracy of the CoT steps.
Tokens: 0, 1 (bits and states), 2 = SEP, 3 = PAD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.tasks.base import IGNORE, Batch, Task, randint, uniform_int

SEP, PAD = 2, 3


@dataclass(frozen=True)
class IterationTask(Task):
    name = "iteration"
    role = "iteration"

    min_bits: int = 8
    max_bits: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.min_bits <= self.max_bits:
            raise ValueError(f"need 1 <= min_bits <= max_bits, got {self.min_bits}, {self.max_bits}")

    @property
    def vocab_size(self) -> int:
        return 4

    @property
    def seq_len(self) -> int:
        return 2 * self.max_bits + 1

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        b, t = batch_size, self.seq_len
        n = uniform_int(self.min_bits, self.max_bits, b, generator)[:, None]  # [B, 1]
        pos = torch.arange(t)[None, :]  # [1, T]
        bits = randint(2, (b, t), generator) * (pos < n)  # x_1..x_n at positions 0..n-1
        states = bits.cumsum(dim=1) % 2  # states[:, k] = s_{k+1}
        cot = states.gather(1, (pos - n - 1).clamp(min=0).expand(b, t))  # position n + t holds s_t
        tokens = torch.where(pos < n, bits, torch.where(pos == n, SEP, torch.where(pos <= 2 * n, cot, PAD)))
        is_query = (pos >= n) & (pos < 2 * n)  # positions predicting s_1 .. s_n
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = torch.where(is_query[:, :-1], tokens[:, 1:], IGNORE)
        # the query at position n + t - 1 should attend to x_t at position t - 1: key = query - n
        key = pos[0][None, :, None] == (pos[0][None, None, :] + n[:, :, None])  # [B, T(query), T(key)]
        iteration_mask = key & is_query[:, :, None]
        return {"input_ids": tokens, "targets": targets, "iteration_mask": iteration_mask}
