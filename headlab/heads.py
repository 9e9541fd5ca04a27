"""The head hook point: where each architecture's attention output projection lives, and hooks on its input.

"Head output" ``z_h`` is the per-head slice of the input to the attention output projection:
``z_h = softmax(q_h k_h^T / sqrt(d_head) + mask) v_h`` with shape ``[d_head]`` per position. The concatenation
of all heads' ``z_h`` is exactly what the output projection receives (GPT-2 ``attn.c_proj``, GPT-NeoX
``attention.dense``, Llama/Qwen ``self_attn.o_proj``, BERT ``attention.output.dense``), so one forward pre-hook
per layer sees every head of that layer, under any attention implementation (eager, sdpa, flash). Grouped-query
attention shares k and v between query heads but still feeds one ``z_h`` per query head into the projection.

The same hook serves capture (read ``z``), ablation (replace a head's slice) and steering (add to it).
A head's write into the residual stream is ``z_h @ W_O[h]`` (see :func:`output_weights`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from headlab.errors import HeadlabError

# model_type -> regular expression for the output projection's module name, with the layer index as group 1.
# The expression is matched at the end of the module name, so it finds the module whether the model is a base
# model (``h.3.attn.c_proj``) or wrapped in a head (``transformer.h.3.attn.c_proj``).
ARCHITECTURES: dict[str, str] = {}

_LLAMA_LIKE = r"layers\.(\d+)\.self_attn\.o_proj"
_BERT_LIKE = r"encoder\.layer\.(\d+)\.attention\.output\.dense"


def register_architecture(model_type: str, pattern: str) -> None:
    """Teach headlab where ``model_type``'s attention output projection lives.

    ``pattern`` is a regular expression matched against the end of module names (``model.named_modules()``) with
    the layer index as its first group, e.g.
    ``register_architecture("llama", r"layers\\.(\\d+)\\.self_attn\\.o_proj")``.
    """
    re.compile(pattern)
    ARCHITECTURES[model_type] = pattern


for _model_type, _pattern in {
    "gpt2": r"h\.(\d+)\.attn\.c_proj",
    "gpt_neox": r"layers\.(\d+)\.attention\.dense",
    "gptj": r"h\.(\d+)\.attn\.out_proj",
    "gpt_neo": r"h\.(\d+)\.attn\.attention\.out_proj",
    "opt": r"layers\.(\d+)\.self_attn\.out_proj",
    "distilbert": r"transformer\.layer\.(\d+)\.attention\.out_lin",
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
         "gemma3_text", "phi3", "olmo", "olmo2", "granite", "starcoder2", "smollm3"],
        _LLAMA_LIKE,
    ),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], _BERT_LIKE),
}.items():
    register_architecture(_model_type, _pattern)


@dataclass(frozen=True)
class HeadSite:
    """One layer's hook point: the attention output projection whose input holds every head's ``z_h``."""

    layer: int
    name: str  # module path inside the model, e.g. "transformer.h.3.attn.c_proj"
    module: nn.Module
    n_heads: int
    d_head: int


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "model_type", None):
        raise HeadlabError(
            f"{type(model).__name__} has no Hugging Face config with a model_type; headlab hooks Hugging Face "
            "models (PreTrainedModel) and its own toy models"
        )
    return config.model_type


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2's transposed linear: weight [in, out]
        return weight.shape[0]
    if weight is not None and weight.ndim == 2:
        return weight.shape[1]
    raise HeadlabError(f"cannot tell the input width of output projection {type(module).__name__}")


def _match(model: nn.Module, pattern: str) -> dict[int, tuple[str, nn.Module]]:
    regex = re.compile(r"(?:^|\.)" + pattern + r"$")
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        m = regex.search(name)
        if m:
            found[int(m.group(1))] = (name, module)
    return found


def head_sites(model: nn.Module) -> list[HeadSite]:
    """Every layer's hook point, in layer order.

    The architecture is looked up by ``model.config.model_type`` in :data:`ARCHITECTURES`; for an unknown type the
    known patterns are tried and one is used only if it matches exactly ``num_hidden_layers`` modules.
    """
    model_type = _model_type(model)
    config = model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    pattern = ARCHITECTURES.get(model_type)
    if pattern is not None:
        found = _match(model, pattern)
    else:
        candidates = [found for p in dict.fromkeys(ARCHITECTURES.values()) if (found := _match(model, p))]
        candidates = [c for c in candidates if n_layers is None or len(c) == n_layers]
        found = candidates[0] if len(candidates) == 1 else {}
    if not found:
        raise HeadlabError(
            f"headlab does not know where model_type '{model_type}' keeps its attention output projection; "
            "find its name in model.named_modules() and call headlab.heads.register_architecture("
            f"'{model_type}', r'layers\\.(\\d+)\\.self_attn\\.o_proj') with that pattern before loading"
        )
    n_heads = int(config.num_attention_heads)
    sites = []
    for layer in sorted(found):
        name, module = found[layer]
        width = _in_features(module)
        if width % n_heads:
            raise HeadlabError(
                f"output projection {name} takes {width} features, not a multiple of {n_heads} heads; "
                "check config.num_attention_heads"
            )
        sites.append(HeadSite(layer, name, module, n_heads, width // n_heads))
    return sites


def select_layers(sites: Sequence[HeadSite], layers: Sequence[int] | None) -> list[HeadSite]:
    """The sites of ``layers`` (all when None); negative indices count from the last layer."""
    if layers is None:
        return list(sites)
    n = len(sites)
    chosen = []
    for layer in layers:
        if not -n <= layer < n:
            raise HeadlabError(f"layer {layer} does not exist: the model has {n} layers (0..{n - 1})")
        chosen.append(sites[layer % n])
    return list(dict.fromkeys(chosen))


# fn(layer, z) with z: [batch, seq, heads, d_head]; return a replacement z (same shape) or None to leave it.
HeadFn = Callable[[int, torch.Tensor], torch.Tensor | None]


@contextmanager
def hook_heads(model: nn.Module, fn: HeadFn, layers: Sequence[int] | None = None,
               sites: Sequence[HeadSite] | None = None) -> Iterator[list[HeadSite]]:
    """Call ``fn(layer, z)`` on every chosen layer's head outputs during forward passes inside the block.

    ``z`` is a view ``[batch, seq, heads, d_head]`` of the output projection's input. If ``fn`` returns a tensor,
    it replaces ``z`` as the projection's input (ablation, steering, patching); returning None leaves the forward
    pass unchanged (capture). Hooks are removed when the block exits, even on error. Callers hooking the same
    model batch after batch pass ``sites`` (from :func:`head_sites`) to skip looking them up again.
    """
    sites = select_layers(sites if sites is not None else head_sites(model), layers)
    handles = []

    def make_hook(site: HeadSite):
        def pre_hook(module, args):
            x = args[0]
            z = x.view(*x.shape[:-1], site.n_heads, site.d_head)
            out = fn(site.layer, z)
            if out is None:
                return None
            return (out.reshape(x.shape), *args[1:])

        return pre_hook

    try:
        for site in sites:
            handles.append(site.module.register_forward_pre_hook(make_hook(site)))
        yield sites
    finally:
        for handle in handles:
            handle.remove()


def output_weights(site: HeadSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W_O`` as ``[heads, d_head, d_model]`` and the projection's bias ``[d_model]`` (or None).

    The projection's output is ``sum_h z_h @ W_O[h] + bias``.
    """
    module = site.module
    from headlab.placement import real_tensor  # an offloaded projection's weights sit on meta

    weight, bias = real_tensor(module, "weight"), real_tensor(module, "bias")
    if type(module).__name__ == "Conv1D":  # weight [in, out]
        w_in_out = weight
    else:  # nn.Linear: weight [out, in]
        w_in_out = weight.T
    w_o = w_in_out.reshape(site.n_heads, site.d_head, w_in_out.shape[-1])
    return w_o, bias
