"""Every head's ablation effect in one forward and one backward pass (attribution patching), and the screen that
confirms the heads that matter by exact ablation.

Exact ablation costs a forward pass per head (less the reused prefix, :class:`roles.ablation.PrefixCache`); on a
30-layer model that is hours for every head and every kind. Attribution patching (Nanda 2023, "Attribution
Patching: Activation Patching At Industrial Scale"; Syed et al. 2023, "Attribution Patching Outperforms Automated
Circuit Discovery") takes the first-order Taylor term of the ablation instead::

    effect_b(l, h) ~= sum_t (z'_{b,t,h} - z_{b,t,h}) . dL_b / dz_{b,t,h}

with ``z`` the head's output, ``z'`` its ablated value (mean, zero or resampled) and ``L_b`` sequence ``b``'s loss.
It ranks heads well but can misjudge a head whose removal is far from linear, even in sign (Kramar et al. 2024,
"AtP*", discuss such false negatives), so :func:`screen_and_confirm` measures exactly every head a verdict rests on:
the detected heads, the ``top_k`` heads of the screen by estimate and by absolute estimate, and ``n_random``
random other heads that set the reference a functional head must beat.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from data.tasks import Batch
from headlab.heads import head_sites, hook_heads
from roles.ablation import AblationKind, AblationResult, Head, ablation_effects, capture_z, fast_attention
from roles.task_loss import task_losses


def attribution_effects(model: nn.Module, batch: Batch, kind: AblationKind = "mean",
                        other_batch: Batch | None = None) -> AblationResult:
    """First-order estimate of every head's ablation effect, its standard error over sequences (``exact`` all
    False). One forward and one backward pass; ``other_batch`` as in :func:`roles.ablation.ablation_effects`."""
    was_training = model.training
    model.eval()
    ids, targets = batch["input_ids"], batch["targets"]
    sites = head_sites(model)
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        if not z.requires_grad:  # a gradient-free pass (task_losses checking the model once): leave it alone
            return None
        z.retain_grad()
        kept[layer] = z
        return z  # the projection must read this tensor for its gradient to be kept

    def track(module, args, output):  # the residual stream requires grad from the embeddings on
        return output.requires_grad_(True)

    try:
        with fast_attention(model):
            other = None
            if kind == "resample":
                other = capture_z(model, other_batch["input_ids"] if other_batch is not None else ids.roll(1, dims=0))
            handle = model.get_input_embeddings().register_forward_hook(track)
            try:
                with torch.enable_grad(), hook_heads(model, keep, sites=sites):
                    losses = task_losses(model, ids, targets)  # [B]
                    losses.sum().backward()  # sequences are independent: each gets its own gradient
            finally:
                handle.remove()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    per_sequence = []
    for site in sites:
        z = kept[site.layer].detach()  # [B, T, H, dh]
        grad = kept[site.layer].grad.detach()
        if kind == "zero":
            replacement = torch.zeros_like(z)
        elif kind == "mean":
            replacement = z.mean(0, keepdim=True).expand_as(z)
        else:
            replacement = other[site.layer][:, : z.shape[1]].to(z.device)
        per_sequence.append(((replacement - z) * grad).sum((1, 3)).cpu())  # [B, H]
    estimates = torch.stack(per_sequence, 1).double()  # [B, L, H]
    n = estimates.shape[0]
    return AblationResult(estimates.mean(0).float(), (estimates.std(0) / n**0.5).float(),
                          float(losses.detach().mean()), torch.zeros(estimates.shape[1:], dtype=torch.bool))


def screen_and_confirm(model: nn.Module, batch: Batch, kind: AblationKind, must: Iterable[Head],
                       other_batch: Batch | None = None, top_k: int = 16, n_random: int = 8,
                       seed: int = 0) -> AblationResult:
    """Attribution estimates for every head, replaced by exact effects for the heads in ``must``, the ``top_k``
    heads with the largest estimates, the ``top_k`` with the largest absolute estimates, and ``n_random`` random
    other heads (drawn with ``seed``)."""
    screen = attribution_effects(model, batch, kind, other_batch)
    n_layers, n_heads = screen.effect.shape
    everyone = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    # the estimate's size says how much the loss depends on a head, its sign is less reliable: far from linear, a
    # head whose removal matters a lot can get a large negative estimate (SmolLM2's L16H0: -0.70, exactly +4.72
    # nats). So both the top_k largest estimates and the top_k largest in absolute value are confirmed.
    flat = screen.effect.flatten()
    order = torch.argsort(flat, descending=True)[:top_k].tolist() + torch.argsort(flat.abs(), descending=True)[
        :top_k].tolist()
    chosen = set(must) | {everyone[i] for i in order}
    rest = [h for h in everyone if h not in chosen]
    picks = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:n_random].tolist()
    chosen |= {rest[i] for i in picks}
    exact = ablation_effects(model, batch, kind, other_batch, heads=sorted(chosen))
    measured = ~exact.effect.isnan()
    reference = torch.zeros_like(measured)
    for i in picks:
        reference[rest[i]] = True
    return AblationResult(torch.where(measured, exact.effect, screen.effect),
                          torch.where(measured, exact.stderr, screen.stderr), exact.clean_loss, measured, reference)
