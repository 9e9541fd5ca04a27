"""Iteration / parity with a chain of thought (Cabannes et al. 2024, "Iteration Head: A Mechanistic Study of
Chain-of-Thought").

Input: ``n`` random bits (``n`` uniform in ``min_bits..max_bits``), ``SEP`` (the end of input, EoI), then the chain
of thought ``s_1 .. s_n`` with ``s_t = s_{t-1} XOR x_t`` (``s_0 = 0``, so ``s_n`` is the parity), then ``PAD``. Every
CoT step is a target, and nothing else is (the loss covers only the tokens after ``SEP``): the position holding
``s_{t-1}`` (``SEP`` for ``t = 1``) predicts ``s_t``. Target head function:
the iteration head, which at that position attends to the input bit ``x_t`` (``iteration_mask`` marks it),
found by Cabannes et al. as a clean attention "diagonal". Metric: cross-entropy and accuracy of the CoT steps.
Tokens: 0, 1 (bits and states), 2 = SEP, 3 = PAD.

``prefix_max > 0`` puts a run of ``m`` filler tokens ``FILL`` (``m`` uniform in ``0..prefix_max``, a new token
after ``PAD``) before ``x_1``, so that no absolute position tells where ``x_t`` is: with ``m = 0`` always (the
default) ``x_1`` sits at position 0 and a layer-0 head can guess ``x_t`` from the query's position alone. With a
prefix, ``x_t`` is at ``m + t - 1``, ``SEP`` at ``m + n``, and the query for ``s_t`` at ``m + n + t - 1``: the key
is still ``query - n``. Cabannes et al. have no prefix (their sequences start with a task token); their lengths
vary over ``1..n_len``, which moves ``SEP`` but not ``x_1``. ``fill_vocab > 1`` draws each filler token uniformly
from ``fill_vocab`` distinct ids (``FILL .. FILL + fill_vocab - 1``) instead of repeating one.

``bos`` puts a start token ``BOS`` (the last id) at position 0, before any filler: Cabannes et al.'s task token, which
their sequences start with (``[task, x_1 .. x_L, EoI, y_1 .. y_L]``); it gives every head a fixed place to park its
attention. The key is still ``query - n``.

``rule="polynomial"`` is Cabannes et al.'s polynomial iteration instead of parity: inputs ``x_t`` uniform in
``1 .. modulus - 1``, ``s_t = s_{t-1} * x_t + 1 mod modulus`` (``s_0 = 0``; their ``modulus`` is 11), tokens
``0 .. modulus - 1`` for inputs and states, ``SEP = modulus``, ``PAD = modulus + 1``. Parity can also be computed
from a count of the ones seen so far (``s_t = sum x mod 2``, order-free), a shortcut an MLP learns for short
inputs; the polynomial map does not commute, so the step ``s_{t-1} -> s_t`` needs ``x_t`` itself, and Cabannes et
al. find its iteration head the fastest and sharpest to form ("bits" below are then the inputs ``x_t``).
``copy_first`` (polynomial only) makes the first step theirs, ``s_1 = x_1`` (``facebookresearch/pal``,
``src/cot/data``: ``y_1 = x_1``): without it ``s_1 = 0 * x_1 + 1 = 1`` for every input, so the EoI query, which
predicts ``s_1``, never needs ``x_1``, while the iteration circuit's diagonal counts that query's attention to
``x_1`` (a share ``1/n`` of each sequence's diagonal, ~0.26 of the score over lengths 1..12).
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
    zero_options = frozenset({"prefix_max"})

    min_bits: int = 8
    max_bits: int = 16
    rule: str = "parity"
    modulus: int = 11
    prefix_max: int = 0
    fill_vocab: int = 1
    bos: bool = False
    copy_first: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_bits <= self.max_bits:
            raise ValueError(f"need 1 <= min_bits <= max_bits, got {self.min_bits}, {self.max_bits}")
        if self.rule not in ("parity", "polynomial"):
            raise ValueError(f"rule {self.rule!r}: choose parity or polynomial")
        if self.modulus < 3:
            raise ValueError(f"modulus must be at least 3, got {self.modulus}")
        if self.prefix_max < 0:
            raise ValueError(f"prefix_max must be at least 0, got {self.prefix_max}")
        if self.copy_first and self.rule != "polynomial":
            raise ValueError("copy_first is an option of rule=polynomial (parity's s_1 is x_1 already)")
        if self.fill_vocab < 1:
            raise ValueError(f"fill_vocab must be at least 1, got {self.fill_vocab}")

    @property
    def n_symbols(self) -> int:
        """Input/state token ids ``0 .. n_symbols - 1``; then SEP, PAD (and FILL with a prefix)."""
        return 2 if self.rule == "parity" else self.modulus

    @property
    def sep(self) -> int:
        """The end-of-input token ``SEP`` (EoI)."""
        return self.n_symbols

    @property
    def n_fill(self) -> int:
        """Filler token ids (``FILL``, after ``PAD``): ``fill_vocab`` of them with a prefix, none without."""
        return self.fill_vocab if self.prefix_max else 0

    @property
    def bos_token(self) -> int | None:
        """The start token at position 0 (the last id), or None without ``bos``."""
        return self.n_symbols + 2 + self.n_fill if self.bos else None

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2 + self.n_fill + int(self.bos)

    @property
    def seq_len(self) -> int:
        return int(self.bos) + self.prefix_max + 2 * self.max_bits + 1

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        b, t = batch_size, self.seq_len
        n = uniform_int(self.min_bits, self.max_bits, b, generator)[:, None]  # [B, 1]
        m = torch.zeros_like(n)
        if self.prefix_max:
            m = uniform_int(0, self.prefix_max, b, generator)[:, None]  # filler tokens before x_1
        pos = torch.arange(t)[None, :]  # [1, T]
        start = m + int(self.bos)  # the position of x_1
        rel = pos - start  # position relative to x_1
        sep, pad = self.n_symbols, self.n_symbols + 1
        fill = sep + 2
        if self.fill_vocab > 1 and self.prefix_max:
            fill = fill + randint(self.fill_vocab, (b, t), generator)  # one filler id per position
        if self.rule == "parity":
            bits = randint(2, (b, t), generator) * (pos < n)  # x_1..x_n in columns 0..n-1
            states = bits.cumsum(dim=1) % 2  # states[:, k] = s_{k+1}
        else:
            bits = (1 + randint(self.modulus - 1, (b, t), generator)) * (pos < n)
            states = torch.zeros_like(bits)
            s = torch.zeros(b, dtype=torch.long)
            for k in range(t):  # s_{k+1} = s_k * x_{k+1} + 1 (values past n are never read)
                s = bits[:, k] if k == 0 and self.copy_first else (s * bits[:, k] + 1) % self.modulus
                states[:, k] = s
        inputs = bits.gather(1, rel.clamp(min=0))  # x_{rel+1} at position m + rel
        cot = states.gather(1, (rel - n - 1).clamp(min=0))  # position m + n + t holds s_t
        tokens = torch.where(rel < n, inputs, torch.where(rel == n, sep, torch.where(rel <= 2 * n, cot, pad)))
        tokens = torch.where(rel < 0, fill, tokens)
        if self.bos:
            tokens[:, 0] = self.bos_token
        is_query = (rel >= n) & (rel < 2 * n)  # positions predicting s_1 .. s_n
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = torch.where(is_query[:, :-1], tokens[:, 1:], IGNORE)
        # the query at position m + n + t - 1 should attend to x_t at position m + t - 1: key = query - n
        key = pos[0][None, :, None] == (pos[0][None, None, :] + n[:, :, None])  # [B, T(query), T(key)]
        iteration_mask = key & is_query[:, :, None]
        return {"input_ids": tokens, "targets": targets, "iteration_mask": iteration_mask}
