"""Null distributions: what a detector scores on heads with no function, from random initialisations of the
same architecture."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from data.tasks import Batch
from headlab.errors import HeadlabError
from roles.registry import score_heads


@dataclass(frozen=True)
class NullStats:
    """A detector's score distribution over every head of randomly initialised copies of the architecture."""

    mean: float
    std: float
    n: int

    def threshold(self, n_sigma: float) -> float:
        return self.mean + n_sigma * self.std


def random_init_copy(model: nn.Module, seed: int, init_std: float | None = None) -> nn.Module:
    """A freshly initialised model of the same architecture and config (eager attention).

    ``init_std`` overrides ``config.initializer_range`` (when the config has one).
    """
    config = copy.deepcopy(model.config)
    if init_std is not None and hasattr(config, "initializer_range"):
        config.initializer_range = init_std
    torch.manual_seed(seed)
    if hasattr(type(model), "_from_config"):
        fresh = type(model)._from_config(config, attn_implementation="eager")
    else:
        fresh = type(model)(config)
    return fresh.eval()


def null_distribution(
    model: nn.Module,
    batch: Batch,
    names: Iterable[str] | None = None,
    n_models: int = 5,
    seed: int = 10_000,
    unit_logits: bool = True,
) -> dict[str, NullStats]:
    """Score ``n_models`` random initialisations of ``model``'s architecture on ``batch``; pool every head.

    With ``unit_logits`` (default) the copies are initialised with ``std = hidden_size ** -0.5`` (``** -0.25``
    for a toy model without LayerNorm), which gives attention logits of order one: random heads then have
    sharp but *arbitrary* patterns. At the usual small training init (std 0.02) every head attends almost
    uniformly, the null spread collapses to ~1e-4 and any trained head would pass; the null should instead
    say what a head with no particular function scores.
    """
    if n_models < 2:
        raise HeadlabError(f"n_null={n_models}: a null distribution needs at least 2 random initialisations")
    hidden = getattr(model.config, "hidden_size", None)
    power = -0.25 if getattr(model.config, "layer_norm", True) is False else -0.5
    init_std = hidden**power if unit_logits and hidden else None
    pooled: dict[str, list[torch.Tensor]] = {}
    for k in range(n_models):
        fresh = random_init_copy(model, seed + k, init_std)
        for name, scores in score_heads(fresh, batch, names).items():
            pooled.setdefault(name, []).append(scores.flatten())
        del fresh
    stats = {}
    for name, values in pooled.items():
        v = torch.cat(values).double()
        stats[name] = NullStats(float(v.mean()), float(v.std()), int(v.numel()))
    return stats
