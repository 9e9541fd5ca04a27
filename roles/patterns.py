"""Attention-pattern detectors: how much of each head's attention goes to the keys a head function looks at, and
how much to matched control keys (:mod:`roles.evidence`).

Patterns are computed once per batch under eager attention and kept in ``batch["attentions"]``
``[batch, layer, head, query, key]``; pass that key to score hand-built patterns. Keys count only when they come
*before* the query (as in a causal model; encoders are scored the same way). Each detector's control:

===================  =====================================  =====================================================
detector             target key of query ``i``              control key (a similar distance, not a target)
===================  =====================================  =====================================================
previous_token       ``i - 1``                              ``i - 2``
duplicate_token      earlier ``j`` with ``x_j = x_i``       ``j - 1``, the token before that occurrence
induction            ``j`` with ``x_{j-1} = x_i``           ``j + 1``, the token after a non-matching position
attention_sink       ``0`` (BOS / CLS / first token)        ``1``
iteration            input bit ``x_t`` (``i - n``)          the bit before it
operand_attention    both ``a`` and ``b`` from ``=``        ``=`` itself (a chance-corrected score)
===================  =====================================  =====================================================
"""

from __future__ import annotations

import torch
from torch import nn

from data.tasks import Batch
from headlab.errors import HeadlabError
from headlab.models import input_device
from roles.evidence import Evidence, attention_evidence, masked_attention
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
        device = input_device(model)
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


def _grid(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query and key indices ``[T, 1]``, ``[1, T]`` and the batch size."""
    n, seq = batch["input_ids"].shape
    return torch.arange(seq)[:, None], torch.arange(seq)[None, :], n


def _earlier(batch: Batch) -> torch.Tensor:
    i, j, n = _grid(batch)
    return (j < i).expand(n, -1, -1)


@register("previous_token")
def previous_token(model: nn.Module | None, batch: Batch) -> Evidence:
    """Previous-token head: attention from each token to the one before it.

    ``score = mean_{b, i >= 1} A[i, i - 1]``; control key ``i - 2``. Source: Olsson et al. 2022, "In-context
    learning and induction heads" (previous-token heads are the first half of the induction circuit).
    """
    i, j, n = _grid(batch)
    return attention_evidence(patterns_of(model, batch), (j == i - 1).expand(n, -1, -1), -1, _earlier(batch))


@register("duplicate_token")
def duplicate_token(model: nn.Module | None, batch: Batch) -> Evidence:
    """Duplicate-token head: attention from a token to its earlier occurrences.

    ``score = mean_{(b, i): exists j < i, x_j = x_i} sum_{j < i, x_j = x_i} A[i, j]``; control: the token before
    each occurrence. Source: Wang et al. 2022, "Interpretability in the Wild" (IOI duplicate-token heads).
    """
    ids = batch["input_ids"]
    same = ids[:, :, None] == ids[:, None, :]  # [B, T, T]
    return attention_evidence(patterns_of(model, batch), same & _earlier(batch), -1, _earlier(batch))


@register("induction")
def induction(model: nn.Module | None, batch: Batch) -> Evidence:
    """Induction head, prefix-matching score: attention to the token that *followed* earlier occurrences.

    ``score = mean_{(b, i): exists 1 <= j < i, x_{j-1} = x_i} sum_{1 <= j < i, x_{j-1} = x_i} A[i, j]``; control:
    the token after the target (it follows a non-matching position). Source: Olsson et al. 2022, "In-context
    learning and induction heads", with its 2022 erratum (the key is the token *after* the earlier occurrence).
    """
    ids = batch["input_ids"]
    i, j, _ = _grid(batch)
    follows = torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1], dtype=torch.bool)
    follows[:, :, 1:] = ids[:, :, None] == ids[:, None, :-1]  # [B, i, j]: x_{j-1} == x_i
    return attention_evidence(patterns_of(model, batch), follows & (j < i) & (j >= 1), 1, _earlier(batch))


@register("attention_sink")
def attention_sink(model: nn.Module | None, batch: Batch) -> Evidence:
    """Attention sink: attention to the first token (BOS, or CLS in an encoder).

    ``score = mean_{b, i >= 1} A[i, 0]``; control key ``1``. Source: Xiao et al. 2023, "Efficient Streaming
    Language Models with Attention Sinks".
    """
    i, j, n = _grid(batch)
    return attention_evidence(patterns_of(model, batch), ((j == 0) & (i >= 1)).expand(n, -1, -1), 1, _earlier(batch))


@register("iteration", requires=("input_ids", "iteration_mask"))
def iteration(model: nn.Module | None, batch: Batch) -> Evidence:
    """Iteration head: at the chain-of-thought step that produces ``s_t``, attention to the input bit ``x_t``.

    ``score = mean_{(b, i) CoT query} A[i, key(i)]`` with ``key(i) = i - n`` (the "diagonal" of the CoT-by-input
    block; the task's ``iteration_mask``); control: the input bit before it. Source: Cabannes et al. 2024,
    "Iteration Head: A Mechanistic Study of Chain-of-Thought".
    """
    return attention_evidence(patterns_of(model, batch), batch["iteration_mask"], -1, _earlier(batch))


@register("operand_attention", requires=("input_ids", "operand_mask"))
def operand_attention(model: nn.Module | None, batch: Batch) -> Evidence:
    """Operand attention: from ``=``, attention that reaches *every* operand of ``a b =``, beyond chance.

    ``score = mean_b k (min_{j in ops} A[=, j] - A[=, =])`` over the queries with ``k >= 2`` operand keys (the
    task's ``operand_mask``); control: ``k A[=, =]``, the same mass on ``=`` itself. The score is 1 when ``=``
    splits its attention evenly over the operands and leaves itself none, 0 for uniform attention (``1/3`` on each
    of the 3 keys), at most 0 for a head that reads one operand only, and -k for one that stays on ``=``. The paired
    test runs on the per-sequence scores. Source: Nanda et al. 2023, "Progress measures for grokking via
    mechanistic interpretability": the heads at ``=`` read ``sin``/``cos`` of both ``a`` and ``b``, which the MLP
    multiplies; a head that reads one operand cannot feed that product.

    Why not the attention mass on the operands: on three keys uniform attention puts 2/3 on them, and a random
    sharp head lands on an operand 2 times in 3, so 28-40% of the heads of random models cleared the 0.3 floor
    (``python -m roles.calibrate``); requiring both operands, above the share left on ``=``, removes both.
    """
    patterns = patterns_of(model, batch).to(torch.float64)  # [B, L, H, T, T]
    ops = batch["operand_mask"]  # [B, T, T]
    k = ops.sum(-1)  # [B, T]: operand keys of each query
    queries = k >= 2
    on_ops = torch.where(ops[:, None, None], patterns, torch.inf).amin(-1)  # [B, L, H, T]: min over operands
    own = torch.diagonal(patterns, dim1=-2, dim2=-1)  # [B, L, H, T]: A[i, i]
    weight = queries[:, None, None].to(torch.float64)
    counts = weight.sum(-1)  # [B, 1, 1]
    kk = k[:, None, None].to(torch.float64)
    per_sequence = (torch.where(queries[:, None, None], kk * (on_ops - own), 0.0)).sum(-1) / counts  # NaN: none
    control = (torch.where(queries[:, None, None], kk * own, 0.0)).sum((0, 3)) / counts.sum().clamp_min(1)
    has = counts[:, 0, 0] > 0
    score = per_sequence[has].mean(0) if has.any() else torch.zeros(patterns.shape[1:3], dtype=torch.float64)
    return Evidence(score.float(), control.float(), per_sequence.float())


@register("name_mover", requires=("input_ids", "io_mask", "s_mask"))
def name_mover(model: nn.Module | None, batch: Batch) -> Evidence:
    """Name mover, attention half: from the final position, attention to the indirect object (IO) name.

    ``score = mean_b A[END, IO]``; control: the mean attention per subject (S) name token, scaled to the IO's
    token count. ``io_mask`` and ``s_mask`` ``[batch, seq]`` mark the names' tokens. A name mover also copies the
    name it attends to: its verdict needs the ``name_copy`` score as well (:mod:`roles.rule`). Source: Wang et al.
    2022, "Interpretability in the Wild" (name movers attend to the IO and copy it; S-inhibition heads keep them
    off the subject).
    """
    patterns = patterns_of(model, batch)
    n, seq = batch["input_ids"].shape
    final = torch.zeros(n, seq, seq, dtype=torch.bool)
    final[:, -1] = True  # the query is the final position
    io = final & batch["io_mask"][:, None, :]
    last = patterns[:, :, :, -1].to(torch.float64)  # [B, L, H, keys]
    t = (last * batch["io_mask"][:, None, None]).sum(-1)
    per_key = batch["io_mask"].sum(-1) / batch["s_mask"].sum(-1).clamp_min(1)  # [B]
    c = (last * batch["s_mask"][:, None, None]).sum(-1) * per_key[:, None, None]
    has = (batch["io_mask"].any(-1) & batch["s_mask"].any(-1))[:, None, None]
    differences = torch.where(has, t - c, torch.nan)
    control = (c * has).sum(0) / has.sum().clamp_min(1)
    return Evidence(masked_attention(patterns, io), control.float(), differences.float())
