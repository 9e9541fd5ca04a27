"""The task metric every toy run, detector check and ablation uses: cross-entropy on a task's target positions.

Targets are aligned with the logits (``logits[:, i]`` is scored against ``targets[:, i]``) and :data:`IGNORE`
marks positions without a loss (see :mod:`data.tasks.base`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.tasks.base import IGNORE


def target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every target position: ``logits [B, T, V]``, ``targets [B, T]`` -> scalar."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)


def target_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of target positions whose argmax logit is the target: scalar."""
    keep = targets != IGNORE
    return (logits.argmax(-1)[keep] == targets[keep]).float().mean()


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over each sequence's target positions: ``[batch]`` (the unit ablation effects and
    their standard errors are computed over)."""
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")
    counts = (targets != IGNORE).sum(1).clamp_min(1)
    return per_token.sum(1) / counts
