"""A few-shot true/false judgement as a steering readout (readout R2 of the truthfulness check), after Marks &
Tegmark 2023, "The Geometry of Truth" (``saprmarks/geometry-of-truth``, ``interventions.py``).

The prompt is a few labelled statements, each followed by ``" This statement is: TRUE"`` or ``"... FALSE"`` on its
own line, then the test statement and ``" This statement is:"``. The readout is the judgement margin at the final
position::

    m = logit(t_TRUE) - logit(t_FALSE)

with ``t_TRUE`` and ``t_FALSE`` the first tokens of ``" TRUE"`` and ``" FALSE"`` (they must differ). Marks & Tegmark
read ``P(TRUE) - P(FALSE)``; the logit difference is its unbounded, softmax-free form.

The edit sits at the test statement's last token (its full stop), the position a probe trained at the statements'
last token (``positions="last"``) read. Nothing before that token can change, so the few-shot prompt and the
statement up to its last token are run once and cached (:func:`cached_inputs`); each steered forward runs only
the suffix ``"<last token> This statement is:"`` over a fresh copy of that cache. Rows are left padded in the
cached prefix (position ids count real tokens only), so every suffix is the same width and unpadded: the edited
position is the suffix's first column (:attr:`JudgementBatch.edit`), the readout its last
(:attr:`JudgementBatch.final`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from headlab.errors import HeadlabError
from headlab.heads import HeadFn, hook_heads


@dataclass
class JudgementBatch:
    """``N`` test statements in the few-shot prompt, split where the edit starts. ``prefix_ids`` ``[N, P]`` (left
    padded): the shots and the statement without its last token; ``suffix_ids`` ``[N, S]``: the statement's last
    token and the judgement cue; ``labels`` ``[N]``: whether each statement is true."""

    prefix_ids: torch.Tensor  # [N, P]
    prefix_mask: torch.Tensor  # [N, P]
    suffix_ids: torch.Tensor  # [N, S]
    labels: torch.Tensor  # [N] bool
    token_true: int
    token_false: int

    @property
    def edit(self) -> torch.Tensor:
        """``[N, S]`` bool: the statement's last token (the probe's position)."""
        where = torch.zeros_like(self.suffix_ids, dtype=torch.bool)
        where[:, 0] = True
        return where

    @property
    def final(self) -> torch.Tensor:
        """``[N, S]`` bool: the final position, where the judgement is read."""
        where = torch.zeros_like(self.suffix_ids, dtype=torch.bool)
        where[:, -1] = True
        return where

    def to(self, device) -> JudgementBatch:
        return JudgementBatch(self.prefix_ids.to(device), self.prefix_mask.to(device), self.suffix_ids.to(device),
                              self.labels.to(device), self.token_true, self.token_false)


def judgement_batch(shots: list[int], statements: list[list[int]], labels: list[bool], cue: list[int],
                    token_true: int, token_false: int, pad_id: int = 0) -> JudgementBatch:
    """Rows ``shots + statement + cue`` split before each statement's last token (see the module docstring);
    ``shots`` already holds the labelled examples (and any leading special tokens)."""
    if token_true == token_false:
        raise HeadlabError(f"the TRUE and FALSE answers share their first token ({token_true}); R2 cannot tell them "
                           "apart")
    if not statements or len(statements) != len(labels) or any(len(s) == 0 for s in statements) or not cue:
        raise HeadlabError("R2 needs non-empty statements, one label each, and a non-empty judgement cue")
    width = max(len(shots) + len(s) - 1 for s in statements)
    if width == 0:
        raise HeadlabError("R2's prompt has nothing before the edited token: give it shots or longer statements")
    prefix = torch.full((len(statements), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(prefix)
    for row, statement in enumerate(statements):
        tokens = shots + statement[:-1]
        prefix[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    suffix = torch.tensor([s[-1:] + cue for s in statements], dtype=torch.long)
    return JudgementBatch(prefix, mask, suffix, torch.tensor(labels, dtype=torch.bool), token_true, token_false)


class CachedPrefix(Mapping):
    """The suffix's forward inputs over the cached prefix (``model(**inputs)``): ``input_ids`` (the suffix),
    ``attention_mask`` (prefix and suffix), ``position_ids`` (real tokens counted) and the prefix's key/value cache
    under ``key`` (the forward's name for it), a fresh copy on every lookup, since a forward appends the suffix to
    the cache it is given."""

    def __init__(self, inputs: dict[str, torch.Tensor], cache, key: str) -> None:
        self._inputs, self._cache, self._key = inputs, cache, key

    def __getitem__(self, key: str):
        return copy.deepcopy(self._cache) if key == self._key else self._inputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._inputs, self._key])

    def __len__(self) -> int:
        return len(self._inputs) + 1


@torch.no_grad()
def cached_inputs(model: nn.Module, batch: JudgementBatch) -> CachedPrefix:
    """Run the prefix once (unedited: an edit at the statement's last token cannot reach it) and return the
    suffix's inputs over its key/value cache."""
    lengths = batch.prefix_mask.sum(1, keepdim=True)  # [N, 1]
    prefix_positions = (batch.prefix_mask.cumsum(1) - 1).clamp(min=0)
    outputs = model(input_ids=batch.prefix_ids, attention_mask=batch.prefix_mask, position_ids=prefix_positions,
                    use_cache=True)
    cache = getattr(outputs, "cache", None)
    cache = outputs.past_key_values if cache is None else cache
    width = batch.suffix_ids.shape[1]
    inputs = {"input_ids": batch.suffix_ids,
              "attention_mask": torch.cat([batch.prefix_mask, torch.ones_like(batch.suffix_ids)], 1),
              "position_ids": lengths + torch.arange(width, device=lengths.device)}
    return CachedPrefix(inputs, cache, _cache_argument(model))


def _cache_argument(model: nn.Module) -> str:
    """The forward's key/value cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def r2_readout(batch: JudgementBatch):
    """Readout for :func:`probes.steering.steering_check`: the judgement margin per statement ``[N]``."""

    def read(outputs, _inputs) -> torch.Tensor:
        final = outputs.logits[:, -1].float()  # [N, vocab]: suffixes are unpadded, the last column is final
        return final[:, batch.token_true] - final[:, batch.token_false]

    return read


@torch.no_grad()
def judgement_margins(model: nn.Module, inputs: CachedPrefix, batch: JudgementBatch, fn: HeadFn | None = None
                      ) -> torch.Tensor:
    """``[N]``: each statement's judgement margin, with the head edit ``fn`` (None: unedited)."""
    if fn is None:
        return r2_readout(batch)(model(**inputs), inputs).cpu()
    with hook_heads(model, fn):
        return r2_readout(batch)(model(**inputs), inputs).cpu()
