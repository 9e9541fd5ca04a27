"""Reference groups of heads for the group checks: uniform draws over all heads (the permutation test of
:func:`roles.mapping.group_check`) and draws matched in depth (as many heads in each layer as the tested set: the
knockout and patching group checks, :mod:`roles.memory_knockout`, and the steering check's random head sets,
:mod:`roles.stages.truth_steering`)."""

from __future__ import annotations

import itertools
import math

import torch

Head = tuple[int, int]


def random_groups(heads: list[tuple[int, int]], shape: tuple[int, int], draws: int, seed: int
                  ) -> list[list[tuple[int, int]]]:
    """The reference groups of :func:`group_check`: groups of ``len(heads)`` heads drawn uniformly from all heads.

    This makes the check a permutation test: under the null the detected set is one more uniform draw, so
    ``P(p <= alpha) <= alpha``. When the model has at most ``draws + 1`` such groups, every other group, once
    each, in random order (the exact test; its smallest p is ``1 / C(heads, k)``); otherwise ``draws`` Monte Carlo
    draws. Drawing from the *other* heads only, as before, is not a permutation test: on random 8-head toy models a
    random pair beat the disjoint pairs at p <= 0.05 in 6 of 100 tries (``python -m roles.calibrate``), since a
    pair holding a model's most harmful head beats every pair without it. A group carried by one head is, in
    turn, not special here (random groups may hold that head too): the group criterion asks what the heads do
    together, the single-head criterion what each does."""
    everyone = [(a, b) for a in range(shape[0]) for b in range(shape[1])]
    generator = torch.Generator().manual_seed(seed)
    if math.comb(len(everyone), len(heads)) <= draws + 1:
        groups = [list(g) for g in itertools.combinations(everyone, len(heads)) if sorted(g) != sorted(heads)]
        return [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    return [[everyone[i] for i in torch.randperm(len(everyone), generator=generator)[: len(heads)].tolist()]
            for _ in range(draws)]


def depth_matched_groups(detected: torch.Tensor, n_groups: int, seed: int) -> torch.Tensor:
    """``n_groups`` random groups with as many heads in each layer as ``detected`` ``[L, H]`` has, drawn from that
    layer's undetected heads (from all its heads when too few are left): bool ``[n_groups, L, H]``."""
    generator = torch.Generator().manual_seed(seed)
    groups = torch.zeros(n_groups, *detected.shape, dtype=torch.bool)
    for layer in range(detected.shape[0]):
        k = int(detected[layer].sum())
        if k == 0:
            continue
        pool = (~detected[layer]).nonzero().flatten()
        if len(pool) < k:
            pool = torch.arange(detected.shape[1])
        for g in range(n_groups):
            groups[g, layer, pool[torch.randperm(len(pool), generator=generator)[:k]]] = True
    return groups


def distinct_matched_groups(detected: torch.Tensor) -> int:
    """How many different depth-matched groups exist (the Monte Carlo p-value cannot resolve below ``1 / that``)."""
    count = 1
    for layer in range(detected.shape[0]):
        k = int(detected[layer].sum())
        free = int((~detected[layer]).sum())
        count *= math.comb(free if free >= k else detected.shape[1], k)
    return count
