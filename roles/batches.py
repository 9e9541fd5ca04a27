"""Detection batches for Hugging Face models: the induction task's repeated-segment batch on a tokenizer's ordinary
tokens, framed the way the tokenizer frames a text (BERT: ``[CLS] ... [SEP]``; Llama: ``<s> ...``).

Random token ids over a whole vocabulary include special and unused tokens that a pretrained model never saw in
context; drawing from ordinary tokens only and adding the tokenizer's own frame keeps the batch in distribution, so
scores on it mean what they mean on text.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from data.tasks import IGNORE, Batch, InductionTask
from headlab.errors import HeadlabError
from headlab.models import context_length

_BRACKETED = re.compile(r"^(\[.*\]|<.*>)$")


def usable_token_ids(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    """Ordinary token ids of the vocabulary: no special tokens and no bracketed ones (``[unused7]``, ``<|x|>``)."""
    config = model.config
    size = int(config.vocab_size)
    excluded: set[int] = set()
    if tokenizer is not None:
        size = min(size, len(tokenizer))
        excluded |= set(tokenizer.all_special_ids)
        names = tokenizer.convert_ids_to_tokens(list(range(size)))
        excluded |= {i for i, name in enumerate(names) if name is None or _BRACKETED.match(str(name))}
    else:
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
            value = getattr(config, key, None)
            excluded |= set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
    ids = torch.tensor([i for i in range(size) if i not in excluded], dtype=torch.long)
    if len(ids) < 4:
        raise HeadlabError(f"model vocabulary has only {len(ids)} ordinary tokens; the induction batch needs 4")
    return ids


def _frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text (BERT: [CLS] / [SEP]; Llama: <s> / none)."""
    if tokenizer is None:
        return [], []
    empty = list(tokenizer("", add_special_tokens=True)["input_ids"])
    leading = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    k = 0
    while k < len(empty) and empty[k] in leading:
        k += 1
    return empty[:k], empty[k:]


def repeat_batch(model: nn.Module, tokenizer: Any, batch_size: int, length: int, seed: int) -> Batch:
    """The induction task's batch (random tokens, one segment repeated) on ``model``'s ordinary tokens.

    Framed like a text of the tokenizer; targets (next token on the repeated part) are -100 on the frame.
    """
    allowed = usable_token_ids(model, tokenizer)
    prefix, suffix = _frame(tokenizer)
    limit = context_length(model, tokenizer) or length + len(prefix) + len(suffix)
    length = min(length, limit - len(prefix) - len(suffix))
    if length < 4:
        raise HeadlabError(f"model context of {limit} tokens is too short for the induction batch (needs >= 4)")
    max_segment = min(24, length // 2)
    task = InductionTask(vocab=len(allowed), length=length, min_segment=min(8, max_segment), max_segment=max_segment)
    raw = task.detection_batch(batch_size, seed)
    ids = allowed[raw["input_ids"]]
    targets = torch.where(raw["targets"] == IGNORE, IGNORE, allowed[raw["targets"].clamp(min=0)])
    n = ids.shape[0]
    before, after = torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)
    ids = torch.cat([before.expand(n, -1), ids, after.expand(n, -1)], dim=1)
    pad = torch.full((n, len(prefix)), IGNORE), torch.full((n, len(suffix)), IGNORE)
    targets = torch.cat([pad[0], targets, pad[1]], dim=1)
    return {"input_ids": ids, "targets": targets}
