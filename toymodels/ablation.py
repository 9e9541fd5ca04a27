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

A head is *functional* when its effect exceeds the spread of ablating random heads (:func:`functional_threshold`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from headlab.errors import HeadlabError
from headlab.heads import HeadFn, head_sites, hook_heads
from headlab.interventions import mean_ablation, replace_heads, zero_ablation

AblationKind = Literal["zero", "mean", "resample"]
Batch = dict[str, torch.Tensor]


def target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not -100; ``logits`` ``[B, T, V]``, ``targets`` ``[B, T]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def target_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    keep = targets != -100
    return (logits.argmax(-1)[keep] == targets[keep]).float().mean()


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
            "use --detect.pattern_preserving false"
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


@torch.no_grad()
def ablation_effects(
    model: nn.Module,
    batch: Batch,
    kind: AblationKind = "mean",
    other_batch: Batch | None = None,
    pattern_preserving: bool = False,
) -> tuple[torch.Tensor, float]:
    """Per-head effect ``[layer, head]`` of ablating each head alone, and the clean loss.

    ``other_batch`` supplies the resampled head outputs for ``kind="resample"`` (default: the batch rolled by one
    sequence, so every sequence gets another sequence's head outputs).
    """
    was_training = model.training
    model.eval()
    try:
        ids, targets = batch["input_ids"], batch["targets"]
        clean_loss = float(target_loss(_logits(model, ids), targets))
        clean = capture_z(model, ids) if kind == "mean" else {}
        other = None
        if kind == "resample":
            source = other_batch["input_ids"] if other_batch is not None else ids.roll(1, dims=0)
            other = capture_z(model, source)
        if pattern_preserving:
            frozen = freeze_patterns(model, model(input_ids=ids, output_attentions=True).attentions)
        else:
            frozen = nullcontext()
        sites = head_sites(model)
        effects = torch.zeros(len(sites), sites[0].n_heads)
        with frozen:
            for site in sites:
                for head in range(site.n_heads):
                    with hook_heads(model, _ablation(kind, (site.layer, head), clean, other)):
                        logits = _logits(model, ids)
                    effects[site.layer, head] = float(target_loss(logits, targets)) - clean_loss
    finally:
        model.train(was_training)
    return effects, clean_loss


def functional_threshold(effects: torch.Tensor, n_sigma: float = 3.0) -> float:
    """The effect a head must exceed to count as functional: the spread of ablating random heads.

    ``threshold = median(effects) + n_sigma * 1.4826 * MAD(effects)`` over all heads (a robust mean + n sigma:
    most heads of a model do not serve the task, so the median and the median absolute deviation describe what
    ablating a random head does, and a few strong heads do not inflate them). Never below 0.
    """
    flat = effects.flatten().double()
    median = flat.median()
    mad = (flat - median).abs().median()
    return max(float(median + n_sigma * 1.4826 * mad), 0.0)
