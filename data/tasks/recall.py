"""Multi-query associative recall: key-value pairs, then query keys each followed by its value (Ba et al. 2016;
MQAR from Zoology, Arora et al. 2023).

Target head function: induction (the head at a query key attends to the token after the key's earlier
occurrence, its value, and copies it). Metric: cross-entropy (and accuracy) of the value at each query key.
Keys ``0 .. n_keys - 1``, values ``n_keys .. n_keys + n_values - 1``; keys within a sequence are distinct, and
so are the ``n_queries`` queried keys.

Difficulty grows steeply with ``n_pairs`` for small models: a 2-layer attention-only model (d_model 64, 1 or 4
heads) forms the previous-token + induction circuit within a few hundred steps with 4 pairs, but with 6 or more
(32 keys) it stays on a plateau where it guesses among the context's values, for every learning rate (3e-4 to
1e-2), width (64, 128), positional scheme (learned, rotary, shortformer), depth (2, 3), MLP on or off, batch
size (64, 256) and left-padded mixture of 2..12 pairs tried (up to 8000 steps here; 30k in an earlier run).
With only 8 distinct keys, 6 or 8 pairs are learned at once. The targets are not at fault: the 4-pair task is
solved to 100% accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.tasks.base import IGNORE, Batch, Task, randint


@dataclass(frozen=True)
class RecallTask(Task):
    name = "recall"
    role = "induction"

    n_keys: int = 32
    n_values: int = 32
    n_pairs: int = 12
    n_queries: int = 4

    def __post_init__(self) -> None:
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs {self.n_pairs} exceeds n_keys {self.n_keys} (keys are distinct)")
        if not 1 <= self.n_queries <= self.n_pairs:
            raise ValueError(f"n_queries {self.n_queries} must lie in [1, n_pairs={self.n_pairs}]")

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        return 2 * (self.n_pairs + self.n_queries)

    def _sample(self, batch_size: int, generator: torch.Generator, split: str) -> Batch:
        n = batch_size
        keys = torch.rand(n, self.n_keys, generator=generator).argsort(dim=1)[:, : self.n_pairs]  # [B, P]
        values = self.n_keys + randint(self.n_values, (n, self.n_pairs), generator)  # [B, P]
        which = torch.rand(n, self.n_pairs, generator=generator).argsort(dim=1)[:, : self.n_queries]  # [B, Q]
        pairs = torch.stack((keys, values), dim=2).flatten(1)  # [B, 2P]: k1 v1 k2 v2 ...
        queries = torch.stack((keys.gather(1, which), values.gather(1, which)), dim=2).flatten(1)  # [B, 2Q]
        tokens = torch.cat((pairs, queries), dim=1)  # [B, 2P + 2Q]
        targets = torch.full_like(tokens, IGNORE)
        query_pos = 2 * self.n_pairs + 2 * torch.arange(self.n_queries)  # each query key predicts its value
        targets[:, query_pos] = tokens[:, query_pos + 1]
        return {"input_ids": tokens, "targets": targets}
