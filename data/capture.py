"""Capture every head's output ``z_h`` (the attention output projection's input) at chosen token positions.

Position rules (one cache row per...):
  ``last``    example: the last real (non-padding) token;
  ``mean``    example: the mean over its real tokens (special tokens included, padding excluded);
  ``all``     real token of every example (padding masked out); rows carry their example and token index;
  ``marked``  marked token: the token containing each character offset the dataset marks (``mark`` field).

Batches are padded on the tokenizer's padding side, and position ids are computed from the attention mask
(``cumsum(mask) - 1``) and passed to models that accept them, so a left-padded example gets the same head outputs
as when run alone. Forward passes run under ``torch.inference_mode`` and stop right after the last hooked layer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from headlab.errors import HeadlabError
from headlab.heads import HeadSite, head_sites, hook_heads, select_layers
from headlab.models import input_device

log = logging.getLogger(__name__)

Positions = Literal["last", "all", "mean", "marked"]


@dataclass
class CapturedBatch:
    activations: np.ndarray  # [rows, layers, heads, d_head]
    example: np.ndarray  # [rows] dataset example index of each row
    token: np.ndarray  # [rows] token position of each row (-1 for mean)


class _StopForward(Exception):
    """Raised by the last needed layer's hook: the rest of the forward pass is not needed."""


@dataclass
class Tokenized:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    marked: list[list[int]] | None  # per example: token positions (in the padded batch) to read
    truncated: int  # how many examples were cut to max_length


def tokenize_batch(tokenizer, texts: Sequence[str], max_length: int | None,
                   marks: Sequence[Sequence[int]] | None = None, first_example: int = 0) -> Tokenized:
    """Tokenize, truncate to ``max_length`` (keeping the start) and pad on the tokenizer's side."""
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False,
                        return_offsets_mapping=marks is not None)
    ids: list[list[int]] = encoded["input_ids"]
    marked_tokens = None
    if marks is not None:
        marked_tokens = []
        for i, (offsets, char_marks) in enumerate(zip(encoded["offset_mapping"], marks)):
            tokens = []
            for char in char_marks:
                hit = [t for t, (a, b) in enumerate(offsets) if a <= char < b and b > a]
                if not hit:
                    hit = [t for t, (a, b) in enumerate(offsets) if a >= char and b > a][:1]
                if not hit:
                    raise HeadlabError(
                        f"example {first_example + i}: no token covers marked character {char}; "
                        "mark the first character of a word"
                    )
                tokens.append(hit[0])
            marked_tokens.append(tokens)
    truncated = 0
    if max_length is not None:
        for i, seq in enumerate(ids):
            if len(seq) > max_length:
                truncated += 1
                if marked_tokens is not None and max(marked_tokens[i]) >= max_length:
                    raise HeadlabError(
                        f"example {first_example + i}: its marked token {max(marked_tokens[i])} falls after the "
                        f"{max_length}-token context; shorten the text or mark an earlier token"
                    )
                ids[i] = seq[:max_length]
    width = max(len(seq) for seq in ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[i, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, span] = 1
        if left and marked_tokens is not None:
            marked_tokens[i] = [t + width - len(seq) for t in marked_tokens[i]]
    return Tokenized(input_ids, attention_mask, marked_tokens, truncated)


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def forward_inputs(model: nn.Module, batch: Tokenized, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for a padded batch, with mask-derived position ids where the model takes them."""
    mask = batch.attention_mask.to(device)
    inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": mask}
    if _accepts(model, "position_ids"):
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


class HeadCapture:
    """Runs a model over batches of texts and returns the chosen layers' head outputs at the chosen positions."""

    def __init__(self, model: nn.Module, tokenizer, *, positions: Positions = "last",
                 layers: Sequence[int] | None = None, max_length: int | None = None,
                 store_dtype: torch.dtype = torch.float16):
        if positions not in ("last", "all", "mean", "marked"):
            raise HeadlabError(f"unknown positions rule {positions!r}; use last, all, mean or marked")
        self.model = model
        self.tokenizer = tokenizer
        self.positions = positions
        self.sites: list[HeadSite] = select_layers(head_sites(model), layers)
        self.layers = [s.layer for s in self.sites]
        self.n_heads = self.sites[0].n_heads
        self.d_head = self.sites[0].d_head
        self.max_length = max_length
        self.store_dtype = store_dtype
        self.device = input_device(model)
        self.truncated = 0

    def _select(self, z: torch.Tensor, batch: Tokenized, rows: tuple[torch.Tensor, torch.Tensor] | None):
        mask = batch.attention_mask.to(z.device)
        if self.positions == "last":
            seq = mask.shape[1]
            last = seq - 1 - mask.flip(-1).argmax(-1)  # index of the last 1 in each row
            return z[torch.arange(z.shape[0], device=z.device), last]  # [batch, heads, d_head]
        if self.positions == "mean":
            weights = mask.to(z.dtype)[..., None, None]
            return (z * weights).sum(1) / weights.sum(1)  # [batch, heads, d_head]
        assert rows is not None
        return z[rows[0].to(z.device), rows[1].to(z.device)]  # [rows, heads, d_head]

    def _rows(self, batch: Tokenized) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions == "all":
            b, t = torch.nonzero(batch.attention_mask, as_tuple=True)
            return b, t
        assert batch.marked is not None
        pairs = [(i, t) for i, tokens in enumerate(batch.marked) for t in tokens]
        b, t = zip(*pairs)
        return torch.tensor(b), torch.tensor(t)

    @torch.inference_mode()
    def run(self, texts: Sequence[str], marks: Sequence[Sequence[int]] | None = None,
            first_example: int = 0) -> CapturedBatch:
        if self.positions == "marked" and marks is None:
            raise HeadlabError("positions 'marked' needs a dataset with marked tokens (a 'mark' field)")
        batch = tokenize_batch(self.tokenizer, texts, self.max_length,
                               marks if self.positions == "marked" else None, first_example)
        self.truncated += batch.truncated
        rows = self._rows(batch) if self.positions in ("all", "marked") else None
        captured: dict[int, torch.Tensor] = {}
        last_layer = self.layers[-1]

        def fn(layer: int, z: torch.Tensor) -> None:
            captured[layer] = self._select(z, batch, rows).to(self.store_dtype)
            if layer == last_layer:
                raise _StopForward

        with hook_heads(self.model, fn, sites=self.sites):
            try:
                self.model(**forward_inputs(self.model, batch, self.device))
            except _StopForward:
                pass
        stacked = torch.stack([captured[layer] for layer in self.layers], dim=1)  # [rows, layers, heads, d_head]
        n = len(texts)
        if rows is None:
            example = np.arange(first_example, first_example + n)
            token = batch.attention_mask.sum(-1).numpy() - 1 if self.positions == "last" else np.full(n, -1)
        else:
            example = rows[0].numpy() + first_example
            token = rows[1].numpy()
            if getattr(self.tokenizer, "padding_side", "right") == "left":
                token = token - (batch.attention_mask.shape[1] - batch.attention_mask.sum(-1).numpy()[rows[0]])
        return CapturedBatch(stacked.cpu().numpy(), example.astype(np.int64), np.asarray(token, dtype=np.int64))

    def iterate(self, texts: Sequence[str], marks: Sequence[Sequence[int]] | None = None, *,
                batch_size: int = 32, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, CapturedBatch]]:
        """Yield ``(end_example, batch)`` for examples ``start..stop`` (default: to the end of ``texts``)."""
        stop = len(texts) if stop is None else stop
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield hi, self.run(texts[lo:hi], None if marks is None else marks[lo:hi], first_example=lo)
