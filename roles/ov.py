"""OV-circuit (weight) detectors: what a head writes about the token it attends to, read from its weights.

Head ``h`` of a layer maps token ``t`` to logits ``E[t] W_V^h W_O^h W_U`` (Elhage et al. 2021). Copying, successor
and name-mover heads are told apart by what that map does to a token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from data.tasks import Batch
from headlab.errors import HeadlabError
from headlab.heads import head_sites, output_weights
from roles.registry import register


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

