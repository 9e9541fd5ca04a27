"""Head-function detectors: plain functions ``(model, batch) -> scores [layer, head]``, registered by name.

They work on toy models and on Hugging Face models alike. Attention-pattern detectors read the patterns of
``batch["input_ids"]`` (computed once per batch under eager attention and kept in ``batch["attentions"]``
``[batch, layer, head, query, key]``; pass that key to score hand-built patterns). Weight detectors read the OV
circuit ``W_E -> W_V^h W_O^h -> W_U`` (see :func:`ov_circuit`). Batch keys a detector needs are listed in
:data:`REQUIRES`; a task's batches carry the keys for its own role (e.g. ``iteration_mask``).

Thresholds are not fixed: :func:`null_distribution` scores the same architecture at several random
initialisations; a head is *detected* when its score exceeds ``null_mean + n_sigma * null_std``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from headlab.errors import HeadlabError
from headlab.heads import head_sites, output_weights

Batch = dict[str, torch.Tensor]
Detector = Callable[[nn.Module | None, Batch], torch.Tensor]  # -> scores [layer, head]

DETECTORS: dict[str, Detector] = {}
REQUIRES: dict[str, tuple[str, ...]] = {}
PATTERN_DETECTORS: set[str] = set()


def register(name: str, requires: tuple[str, ...] = ("input_ids",), uses_patterns: bool = True):
    """Register a detector under ``name``; ``requires`` are the batch keys it reads."""

    def decorate(fn: Detector) -> Detector:
        DETECTORS[name] = fn
        REQUIRES[name] = requires
        if uses_patterns:
            PATTERN_DETECTORS.add(name)
        return fn

    return decorate


# --------------------------------------------------------------------------------------------------------------
# attention patterns


def use_eager_attention(model: nn.Module) -> None:
    """Switch a Hugging Face model to eager attention: under sdpa ``output_attentions=True`` returns nothing."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


@torch.no_grad()
def attention_patterns(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention patterns ``[batch, layer, head, query, key]`` of ``input_ids`` ``[batch, seq]`` (eager)."""
    use_eager_attention(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(input_ids=input_ids.to(device), output_attentions=True)
    finally:
        model.train(was_training)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise HeadlabError(
            f"{type(model).__name__} returned no attention patterns with output_attentions=True; load it with "
            "attn_implementation='eager' (sdpa and flash attention do not return patterns)"
        )
    return torch.stack([a.float().cpu() for a in attentions], dim=1)


def patterns_of(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """``batch["attentions"]`` if present, else the model's patterns on ``batch["input_ids"]`` (kept in batch)."""
    if "attentions" not in batch:
        if model is None:
            raise HeadlabError("a pattern detector needs a model or batch['attentions']")
        batch["attentions"] = attention_patterns(model, batch["input_ids"])
    return batch["attentions"]


def masked_attention(patterns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean attention mass on the designated keys, over the queries that have any.

    ``score[l, h] = mean_{(b, i): M_bi != {}} sum_{j in M_bi} A[b, l, h, i, j]``; ``patterns``
    ``[batch, layer, head, query, key]``, ``mask`` bool ``[batch, query, key]``. Every attention detector below is
    this function with its own mask.
    """
    mask = mask.to(patterns.dtype)[:, None, None]  # [B, 1, 1, T, T]
    has_key = mask.sum(-1) > 0  # [B, 1, 1, T]
    mass = (patterns * mask).sum(-1)  # [B, L, H, T]
    n_queries = has_key.sum()
    if n_queries == 0:
        return torch.zeros(patterns.shape[1:3])
    return (mass * has_key).sum(dim=(0, 3)) / n_queries


def _causal_offsets(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seq = input_ids.shape[1]
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    return i, j


@register("previous_token")
def previous_token_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Previous-token head: attention from each token to the one before it.

    ``score = mean_{b, i >= 1} A[i, i - 1]``. Source: Olsson et al. 2022, "In-context learning and induction heads"
    (previous-token heads are the first half of the induction circuit); Elhage et al. 2021.
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    return masked_attention(patterns_of(model, batch), (j == i - 1).expand(ids.shape[0], -1, -1))


@register("duplicate_token")
def duplicate_token_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Duplicate-token head: attention from a token to its earlier occurrences.

    ``score = mean_{(b, i): exists j < i, x_j = x_i} sum_{j < i, x_j = x_i} A[i, j]``. Source: Wang et al. 2022,
    "Interpretability in the Wild" (IOI duplicate-token heads).
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    same = ids[:, :, None] == ids[:, None, :]  # [B, T, T]
    return masked_attention(patterns_of(model, batch), same & (j < i))


@register("induction")
def induction_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Induction head, prefix-matching score: attention to the token that *followed* earlier occurrences.

    ``score = mean_{(b, i): exists 1 <= j < i, x_{j-1} = x_i} sum_{1 <= j < i, x_{j-1} = x_i} A[i, j]``.
    Source: Olsson et al. 2022, "In-context learning and induction heads", with its 2022 erratum (the key is
    the token *after* the earlier occurrence, ``j - 1`` matches ``i``, not ``j`` itself).
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    follows = torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1], dtype=torch.bool)
    follows[:, :, 1:] = ids[:, :, None] == ids[:, None, :-1]  # [B, i, j]: x_{j-1} == x_i
    return masked_attention(patterns_of(model, batch), follows & (j < i) & (j >= 1))


@register("attention_sink")
def attention_sink_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Attention sink: attention to the first token.

    ``score = mean_{b, i >= 1} A[i, 0]``. Source: Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks".
    """
    ids = batch["input_ids"]
    i, j = _causal_offsets(ids)
    return masked_attention(patterns_of(model, batch), ((j == 0) & (i >= 1)).expand(ids.shape[0], -1, -1))


@register("iteration", requires=("input_ids", "iteration_mask"))
def iteration_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Iteration head: at the chain-of-thought step that produces ``s_t``, attention to the input bit ``x_t``.

    ``score = mean_{(b, i) CoT query} A[i, key(i)]`` with ``key(i) = i - n`` (the "diagonal" of the CoT-by-input
    block; the task's ``iteration_mask``). Source: Cabannes et al. 2024, "Iteration Head: A Mechanistic Study of
    Chain-of-Thought".
    """
    return masked_attention(patterns_of(model, batch), batch["iteration_mask"])


@register("operand_attention", requires=("input_ids", "operand_mask"))
def operand_attention_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Operand attention: attention from ``=`` to the operands ``a`` and ``b`` in ``a b =``.

    ``score = mean_b (A[=, a] + A[=, b])`` (the task's ``operand_mask``). Source: Nanda et al. 2023, "Progress
    measures for grokking via mechanistic interpretability" (the heads read both operands from ``=``).
    """
    return masked_attention(patterns_of(model, batch), batch["operand_mask"])


# --------------------------------------------------------------------------------------------------------------
# OV-circuit (weight) detectors


@dataclass(frozen=True)
class OVCircuit:
    """One layer's OV circuit: ``E`` ``[vocab, d_model]`` (token embeddings through the layer's input norm),
    ``W_V`` ``[heads, d_model, d_head]``, ``W_O`` ``[heads, d_head, d_model]``, ``W_U`` ``[d_model, vocab]``.

    Head ``h`` maps token ``t`` to logits ``E[t] @ W_V[h] @ W_O[h] @ W_U``. Like TransformerLens' ``OV`` it
    ignores what other components add to the residual stream and the final norm (the usual direct-path
    approximation).
    """

    embed: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    w_u: torch.Tensor

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[heads, len(tokens), vocab]``: each head's direct-path logits for each token."""
        x = self.embed[tokens]  # [n, d_model]
        return torch.einsum("nd,hde,hef,fv->hnv", x, self.w_v, self.w_o, self.w_u)


def _value_weights(attention: nn.Module, n_heads: int, d_head: int) -> torch.Tensor:
    """``W_V`` ``[heads, d_model, d_head]`` of one attention module (toy, Llama-like, GPT-2)."""
    if hasattr(attention, "v_proj"):
        weight = attention.v_proj.weight  # [kv_heads * d_head, d_model]
        kv_heads = weight.shape[0] // d_head
        w = weight.T.reshape(weight.shape[1], kv_heads, d_head).permute(1, 0, 2)
        return w.repeat_interleave(n_heads // kv_heads, dim=0)  # grouped-query attention shares W_V
    if hasattr(attention, "c_attn"):  # GPT-2 Conv1D, weight [d_model, 3 * d_model] = q | k | v
        d_model = attention.c_attn.weight.shape[0]
        w = attention.c_attn.weight[:, 2 * d_model :]
        return w.reshape(d_model, n_heads, d_head).permute(1, 0, 2)
    raise HeadlabError(
        f"OV-circuit detectors do not know where {type(attention).__name__} keeps its value projection "
        "(supported: toy, GPT-2, Llama-like v_proj); use the attention-pattern detectors for this model"
    )


def _parent(model: nn.Module, name: str, up: int) -> nn.Module:
    return model.get_submodule(".".join(name.split(".")[:-up]))


@torch.no_grad()
def ov_circuit(model: nn.Module, layer: int) -> OVCircuit:
    """The OV circuit of ``layer`` of a toy, GPT-2 or Llama-like model (see :class:`OVCircuit`)."""
    site = head_sites(model)[layer]
    attention = _parent(model, site.name, 1)
    w_v = _value_weights(attention, site.n_heads, site.d_head).float()
    w_o, _ = output_weights(site)
    block = _parent(model, site.name, 2)
    norm = next((getattr(block, n) for n in ("ln1", "ln_1", "input_layernorm") if hasattr(block, n)), None)
    embed = model.get_input_embeddings().weight.float()
    if norm is not None:
        embed = norm(embed)
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise HeadlabError(f"{type(model).__name__} has no unembedding; load it as a causal LM")
    return OVCircuit(embed.float(), w_v, w_o.float(), unembed.weight.float().T)


def _per_layer(model: nn.Module | None, fn: Callable[[OVCircuit], torch.Tensor]) -> torch.Tensor:
    if model is None:
        raise HeadlabError("OV-circuit detectors need a model")
    return torch.stack([fn(ov_circuit(model, layer)) for layer in range(len(head_sites(model)))])


@register("copying", requires=(), uses_patterns=False)
def copying_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Copying head: positive eigenvalues of the full OV circuit ``E W_V^h W_O^h W_U`` (vocab x vocab).

    ``score = sum_k Re(lambda_k) / sum_k |lambda_k|`` in ``[-1, 1]``; near 1 the head raises the logit of the
    token it attends to. The nonzero eigenvalues equal those of the ``d_head x d_head`` matrix
    ``W_O^h W_U E W_V^h`` (cyclic permutation), which is what is decomposed. Source: Elhage et al. 2021,
    "A Mathematical Framework for Transformer Circuits" (OV eigenvalue analysis).
    """

    def layer_scores(ov: OVCircuit) -> torch.Tensor:
        ue = ov.w_u @ ov.embed  # [d_model, d_model]
        small = ov.w_o @ ue @ ov.w_v  # [heads, d_head, d_head]
        eig = torch.linalg.eigvals(small.double())  # [heads, d_head]
        return (eig.real.sum(-1) / eig.abs().sum(-1).clamp_min(1e-12)).float()

    return _per_layer(model, layer_scores)


@register("successor", requires=("successor_pairs",), uses_patterns=False)
def successor_score(model: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Successor head: the OV circuit maps an ordinal token to its successor.

    ``score = mean_{(t, succ t)} 1[argmax_{u in ordinals} (E[t] W_V^h W_O^h W_U)_u = succ t]`` over the task's
    ``successor_pairs``. Source: Gould et al. 2023, "Successor Heads: Recurring, Interpretable Attention Heads In
    The Wild" (succession score; they read ``E`` after MLP0, here the embedding through the layer's input norm).
    """
    pairs = batch["successor_pairs"]
    ordinals = pairs[:, 0]

    def layer_scores(ov: OVCircuit) -> torch.Tensor:
        logits = ov.logits(pairs[:, 0])[:, :, ordinals]  # [heads, n, n_ordinal]
        predicted = ordinals[logits.argmax(-1)]
        return (predicted == pairs[:, 1]).float().mean(-1)

    return _per_layer(model, layer_scores)


@register("name_mover", requires=("name_tokens",), uses_patterns=False)
def name_mover_score(model: nn.Module | None, batch: Batch, top_k: int = 5) -> torch.Tensor:
    """Name mover, copy score: fraction of names that the head's OV circuit puts in its own top-5 logits.

    ``score = mean_{n in names} 1[n in top5_u (E[n] W_V^h W_O^h W_U)_u]``. Source: Wang et al. 2022,
    "Interpretability in the Wild" (copy score of name-mover heads; they read ``E`` after MLP0).
    """
    names = batch["name_tokens"]

    def layer_scores(ov: OVCircuit) -> torch.Tensor:
        top = ov.logits(names).topk(min(top_k, ov.w_u.shape[1]), dim=-1).indices  # [heads, n, k]
        return (top == names[None, :, None]).any(-1).float().mean(-1)

    return _per_layer(model, layer_scores)


# --------------------------------------------------------------------------------------------------------------
# scoring and null distributions


def applicable(batch: Mapping[str, object], names: Iterable[str] | None = None) -> list[str]:
    """Detector names whose required batch keys are present (all registered ones when ``names`` is None)."""
    chosen = list(DETECTORS) if names is None else list(names)
    unknown = [n for n in chosen if n not in DETECTORS]
    if unknown:
        raise HeadlabError(f"unknown detector {', '.join(unknown)}; choose from: {', '.join(DETECTORS)}")
    return [n for n in chosen if all(key in batch for key in REQUIRES[n])]


@torch.no_grad()
def score_heads(model: nn.Module, batch: Batch, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores ``[layer, head]`` of every applicable detector; attention patterns are computed once."""
    work = {k: v for k, v in batch.items() if k != "attentions"}  # fresh patterns for this model
    return {name: DETECTORS[name](model, work).cpu() for name in applicable(batch, names)}


@dataclass(frozen=True)
class NullStats:
    """A detector's score distribution over every head of randomly initialised copies of the architecture."""

    mean: float
    std: float
    n: int

    def threshold(self, n_sigma: float) -> float:
        return self.mean + n_sigma * self.std


def random_init_copy(model: nn.Module, seed: int, init_std: float | None = None) -> nn.Module:
    """A freshly initialised model of the same architecture and config (eager attention).

    ``init_std`` overrides ``config.initializer_range`` (when the config has one).
    """
    config = copy.deepcopy(model.config)
    if init_std is not None and hasattr(config, "initializer_range"):
        config.initializer_range = init_std
    torch.manual_seed(seed)
    if hasattr(type(model), "_from_config"):
        fresh = type(model)._from_config(config, attn_implementation="eager")
    else:
        fresh = type(model)(config)
    return fresh.eval()


def null_distribution(
    model: nn.Module,
    batch: Batch,
    names: Iterable[str] | None = None,
    n_models: int = 5,
    seed: int = 10_000,
    unit_logits: bool = True,
) -> dict[str, NullStats]:
    """Score ``n_models`` random initialisations of ``model``'s architecture on ``batch``; pool every head.

    With ``unit_logits`` (default) the copies are initialised with ``std = hidden_size ** -0.5`` (``** -0.25``
    for a toy model without LayerNorm), which gives attention logits of order one: random heads then have
    sharp but *arbitrary* patterns. At the usual small training init (std 0.02) every head attends almost
    uniformly, the null spread collapses to ~1e-4 and any trained head would pass; the null should instead
    say what a head with no particular function scores.
    """
    if n_models < 2:
        raise HeadlabError(f"n_null={n_models}: a null distribution needs at least 2 random initialisations")
    hidden = getattr(model.config, "hidden_size", None)
    power = -0.25 if getattr(model.config, "layer_norm", True) is False else -0.5
    init_std = hidden**power if unit_logits and hidden else None
    pooled: dict[str, list[torch.Tensor]] = {}
    for k in range(n_models):
        fresh = random_init_copy(model, seed + k, init_std)
        for name, scores in score_heads(fresh, batch, names).items():
            pooled.setdefault(name, []).append(scores.flatten())
        del fresh
    stats = {}
    for name, values in pooled.items():
        v = torch.cat(values).double()
        stats[name] = NullStats(float(v.mean()), float(v.std()), int(v.numel()))
    return stats
