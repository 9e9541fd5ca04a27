"""Causal validation: ablate one head at a time and measure the change of the task's metric.

The metric is the task's loss: cross-entropy on its target positions (for induction: the repeated part).
``effect[l, h] = loss(model with head (l, h) ablated) - loss(clean model)``; a positive effect means the head
helps the task. Ablations go through headlab's hook point (never ``head_mask``, which recent transformers
releases silently ignore):

* ``zero``: ``z_h := 0``;
* ``mean``: ``z_h :=`` its mean over the batch, per position;
* ``resample``: ``z_h :=`` its value on another batch of the same task (Chan et al. 2022, causal scrubbing);
* ``pattern_preserving=True`` (toy models): every head's attention pattern is frozen to its clean value while
  the head is ablated, so the effect only flows through values and the residual stream, not through changed
  attention of later heads.

A head is *functional* when its effect exceeds that of ablating random heads (heads with no detected function)
beyond noise (:func:`is_functional`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from data.tasks import Batch, sequence_loss
from headlab.errors import HeadlabError
from headlab.heads import HeadFn, head_sites, hook_heads
from headlab.interventions import compose, mean_ablation, replace_heads, zero_ablation

AblationKind = Literal["zero", "mean", "resample"]


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.cpu()


@torch.no_grad()
def capture_z(model: nn.Module, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's head outputs ``z`` ``[batch, seq, heads, d_head]`` on ``input_ids``."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        captured[layer] = z.detach().clone()

    with hook_heads(model, keep):
        _logits(model, input_ids)
    return captured


@contextmanager
def freeze_patterns(model: nn.Module, patterns: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Inside the block toy attention layer ``l`` uses ``patterns[l]`` ``[batch, heads, seq, seq]``."""
    modules = model.attention_modules() if hasattr(model, "attention_modules") else None
    if modules is None:
        raise HeadlabError(
            f"pattern-preserving ablation needs a headlab toy model, not {type(model).__name__}; "
            "use --detection.pattern_preserving false"
        )
    try:
        for module, pattern in zip(modules, patterns):
            module.pattern_override = pattern
        yield
    finally:
        for module in modules:
            module.pattern_override = None


def _ablation(kind: AblationKind, head: tuple[int, int], clean: dict, other: dict | None) -> HeadFn:
    if kind == "zero":
        return zero_ablation([head])
    if kind == "mean":
        return mean_ablation([head], {layer: z.mean(0) for layer, z in clean.items()})  # [seq, heads, d_head]
    if kind == "resample":
        return replace_heads([head], other)
    raise HeadlabError(f"unknown ablation '{kind}'; choose zero, mean or resample")


@dataclass(frozen=True)
class AblationResult:
    """Per-head ablation effects ``[layer, head]`` (mean over sequences), their standard errors, the clean loss."""

    effect: torch.Tensor
    stderr: torch.Tensor
    clean_loss: float


@torch.no_grad()
def ablation_effects(
    model: nn.Module,
    batch: Batch,
    kind: AblationKind = "mean",
    other_batch: Batch | None = None,
    pattern_preserving: bool = False,
) -> AblationResult:
    """Effect of ablating each head alone: ``effect[l, h] = mean_b (loss_b(ablated) - loss_b(clean))`` with
    ``loss_b`` the cross-entropy over sequence ``b``'s target positions, and its standard error over sequences.

    ``other_batch`` supplies the resampled head outputs for ``kind="resample"`` (default: the batch rolled by one
    sequence, so every sequence gets another sequence's head outputs).
    """
    was_training = model.training
    model.eval()
    try:
        ids, targets = batch["input_ids"], batch["targets"]
        clean = sequence_loss(_logits(model, ids), targets)  # [B]
        captured = capture_z(model, ids) if kind == "mean" else {}
        other = None
        if kind == "resample":
            source = other_batch["input_ids"] if other_batch is not None else ids.roll(1, dims=0)
            other = capture_z(model, source)
        if pattern_preserving:
            frozen = freeze_patterns(model, model(input_ids=ids, output_attentions=True).attentions)
        else:
            frozen = nullcontext()
        sites = head_sites(model)
        effect = torch.zeros(len(sites), sites[0].n_heads)
        stderr = torch.zeros_like(effect)
        with frozen:
            for site in sites:
                for head in range(site.n_heads):
                    with hook_heads(model, _ablation(kind, (site.layer, head), captured, other)):
                        diff = sequence_loss(_logits(model, ids), targets) - clean  # [B]
                    effect[site.layer, head] = diff.mean()
                    stderr[site.layer, head] = diff.std() / len(diff) ** 0.5
    finally:
        model.train(was_training)
    return AblationResult(effect, stderr, float(clean.mean()))


def is_functional(
    effect: torch.Tensor,
    stderr: torch.Tensor,
    detected: torch.Tensor,
    reference: float,
    n_sigma: float = 3.0,
    min_effect: float = 0.01,
) -> torch.Tensor:
    """Which detected heads are causally responsible: ``effect - reference > max(n_sigma * stderr, min_effect)``.

    ``reference`` is the mean effect of ablating a random head, one with no detected function (see
    :func:`random_head_reference`): a detected head is functional when its ablation hurts the task more than that,
    by more than the sampling noise of its own effect and by at least ``min_effect`` nats (a floor for a loss
    near 0, where the noise vanishes too). ``effect``, ``stderr``, ``detected``: ``[layer, head]``.
    """
    return detected & (effect - reference > (n_sigma * stderr).clamp_min(min_effect))


@torch.no_grad()
def group_effect(
    model: nn.Module,
    batch: Batch,
    heads: list[tuple[int, int]],
    kind: AblationKind = "mean",
    other_batch: Batch | None = None,
) -> float:
    """Loss change when all ``heads`` are ablated together (redundant heads hide from one-at-a-time ablation)."""
    if not heads:
        return 0.0
    was_training = model.training
    model.eval()
    try:
        ids, targets = batch["input_ids"], batch["targets"]
        clean = sequence_loss(_logits(model, ids), targets)
        captured = capture_z(model, ids) if kind == "mean" else {}
        other = None
        if kind == "resample":
            other = capture_z(model, other_batch["input_ids"] if other_batch is not None else ids.roll(1, dims=0))
        fns = [_ablation(kind, head, captured, other) for head in heads]
        with hook_heads(model, compose(*fns)):
            ablated = sequence_loss(_logits(model, ids), targets)
    finally:
        model.train(was_training)
    return float((ablated - clean).mean())


def random_head_reference(effect: torch.Tensor, detected_any: torch.Tensor) -> float:
    """Mean ablation effect of the heads with no detected function (``detected_any`` false), 0 when there is none.

    Heads detected for another role are not random: in an induction circuit the previous-token heads of layer 0
    matter more, one by one, than each of several redundant induction heads, and must not set the bar for them.
    """
    others = effect[~detected_any]
    return float(others.mean()) if others.numel() else 0.0
