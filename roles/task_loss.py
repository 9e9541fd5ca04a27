"""The task loss of a model on a batch: cross-entropy at the task's target positions, per sequence.

A real model's unembedding is a large share of its forward pass (SmolLM2: 49,152 x 576 of about 135M parameters,
a third of the work above layer 15), and a task's targets sit at a fraction of the positions (the repeated part of
an induction sequence, the final position of a prompt). So the loss runs the model's backbone and unembeds only the
target positions, once it has checked, on one sequence, that this reproduces the model's own logits (a model that
rescales or caps its logits after the unembedding falls back to the full forward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.tasks import IGNORE, sequence_loss
from headlab.models import input_device

_CHECKED = "_headlab_backbone_logits"


def _backbone(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", None)
    if base is None or base is model or model.get_output_embeddings() is None:
        return None
    return base


@torch.no_grad()
def _backbone_matches(model: nn.Module, base: nn.Module, ids: torch.Tensor) -> bool:
    device = input_device(model)
    probe = ids[:1].to(device)
    full = model(input_ids=probe).logits.float()
    hidden = base(input_ids=probe).last_hidden_state
    return bool(torch.allclose(model.get_output_embeddings()(hidden).float(), full, atol=1e-4, rtol=1e-4))


def task_losses(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[batch]``: each sequence's mean cross-entropy over its target positions (:func:`data.tasks.sequence_loss`),
    unembedding only those positions when the model allows it. Differentiable (attribution uses it)."""
    base = _backbone(model)
    if base is not None and getattr(model, _CHECKED, None) is None:
        setattr(model, _CHECKED, _backbone_matches(model, base, ids))
    device = input_device(model)
    if base is None or not getattr(model, _CHECKED):
        return sequence_loss(model(input_ids=ids.to(device)).logits.cpu(), targets)
    hidden = base(input_ids=ids.to(device)).last_hidden_state  # [B, T, d_model]
    keep = targets != IGNORE  # [B, T]
    logits = model.get_output_embeddings()(hidden[keep.to(device)])  # [n, V]
    per_target = F.cross_entropy(logits.float(), targets[keep].to(device), reduction="none").cpu()
    rows = keep.nonzero()[:, 0]
    totals = torch.zeros(len(ids), dtype=per_target.dtype).index_add(0, rows, per_target)
    return totals / keep.sum(1).clamp_min(1)
