"""OV-circuit (weight) detectors: what a head writes about the token it attends to, read from its weights.

Head ``h`` of a layer maps token ``t`` to logits ``E[t] W_V^h W_O^h W_U`` (Elhage et al. 2021; the direct path,
ignoring what other components add and the final norm). Copying, successor and name-mover heads are told apart by
what that map does to a token; each detector compares it with the same map on matched control tokens
(:mod:`roles.evidence`). ``W_V`` is read from toy, GPT-2 (``c_attn``), GPT-NeoX (``query_key_value``), Llama /
Qwen / Mistral (``v_proj``; grouped-query attention shares one ``W_V`` between the query heads of a group) and BERT
(``attention.self.value``) modules; a model without an unembedding (an encoder) or with an unknown layout raises
:class:`OVUnavailable`, which callers turn into a note, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from data.tasks import Batch
from headlab.errors import HeadlabError
from headlab.heads import head_sites, output_weights
from headlab.models import input_device
from headlab.placement import materialized, real_tensor
from roles.evidence import Evidence, indicator_evidence
from roles.registry import register


class OVUnavailable(HeadlabError):
    """The model's OV circuit cannot be read (no unembedding, or an unknown attention layout)."""


@dataclass(frozen=True)
class OVCircuit:
    """One layer's OV circuit: the layer's input ``norm`` (or None), ``W_V`` ``[heads, d_model, d_head]``, ``W_O``
    ``[heads, d_head, d_model]``, ``W_U`` ``[d_model, vocab]`` and the raw token embeddings ``[vocab, d_model]``."""

    norm: nn.Module | None
    w_v: torch.Tensor
    w_o: torch.Tensor
    w_u: torch.Tensor
    embed: torch.Tensor

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """Residual-stream vectors ``[n, d_model]`` as the layer's attention reads them (through its input norm)."""
        return (self.norm(x) if self.norm is not None else x).float()

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[heads, n, d_model]``: what each head writes when it attends to residual vectors ``x [n, d_model]``."""
        return torch.einsum("nd,hde,hef->hnf", self.read(x), self.w_v, self.w_o)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[heads, n, vocab]``: each head's direct-path logits for residual vectors ``x``."""
        return self.head_outputs(x) @ self.w_u


def _value_weights(attention: nn.Module, n_heads: int, d_head: int) -> torch.Tensor:
    """``W_V`` ``[heads, d_model, d_head]`` of one attention module."""
    if hasattr(attention, "v_proj"):  # toy, Llama, Qwen, Mistral, ...: weight [kv_heads * d_head, d_model]
        weight = attention.v_proj.weight
        kv_heads = weight.shape[0] // d_head
        w = weight.T.reshape(weight.shape[1], kv_heads, d_head).permute(1, 0, 2)
        return w.repeat_interleave(n_heads // kv_heads, dim=0)  # grouped-query attention shares W_V
    if hasattr(attention, "c_attn"):  # GPT-2 Conv1D, weight [d_model, 3 * d_model] = q | k | v
        d_model = attention.c_attn.weight.shape[0]
        w = attention.c_attn.weight[:, 2 * d_model :]
        return w.reshape(d_model, n_heads, d_head).permute(1, 0, 2)
    if hasattr(attention, "query_key_value"):  # GPT-NeoX: weight [heads * 3 * d_head, d_model], per head q | k | v
        weight = attention.query_key_value.weight
        per_head = weight.reshape(n_heads, 3, d_head, weight.shape[1])
        return per_head[:, 2].permute(0, 2, 1)
    if hasattr(attention, "self") and hasattr(attention.self, "value"):  # BERT family
        weight = attention.self.value.weight  # [heads * d_head, d_model]
        return weight.T.reshape(weight.shape[1], n_heads, d_head).permute(1, 0, 2)
    raise OVUnavailable(f"the OV detectors do not know where {type(attention).__name__} keeps its value projection")


def _parent(model: nn.Module, name: str, up: int) -> nn.Module:
    return model.get_submodule(".".join(name.split(".")[:-up]))


def _attention_module(model: nn.Module, site_name: str) -> nn.Module:
    """The module that holds a layer's value projection: the output projection's parent (toy, GPT-2, Llama, NeoX)
    or grandparent (BERT: ``attention.output.dense`` beside ``attention.self``)."""
    parent = _parent(model, site_name, 1)
    if type(parent).__name__.endswith("SelfOutput"):
        return _parent(model, site_name, 2)
    return parent


@torch.no_grad()
def ov_circuit(model: nn.Module, layer: int) -> OVCircuit:
    """The OV circuit of ``layer`` (see :class:`OVCircuit`)."""
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise OVUnavailable(f"{type(model).__name__} has no unembedding (an encoder): there is no OV map to logits")
    site = head_sites(model)[layer]
    holder = _attention_module(model, site.name)
    w_v = _value_weights(materialized(holder), site.n_heads, site.d_head).float()
    w_o, _ = output_weights(site)
    block = _parent(model, site.name, 3 if holder is not _parent(model, site.name, 1) else 2)
    norm = next((getattr(block, n) for n in ("ln1", "ln_1", "input_layernorm") if hasattr(block, n)), None)
    embed = real_tensor(model.get_input_embeddings(), "weight")
    return OVCircuit(None if norm is None else materialized(norm), w_v, w_o.float(),
                     real_tensor(unembed, "weight").float().T, embed)


@torch.no_grad()
def effective_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, d_model]``: the residual stream after the first block for each token alone (its embedding plus what
    layer 0's attention and MLP add), which Wang et al. use as the token's representation for the OV circuits of
    later layers (the name-copy score)."""
    device = input_device(model)
    out = model(input_ids=tokens[:, None].to(device), output_hidden_states=True)
    return out.hidden_states[1][:, 0].float().cpu()


def _norm_like(module: nn.Module | None) -> bool:
    return module is not None and "norm" in type(module).__name__.lower()


@torch.no_grad()
def mlp0_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, d_model]``: Gould et al.'s effective embedding, ``E[t] + MLP0(norm(E[t]))``: the token embedding through
    the first block's MLP alone, with no attention and no position (a token alone at position 0 would attend only
    to itself, at the attention-sink position). A first block without an MLP (an attention-only toy) leaves ``E``."""
    site = head_sites(model)[0]
    attention = _attention_module(model, site.name)
    block = _parent(model, site.name, 3 if attention is not _parent(model, site.name, 1) else 2)
    embed = real_tensor(model.get_input_embeddings(), "weight")[tokens].detach()
    mlp = getattr(block, "mlp", None)
    norm = next((getattr(block, n) for n in ("ln2", "ln_2", "post_attention_layernorm") if hasattr(block, n)), None)
    if mlp is None:
        return embed.float().cpu()
    x = embed.to(next(mlp.parameters()).dtype)
    return (x + mlp(norm(x) if norm is not None else x)).float().cpu()


def final_norm_gain(model: nn.Module) -> torch.Tensor | None:
    """``[d_model]``: the gain of the norm before the unembedding (the last norm module of the model: GPT-2
    ``ln_f``, Llama ``norm``, NeoX ``final_layer_norm``, toy ``ln_f``), or None. Folding it into ``W_U``
    (``diag(g) W_U``) gives the logits' direction exactly; the norm's per-token scale does not change an argmax."""
    d_model = model.get_input_embeddings().weight.shape[1]
    norms = [m for m in model.modules() if _norm_like(m) and getattr(m, "weight", None) is not None
             and m.weight.ndim == 1 and m.weight.shape[0] == d_model]
    return real_tensor(norms[-1], "weight").detach().float().cpu() if norms else None


def reads_ov(model: nn.Module) -> str | None:
    """None when the OV detectors can read ``model``, else the reason they cannot (for the report's notes)."""
    try:
        ov_circuit(model, 0)
    except OVUnavailable as error:
        return str(error)
    return None


def _per_layer(model: nn.Module | None, fn: Callable[[OVCircuit, torch.Tensor], Evidence], batch: Batch,
               tokens: torch.Tensor, later: torch.Tensor | None = None) -> Evidence:
    """``fn(ov, x)`` for every layer, ``x [n, d_model]`` the residual vectors of ``tokens``: their embeddings for
    layer 0 and, for later layers, ``later`` when given, else when the batch asks for it (``ov_after_first_block``,
    set for real models) the residual stream after the first block (:func:`effective_embeddings`)."""
    if model is None:
        raise HeadlabError("OV-circuit detectors need a model")
    raw = real_tensor(model.get_input_embeddings(), "weight")[tokens].detach()
    if later is None:
        later = effective_embeddings(model, tokens) if batch.get("ov_after_first_block") else raw
    layers = [fn(ov_circuit(model, layer), raw if layer == 0 else later) for layer in range(len(head_sites(model)))]
    return Evidence(torch.stack([e.score for e in layers]), torch.stack([e.control for e in layers]),
                    torch.stack([e.differences for e in layers], 1))


@cache
def copying_floor(d_head: int, quantile: float = 0.999, draws: int = 4000) -> float:
    """The ``quantile`` of the copying score of ``d_head x d_head`` standard Gaussian (Ginibre) matrices: what a
    random OV circuit reaches 1 time in 1000. The eigenvalues of a random matrix are symmetric about 0, so its
    score centres on 0 with a spread of about ``1.5 / d_head`` (Olsson et al. 2022 compare copying scores with
    random matrices the same way). Simulated once per ``d_head`` with a fixed seed."""
    generator = torch.Generator().manual_seed(2024 + d_head)
    eig = torch.linalg.eigvals(torch.randn(draws, d_head, d_head, generator=generator, dtype=torch.float64))
    scores = eig.real.sum(-1) / eig.abs().sum(-1)
    return float(torch.quantile(scores, quantile))


def _copy_score(matrix: torch.Tensor) -> torch.Tensor:
    eig = torch.linalg.eigvals(matrix.double())  # [heads, d_head]
    return (eig.real.sum(-1) / eig.abs().sum(-1).clamp_min(1e-12)).float()


class UnembedEmbed:
    """``W_U norm_l(E)`` (and with ``W_U``'s tokens permuted) for each layer's input norm, without re-multiplying the
    whole vocabulary per layer: a LayerNorm or RMSNorm is a per-token standardisation followed by a per-feature
    gain (and bias), so ``W_U norm_l(E) = (W_U E_hat) diag(g_l) [+ (W_U 1) b_l^T]`` with ``E_hat`` computed once.
    Other norms are applied token by token (exact, slower). Checked on sample tokens against the norm itself."""

    def __init__(self, vocab: int, permutation: torch.Tensor):
        self.vocab, self.permutation = vocab, permutation
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _kind(norm: nn.Module | None) -> tuple[str, float] | None:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if norm is None or eps is None or getattr(norm, "weight", None) is None:
            return None
        return ("layer" if isinstance(norm, nn.LayerNorm) else "rms", float(eps))

    @torch.no_grad()
    def __call__(self, ov: OVCircuit) -> tuple[torch.Tensor, torch.Tensor]:
        embed, w_u = ov.embed[: self.vocab].float(), ov.w_u
        kind = self._kind(ov.norm)
        if ov.norm is None:
            return w_u[:, : self.vocab] @ embed, w_u[:, self.permutation] @ embed
        if kind is not None:
            if kind not in self.cache:
                if kind[0] == "layer":
                    centred = embed - embed.mean(-1, keepdim=True)
                    hat = centred / (centred.pow(2).mean(-1, keepdim=True) + kind[1]).sqrt()
                else:
                    hat = embed / (embed.pow(2).mean(-1, keepdim=True) + kind[1]).sqrt()
                self.cache[kind] = (hat, w_u[:, : self.vocab] @ hat, w_u[:, self.permutation] @ hat)
            hat, direct, permuted = self.cache[kind]
            gain = ov.norm.weight.float()
            bias = getattr(ov.norm, "bias", None)
            sample = hat[:4] * gain + (bias.float() if bias is not None else 0.0)
            if torch.allclose(sample, ov.read(embed[:4]), atol=1e-4, rtol=1e-3):
                direct, permuted = direct * gain, permuted * gain
                if bias is not None:
                    direct = direct + torch.outer(w_u[:, : self.vocab].sum(1), bias.float())
                    permuted = permuted + torch.outer(w_u[:, self.permutation].sum(1), bias.float())
                return direct, permuted
        read = ov.read(embed)
        return w_u[:, : self.vocab] @ read, w_u[:, self.permutation] @ read


def _token_sample(vocab: int, limit: int = 512) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randperm(vocab, generator=generator)[: min(vocab, limit)]


@register("copying", requires=(), uses_patterns=False)
def copying(model: nn.Module | None, batch: Batch) -> Evidence:
    """Copying head: positive eigenvalues of the full OV circuit ``E W_V^h W_O^h W_U`` (vocab x vocab).

    ``score = sum_k Re(lambda_k) / sum_k |lambda_k|`` in ``[-1, 1]``; near 1 the head raises the logit of the
    token it attends to. The nonzero eigenvalues equal those of the ``d_head x d_head`` matrix
    ``W_O^h W_U E W_V^h`` (cyclic permutation), which is what is decomposed. Control: the same score with the
    unembedding's tokens permuted (the head raising *some other* fixed token). Samples: for up to 512 tokens ``t``,
    the head's logit of ``t`` minus its logit of the permuted token. Source: Elhage et al. 2021, "A Mathematical
    Framework for Transformer Circuits" (OV eigenvalue analysis).
    """
    if model is None:
        raise HeadlabError("OV-circuit detectors need a model")
    vocab = min(model.get_output_embeddings().weight.shape[0], model.get_input_embeddings().weight.shape[0])
    permutation = torch.randperm(vocab, generator=torch.Generator().manual_seed(11))
    tokens = _token_sample(vocab)

    products = UnembedEmbed(vocab, permutation)

    def layer(ov: OVCircuit, x: torch.Tensor) -> Evidence:
        direct, permuted = products(ov)  # [d_model, d_model] each
        score = _copy_score(ov.w_o @ direct @ ov.w_v)
        control = _copy_score(ov.w_o @ permuted @ ov.w_v)
        written = ov.head_outputs(x)  # [heads, n, d_model]
        own = (written * ov.w_u[:, tokens].T).sum(-1)
        other = (written * ov.w_u[:, permutation[tokens]].T).sum(-1)
        return Evidence(score, control, (own - other).T)

    return _per_layer(model, layer, {}, tokens)


@register("successor", requires=("successor_pairs",), uses_patterns=False)
def successor(model: nn.Module | None, batch: Batch) -> Evidence:
    """Successor head: the OV circuit maps an ordinal token to its successor.

    ``score = mean_{(t, succ t)} 1[argmax_{u in family(t)} (E[t] W_V^h W_O^h W_U)_u = succ t]`` over the batch's
    ``successor_pairs`` (``successor_family`` restricts the argmax to the token's own sequence: digits, days,
    months...; without it, to all ordinals), each family weighted equally (26 letters would otherwise outvote 7
    days). Control: the same with ``succ succ t`` in place of ``succ t``. Source: Gould et al. 2023, "Successor
    Heads: Recurring, Interpretable Attention Heads In The Wild" (succession score). As they do, real models'
    batches (``ov_mlp0``) read ``E`` through MLP0 alone (:func:`mlp0_embeddings`) for layers >= 1, and
    (``fold_final_norm``) fold the final norm's gain into ``W_U``.
    """
    pairs = batch["successor_pairs"]  # [n, 2]
    family = batch.get("successor_family", torch.zeros(len(pairs), dtype=torch.long))
    tokens, successors = pairs[:, 0], pairs[:, 1]
    next_of = {int(a): int(b) for a, b in pairs}
    after_next = torch.tensor([next_of.get(int(b), int(b)) for b in successors])
    same = family[:, None] == family[None, :]  # [n, n]: candidates of each pair's argmax
    sizes = torch.bincount(family)[family].float()
    weight = 1.0 / (sizes * len(family.unique()))  # [n]: each family counts equally, whatever its size
    gain = final_norm_gain(model) if batch.get("fold_final_norm") and model is not None else None

    def layer(ov: OVCircuit, x: torch.Tensor) -> Evidence:
        w_u = ov.w_u[:, tokens] if gain is None else gain[:, None] * ov.w_u[:, tokens]
        logits = ov.head_outputs(x) @ w_u  # [heads, n, n candidates]
        predicted = tokens[logits.masked_fill(~same, float("-inf")).argmax(-1)]  # [heads, n]
        hits, control = (predicted == successors).float(), (predicted == after_next).float()
        return Evidence((hits * weight).sum(-1), (control * weight).sum(-1),
                        ((hits - control) * weight * len(weight)).movedim(-1, 0))

    if batch.get("ov_mlp0"):
        embedded = mlp0_embeddings(model, tokens)
        return _per_layer(model, layer, {}, tokens, later=embedded)
    return _per_layer(model, layer, batch, tokens)


@register("name_copy", requires=("name_tokens",), uses_patterns=False)
def name_copy(model: nn.Module | None, batch: Batch, top_k: int = 5) -> Evidence:
    """Name copying (the OV half of a name mover): the fraction of names that the head puts in its own top-5 logits.

    ``score = mean_{n in names} 1[n in top5_u (E[n] W_V^h W_O^h W_U)_u]``; control: the same for another name (the
    names rotated by one). Source: Wang et al. 2022, "Interpretability in the Wild" (copy score of name-mover
    heads; they read ``E`` after MLP0, as real models' batches ask for with ``ov_after_first_block``).
    """
    names = batch["name_tokens"]
    other = names.roll(1)

    def layer(ov: OVCircuit, x: torch.Tensor) -> Evidence:
        top = ov.logits(x).topk(min(top_k, ov.w_u.shape[1]), dim=-1).indices  # [heads, n, k]
        return indicator_evidence((top == names[None, :, None]).any(-1), (top == other[None, :, None]).any(-1))

    return _per_layer(model, layer, batch, names)
