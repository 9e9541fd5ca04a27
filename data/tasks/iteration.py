"""Iteration / parity with a chain of thought (Cabannes et al. 2024, "Iteration Head: A Mechanistic Study of
Chain-of-Thought").

Input: ``n`` random bits (``n`` uniform in ``min_bits..max_bits``), ``SEP``, then the chain of thought
``s_1 .. s_n`` with ``s_t = s_{t-1} XOR x_t`` (``s_0 = 0``, so ``s_n`` is the parity), then ``PAD``. Every CoT
step is a target: the position holding ``s_{t-1}`` (``SEP`` for ``t = 1``) predicts ``s_t``. Target head function:
the iteration head, which at that position attends to the input bit ``x_t`` (``iteration_mask`` marks it),
found by Cabannes et al. as a clean attention "diagonal". Metric: cross-entropy and accuracy of the CoT steps.
Tokens: 0, 1 (bits and states), 2 = SEP, 3 = PAD.

``rule="polynomial"`` is Cabannes et al.'s polynomial iteration instead of parity: inputs ``x_t`` uniform in
``1 .. modulus - 1``, ``s_t = s_{t-1} * x_t + 1 mod modulus`` (``s_0 = 0``; their ``modulus`` is 11), tokens
``0 .. modulus - 1`` for inputs and states, ``SEP = modulus``, ``PAD = modulus + 1``. Parity can also be computed
from a count of the ones seen so far (``s_t = sum x mod 2``, order-free), a shortcut an MLP learns for short
inputs; the polynomial map does not commute, so the step ``s_{t-1} -> s_t`` needs ``x_t`` itself, and Cabannes et
al. find its iteration head the fastest and sharpest to form ("bits" below are then the inputs ``x_t``).
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
    rule: str = "parity"
    modulus: int = 11

    def __post_init__(self) -> None:
        if not 1 <= self.min_bits <= self.max_bits:
            raise ValueError(f"need 1 <= min_bits <= max_bits, got {self.min_bits}, {self.max_bits}")
        if self.rule not in ("parity", "polynomial"):
            raise ValueError(f"rule {self.rule!r}: choose parity or polynomial")
        if self.modulus < 3:
            raise ValueError(f"modulus must be at least 3, got {self.modulus}")

    @property
    def n_symbols(self) -> int:
        """Input/state token ids ``0 .. n_symbols - 1``; then SEP, PAD."""
        return 2 if self.rule == "parity" else self.modulus

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def seq_len(self) -> int:
        return 2 * self.max_bits + 1

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        b, t = batch_size, self.seq_len
        n = uniform_int(self.min_bits, self.max_bits, b, generator)[:, None]  # [B, 1]
        pos = torch.arange(t)[None, :]  # [1, T]
        sep, pad = self.n_symbols, self.n_symbols + 1
        if self.rule == "parity":
            bits = randint(2, (b, t), generator) * (pos < n)  # x_1..x_n at positions 0..n-1
            states = bits.cumsum(dim=1) % 2  # states[:, k] = s_{k+1}
        else:
            bits = (1 + randint(self.modulus - 1, (b, t), generator)) * (pos < n)
            states = torch.zeros_like(bits)
            s = torch.zeros(b, dtype=torch.long)
            for k in range(t):  # s_{k+1} = s_k * x_{k+1} + 1 (values past n are never read)
                s = (s * bits[:, k] + 1) % self.modulus
                states[:, k] = s
        cot = states.gather(1, (pos - n - 1).clamp(min=0).expand(b, t))  # position n + t holds s_t
        tokens = torch.where(pos < n, bits, torch.where(pos == n, sep, torch.where(pos <= 2 * n, cot, pad)))
        is_query = (pos >= n) & (pos < 2 * n)  # positions predicting s_1 .. s_n
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = torch.where(is_query[:, :-1], tokens[:, 1:], IGNORE)
        # the query at position n + t - 1 should attend to x_t at position t - 1: key = query - n
        key = pos[0][None, :, None] == (pos[0][None, None, :] + n[:, :, None])  # [B, T(query), T(key)]
        iteration_mask = key & is_query[:, :, None]
        return {"input_ids": tokens, "targets": targets, "iteration_mask": iteration_mask}
