"""Edits of head outputs at the hook point: ablation (zero / mean / resample) and steering (add a direction).

Each function returns a :data:`headlab.heads.HeadFn` for :func:`headlab.heads.hook_heads`, so capture, ablation
and steering all act on the same tensor, ``z`` ``[batch, seq, heads, d_head]``, the output projection's input.
Never ablate through ``head_mask``: recent transformers releases accept it and silently ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from headlab.heads import HeadFn

Head = tuple[int, int]  # (layer, head)


def _by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for layer, head in heads:
        grouped.setdefault(int(layer), []).append(int(head))
    return grouped


def zero_ablation(heads: Iterable[Head]) -> HeadFn:
    """Replace ``z_h`` of the given heads with zeros."""
    grouped = _by_layer(heads)

    def fn(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        if layer not in grouped:
            return None
        z = z.clone()
        z[:, :, grouped[layer]] = 0
        return z

    return fn


def mean_ablation(heads: Iterable[Head], means: Mapping[int, torch.Tensor]) -> HeadFn:
    """Replace ``z_h`` with a mean head output. ``means[layer]`` is ``[heads, d_head]`` (averaged over data and
    positions) or ``[seq, heads, d_head]`` (per position, broadcast over the batch)."""
    grouped = _by_layer(heads)

    def fn(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        if layer not in grouped:
            return None
        idx = grouped[layer]
        mean = means[layer].to(z.device, z.dtype)
        if mean.ndim == 3:
            mean = mean[: z.shape[1]]
        z = z.clone()
        z[:, :, idx] = mean[..., idx, :].expand_as(z[:, :, idx])
        return z

    return fn


def replace_heads(heads: Iterable[Head], source: Mapping[int, torch.Tensor]) -> HeadFn:
    """Replace ``z_h`` with the head outputs of another run (``source[layer]``: ``[batch, seq, heads, d_head]``).

    With ``source`` captured on other inputs this is resample ablation; with a clean run's outputs on a corrupted
    input it is activation patching.
    """
    grouped = _by_layer(heads)

    def fn(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        if layer not in grouped:
            return None
        idx = grouped[layer]
        z = z.clone()
        z[:, :, idx] = source[layer][:, : z.shape[1], idx].to(z.device, z.dtype)
        return z

    return fn


def steer(directions: Mapping[Head, torch.Tensor], alpha: float, positions: torch.Tensor | None = None) -> HeadFn:
    """Add ``alpha * direction`` to ``z_h`` of each head (Inference-Time Intervention, Li et al. 2023).

    ``directions[(layer, head)]`` is ``[d_head]`` (one direction for every row) or ``[batch, d_head]`` (one per row);
    ``positions`` (bool ``[batch, seq]``) limits where to add, default every position.
    """
    per_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for (layer, head), direction in directions.items():
        per_layer.setdefault(int(layer), []).append((int(head), direction))

    def fn(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        if layer not in per_layer:
            return None
        z = z.clone()
        for head, direction in per_layer[layer]:
            shift = alpha * direction.to(z.device, z.dtype)
            if shift.ndim == 2:  # [batch, d_head] -> [batch, 1, d_head], broadcast over positions
                shift = shift[:, None]
            if positions is None:
                z[:, :, head] += shift
            else:
                z[:, :, head] += positions[..., None].to(z.device, z.dtype) * shift
        return z

    return fn


def compose(*fns: HeadFn) -> HeadFn:
    """Apply several edits in order."""

    def fn(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        changed = False
        for f in fns:
            out = f(layer, z)
            if out is not None:
                z, changed = out, True
        return z if changed else None

    return fn
