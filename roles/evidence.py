"""What a detector measures about every head: an effect size, the same statistic on matched controls, and the
paired per-sample differences the significance test runs on.

A score alone cannot say whether a head *has* a function: random heads reach moderate scores, and a head that
attends to everything near the query scores on "previous token" too. So every detector also measures the same head
on **matched control** keys (for attention detectors) or tokens (for weight detectors): keys at a similar distance
that do not stand in the relation, or tokens the map should not produce. A head passes the control when it prefers
the targets over the controls consistently across independent samples (sequences, tokens), by a one-sided paired
t-test (:func:`headlab.statistics.paired_greater_p`); the verdict corrects those p-values over every test of the run
(:mod:`roles.rule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.statistics import paired_greater_p


@dataclass(frozen=True)
class Evidence:
    """One detector on every head: ``score`` and ``control`` ``[layer, head]``; ``differences`` ``[samples, layer,
    head]`` (target minus control per independent sample; NaN where a sample had no matched pair)."""

    score: torch.Tensor
    control: torch.Tensor
    differences: torch.Tensor

    def p_values(self) -> torch.Tensor:
        """One-sided p-value ``[layer, head]`` that the head prefers targets over controls."""
        return torch.from_numpy(paired_greater_p(self.differences.double().numpy())).float()

    @property
    def samples(self) -> int:
        return int(self.differences.shape[0])


def shifted(mask: torch.Tensor, delta: int) -> torch.Tensor:
    """``out[..., j] = mask[..., j - delta]`` along the key axis, False where ``j - delta`` falls outside."""
    out = torch.zeros_like(mask)
    if delta > 0:
        out[..., delta:] = mask[..., :-delta]
    elif delta < 0:
        out[..., :delta] = mask[..., -delta:]
    else:
        out = mask.clone()
    return out


def masked_attention(patterns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean attention mass on the designated keys, over the queries that have any.

    ``score[l, h] = mean_{(b, i): M_bi != {}} sum_{j in M_bi} A[b, l, h, i, j]``; ``patterns``
    ``[batch, layer, head, query, key]``, ``mask`` bool ``[batch, query, key]``. Every attention detector's score is
    this function with its own mask.
    """
    mask = mask.to(patterns.dtype)[:, None, None]  # [B, 1, 1, T, T]
    has_key = mask.sum(-1) > 0  # [B, 1, 1, T]
    mass = (patterns * mask).sum(-1)  # [B, L, H, T]
    n_queries = has_key.sum()
    if n_queries == 0:
        return torch.zeros(patterns.shape[1:3])
    return (mass * has_key).sum(dim=(0, 3)) / n_queries


def attention_evidence(patterns: torch.Tensor, target: torch.Tensor, delta: int, allowed: torch.Tensor) -> Evidence:
    """Evidence of an attention detector whose control for target key ``j`` is key ``j + delta``.

    ``target`` and ``allowed`` are bool ``[batch, query, key]``. The control key of a target must be ``allowed``
    (e.g. earlier than the query) and not itself a target; targets without such a control are left out of the
    comparison (not of the score). Per query ``i``: ``t_i`` = attention on its matched targets, ``c_i`` = attention
    on their controls (one control per target, so the two are in the same units); per sequence, the mean of
    ``t_i - c_i`` over its queries is one sample. ``control`` is the mean ``c_i`` over matched queries.
    """
    control_keys = shifted(target, delta) & allowed & ~target  # [B, T, T]
    matched = shifted(control_keys, -delta) & target
    pairs = matched.any(-1)  # [B, T]: queries with a matched pair
    weights = patterns.to(torch.float64)
    t = (weights * matched[:, None, None]).sum(-1)  # [B, L, H, T]
    c = (weights * control_keys[:, None, None]).sum(-1)
    per_query = pairs[:, None, None].to(torch.float64)
    counts = per_query.sum(-1)  # [B, 1, 1]
    differences = ((t - c) * per_query).sum(-1) / counts  # [B, L, H]; NaN (0 / 0) for sequences without pairs
    total = pairs.sum()
    control = (c * per_query).sum((0, 3)) / total if total else torch.zeros(patterns.shape[1:3], dtype=torch.float64)
    return Evidence(masked_attention(patterns, target), control.float(), differences.float())


def indicator_evidence(hits: torch.Tensor, control_hits: torch.Tensor) -> Evidence:
    """Evidence from per-sample 0/1 outcomes ``[..., samples]`` (e.g. "the successor is the top logit") and the same
    outcome for a matched control (e.g. "the token two steps on is the top logit"): score and control are the
    rates ``[...]``, the samples their differences ``[samples, ...]``."""
    hits, control_hits = hits.float(), control_hits.float()
    return Evidence(hits.mean(-1), control_hits.mean(-1), (hits - control_hits).movedim(-1, 0))
