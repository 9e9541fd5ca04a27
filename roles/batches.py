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


def text_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
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
    prefix, suffix = text_frame(tokenizer)
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


def single_token(tokenizer: Any, word: str) -> int | None:
    """The id of ``word`` when the tokenizer encodes it as one token, else None."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


ORDINAL_FAMILIES: dict[str, tuple[list[str], bool]] = {
    "digits": ([str(d) for d in range(10)], False),
    "number words": (["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"], False),
    "days": (["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"], True),
    "months": (["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December"], True),
    "letters": ([chr(c) for c in range(ord("A"), ord("Z") + 1)], False),
}
"""Gould et al.'s ordinal sequences: name -> (members in order, cyclic)."""


def ordinal_batch(tokenizer: Any) -> Batch:
    """``successor_pairs`` ``[n, 2]`` and ``successor_family`` ``[n]`` over the tokenizer's single-token ordinals.

    Each member is tried with a leading space (as it appears inside a text) and bare; a family keeps the variant that
    tokenizes more of its members as single tokens, and a pair needs both members to be single tokens. Cyclic
    families (days, months) wrap around. The batch asks the successor detector to read tokens through MLP0 alone
    (``ov_mlp0``) and to fold the final norm's gain into the unembedding (``fold_final_norm``), as Gould et al. do.
    """
    pairs, family_ids = [], []
    for index, (members, cyclic) in enumerate(ORDINAL_FAMILIES.values()):
        variants = [[single_token(tokenizer, prefix + m) for m in members] for prefix in (" ", "")]
        ids = max(variants, key=lambda v: sum(t is not None for t in v))
        successors = list(range(1, len(members))) + ([0] if cyclic else [])
        for k, nxt in zip(range(len(members)), successors):
            if ids[k] is not None and ids[nxt] is not None and ids[k] != ids[nxt]:
                pairs.append((ids[k], ids[nxt]))
                family_ids.append(index)
    if len(pairs) < 4:
        raise HeadlabError("the tokenizer has fewer than 4 single-token ordinal pairs; the successor detector "
                           "cannot be scored on this model")
    return {"successor_pairs": torch.tensor(pairs), "successor_family": torch.tensor(family_ids),
            "ov_mlp0": torch.tensor(True), "fold_final_norm": torch.tensor(True)}


def ioi_batch(tokenizer: Any, batch_size: int, seed: int) -> Batch:
    """Indirect-object prompts from the built-in ``ioi`` set, cut before the final name ("When Mary and John went
    to the store, John gave a drink to"), with ``io_mask`` / ``s_mask`` marking the indirect object's and the
    subject's tokens, ``name_tokens`` the single-token names and ``targets`` the IO name (its first token) at the
    final position. Prompts of the most common token length are kept (the name-mover detector reads the final
    position), ``batch_size`` of them drawn with ``seed``."""
    from data.builtin import ioi

    prefix, suffix = text_frame(tokenizer)
    prompts = []
    for example in ioi():
        if not example["label"]:
            continue
        text = example["text"][: example["mark"]].rstrip()
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = {name: [m.start() for m in re.finditer(rf"\b{name}\b", text)]
                 for name in (example["io"], example["subject"])}
        masks = []
        for name in (example["io"], example["subject"]):
            hit = [any(a <= start < b for start in spans[name]) for a, b in encoded["offset_mapping"]]
            masks.append([False] * len(prefix) + hit + [False] * len(suffix))
        answer = tokenizer(" " + example["io"], add_special_tokens=False)["input_ids"][0]
        prompts.append((prefix + encoded["input_ids"] + suffix, masks[0], masks[1], answer))
    lengths = [len(p[0]) for p in prompts]
    common = max(set(lengths), key=lengths.count)
    chosen = [p for p in prompts if len(p[0]) == common]
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))[:batch_size].tolist()
    names = [t for name in sorted({n for e in ioi() for n in (e["io"], e["subject"])})
             if (t := single_token(tokenizer, " " + name)) is not None]
    ids = torch.tensor([chosen[i][0] for i in order])
    targets = torch.full_like(ids, IGNORE)
    targets[:, -1] = torch.tensor([chosen[i][3] for i in order])  # the final position predicts the IO name
    return {
        "input_ids": ids,
        "targets": targets,
        "io_mask": torch.tensor([chosen[i][1] for i in order]),
        "s_mask": torch.tensor([chosen[i][2] for i in order]),
        "name_tokens": torch.tensor(names),
        "ov_after_first_block": torch.tensor(True),
    }
