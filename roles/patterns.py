"""Attention-pattern detectors: the share of attention each head puts on the keys a head function looks at.

Patterns are computed once per batch under eager attention and kept in ``batch["attentions"]``
``[batch, layer, head, query, key]``; pass that key to score hand-built patterns. Every detector here is
:func:`masked_attention` with its own mask.
"""

from __future__ import annotations

import torch
from torch import nn

from data.tasks import Batch
from headlab.errors import HeadlabError
from roles.registry import register


def use_eager_attention(model: nn.Module) -> None:
    """Switch a Hugging Face model to eager attention: under sdpa ``output_attentions=True`` returns nothing."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


@torch.no_grad()
def attention_patterns(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention patterns ``[batch, layer, head, query, key]`` of ``input_ids`` ``[batch, seq]`` (eager)."""
    use_eager_attention(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(input_ids=input_ids.to(device), output_attentions=True)
    finally:
        model.train(was_training)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise HeadlabError(
            f"{type(model).__name__} returned no attention patterns with output_attentions=True; load it with "
            "attn_implementation='eager' (sdpa and flash attention do not return patterns)"
        )
    return torch.stack([a.float().cpu() for a in attentions], dim=1)


def patterns_of(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """``batch["attentions"]`` if present, else the model's patterns on ``batch["input_ids"]`` (kept in batch)."""
    if "attentions" not in batch:
        if model is None:
            raise HeadlabError("a pattern detector needs a model or batch['attentions']")
        batch["attentions"] = attention_patterns(model, batch["input_ids"])
    return batch["attentions"]


def masked_attention(patterns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean attention mass on the designated keys, over the queries that have any.

    ``score[l, h] = mean_{(b, i): M_bi != {}} sum_{j in M_bi} A[b, l, h, i, j]``; ``patterns``
    ``[batch, layer, head, query, key]``, ``mask`` bool ``[batch, query, key]``. Every attention detector below is
    this function with its own mask.
    """
    mask = mask.to(patterns.dtype)[:, None, None]  # [B, 1, 1, T, T]
    has_key = mask.sum(-1) > 0  # [B, 1, 1, T]
    mass = (patterns * mask).sum(-1)  # [B, L, H, T]
    n_queries = has_key.sum()
    if n_queries == 0:
        return torch.zeros(patterns.shape[1:3])
    return (mass * has_key).sum(dim=(0, 3)) / n_queries


def _causal_offsets(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seq = input_ids.shape[1]
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    return i, j


@register("previous_token")
def previous_token_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Previous-token head: attention from each token to the one before it.

    ``score = mean_{b, i >= 1} A[i, i - 1]``. Source: Olsson et al. 2022, "In-context learning and induction heads"
    (previous-token heads are the first half of the induction circuit); Elhage et al. 2021.
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    return masked_attention(patterns_of(model, batch), (j == i - 1).expand(ids.shape[0], -1, -1))


@register("duplicate_token")
def duplicate_token_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Duplicate-token head: attention from a token to its earlier occurrences.

    ``score = mean_{(b, i): exists j < i, x_j = x_i} sum_{j < i, x_j = x_i} A[i, j]``. Source: Wang et al. 2022,
    "Interpretability in the Wild" (IOI duplicate-token heads).
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    same = ids[:, :, None] == ids[:, None, :]  # [B, T, T]
    return masked_attention(patterns_of(model, batch), same & (j < i))


@register("induction")
def induction_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Induction head, prefix-matching score: attention to the token that *followed* earlier occurrences.

    ``score = mean_{(b, i): exists 1 <= j < i, x_{j-1} = x_i} sum_{1 <= j < i, x_{j-1} = x_i} A[i, j]``.
    Source: Olsson et al. 2022, "In-context learning and induction heads", with its 2022 erratum (the key is
    the token *after* the earlier occurrence, ``j - 1`` matches ``i``, not ``j`` itself).
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    follows = torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1], dtype=torch.bool)
    follows[:, :, 1:] = ids[:, :, None] == ids[:, None, :-1]  # [B, i, j]: x_{j-1} == x_i
    return masked_attention(patterns_of(model, batch), follows & (j < i) & (j >= 1))


@register("attention_sink")
def attention_sink_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Attention sink: attention to the first token.

    ``score = mean_{b, i >= 1} A[i, 0]``. Source: Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks".
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    return masked_attention(patterns_of(model, batch), ((j == 0) & (i >= 1)).expand(ids.shape[0], -1, -1))


@register("iteration", requires=("input_ids", "iteration_mask"))
def iteration_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Iteration head: at the chain-of-thought step that produces ``s_t``, attention to the input bit ``x_t``.

    ``score = mean_{(b, i) CoT query} A[i, key(i)]`` with ``key(i) = i - n`` (the "diagonal" of the CoT-by-input
    block; the task's ``iteration_mask``). Source: Cabannes et al. 2024, "Iteration Head: A Mechanistic Study of
    Chain-of-Thought".
    """
    return masked_attention(patterns_of(model, batch), batch["iteration_mask"])


@register("operand_attention", requires=("input_ids", "operand_mask"))
def operand_attention_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Operand attention: attention from ``=`` to the operands ``a`` and ``b`` in ``a b =``.

    ``score = mean_b (A[=, a] + A[=, b])`` (the task's ``operand_mask``). Source: Nanda et al. 2023, "Progress
    measures for grokking via mechanistic interpretability" (the heads read both operands from ``=``).
    """
    return masked_attention(patterns_of(model, batch), batch["operand_mask"])

