"""A small, explicit decoder-only transformer for studying attention heads (in the spirit of nanoGPT's model.py).

Read top to bottom: token embedding (+ a positional scheme) -> ``n_layers`` blocks -> final LayerNorm -> unembedding.
Each block is ``x = x + attn(ln1(x))`` and, unless ``attn_only``, ``x = x + mlp(ln2(x))``. Inside the attention the
head outputs ``z`` ``[batch, seq, heads, d_head]`` are concatenated and fed to ``out_proj``: that input is headlab's
hook point (``blocks.{i}.attn.out_proj``), so capture, ablation and steering work on this model exactly as on
GPT-2 or Llama.

Positional encodings: ``learned`` (added to the residual stream, GPT-2), ``rotary`` (RoPE on q and k, Su et al.
2021), ``shortformer`` (learned positions added to the inputs of q and k only, never to the residual stream or v;
Press et al. 2021) and ``none`` (the causal mask alone).

The model is a ``transformers.PreTrainedModel`` registered with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` (see ``toymodels/__init__.py``), so ``save_pretrained`` / ``from_pretrained`` work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

POSITIONAL = ("learned", "rotary", "shortformer", "none")


class ToyTransformerConfig(PretrainedConfig):
    """Hugging Face config of :class:`ToyTransformer`.

    ``num_attention_heads`` and ``num_hidden_layers`` are the standard names headlab's hook point reads.
    """

    model_type = "headlab_toy"

    def __init__(
        self,
        vocab_size: int = 64,
        max_position_embeddings: int = 64,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        head_dim: int | None = None,
        attn_only: bool = True,
        intermediate_size: int | None = None,
        layer_norm: bool = True,
        positional: str = "learned",
        rope_base: float = 10000.0,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        **kwargs,
    ) -> None:
        if positional not in POSITIONAL:
            raise ValueError(f"positional={positional!r}; choose one of {', '.join(POSITIONAL)}")
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.attn_only = attn_only
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.layer_norm = layer_norm
        self.positional = positional
        self.rope_base = rope_base
        self.initializer_range = initializer_range
        if positional == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _norm(config: ToyTransformerConfig) -> nn.Module:
    return nn.LayerNorm(config.hidden_size) if config.layer_norm else nn.Identity()


def rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021) of ``x`` ``[batch, heads, seq, d_head]``."""
    _, _, seq, dim = x.shape
    inv_freq = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)  # [d_head/2]
    angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # [seq, d_head/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention ``softmax(q k^T / sqrt(d_head) + mask) v`` with the fused kernel:
    ``[B, H, T, dh]`` each -> ``[B, H, T, dh]``."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class ToyAttention(nn.Module):
    """Causal multi-head self-attention; ``out_proj``'s input is the concatenated head outputs ``z``."""

    def __init__(self, config: ToyTransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = config.num_attention_heads, config.head_dim
        inner = self.n_heads * self.d_head
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.positional, self.rope_base = config.positional, config.rope_base
        # Set by toymodels.ablation.freeze_patterns: [batch, heads, seq, seq] patterns to use instead of softmax.
        self.pattern_override: torch.Tensor | None = None
        # The attention kernel where no pattern is needed; toymodels.stacked swaps in one that vmaps without a loop.
        self.attention_kernel = causal_attention

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H*dh] -> [B, H, T, dh]
        return x.view(*x.shape[:2], self.n_heads, self.d_head).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None, need_pattern: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        qk_in = x if pos is None else x + pos  # shortformer: positions enter q and k only
        q, k, v = self._split(self.q_proj(qk_in)), self._split(self.k_proj(qk_in)), self._split(self.v_proj(x))
        if self.positional == "rotary":
            q, k = rotate(q, self.rope_base), rotate(k, self.rope_base)
        if need_pattern or self.pattern_override is not None:
            seq = x.shape[1]
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # [B, H, T, T]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            pattern = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            if self.pattern_override is not None:
                pattern = self.pattern_override.to(pattern.dtype)
            z = pattern @ v  # [B, H, T, dh]
        else:
            pattern = None
            z = self.attention_kernel(q, k, v)  # [B, H, T, dh]
        z = z.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # [B, T, H*dh]: the hook point's input
        return self.out_proj(z), pattern


class ToyMLP(nn.Module):
    def __init__(self, config: ToyTransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class ToyBlock(nn.Module):
    def __init__(self, config: ToyTransformerConfig) -> None:
        super().__init__()
        self.ln1 = _norm(config)
        self.attn = ToyAttention(config)
        self.mlp = None if config.attn_only else ToyMLP(config)
        self.ln2 = None if config.attn_only else _norm(config)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None, need_pattern: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, pattern = self.attn(self.ln1(x), pos, need_pattern)
        x = x + attn_out  # the residual stream
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x, pattern


class ToyTransformer(PreTrainedModel):
    """Decoder-only toy transformer returning logits (and attention patterns with ``output_attentions=True``)."""

    config_class = ToyTransformerConfig
    base_model_prefix = "toy"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["ToyBlock"]
    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "lm_head.weight": "embed.weight"
    }  # used only when config.tie_word_embeddings

    def __init__(self, config: ToyTransformerConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        has_table = config.positional in ("learned", "shortformer")
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size) if has_table else None
        self.blocks = nn.ModuleList(ToyBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # ties lm_head to embed when config.tie_word_embeddings (see _tied_weights_keys)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """``input_ids`` ``[batch, seq]`` -> logits ``[batch, seq, vocab]``; ``attentions`` is a tuple of one
        ``[batch, heads, seq, seq]`` pattern per layer when asked for. ``labels`` follow the Hugging Face causal-LM
        convention (shifted inside, -100 ignored). ``attention_mask`` is accepted for API compatibility; the toy
        model has no padding, only the causal mask."""
        seq = input_ids.shape[1]
        if seq > self.config.max_position_embeddings and self.pos_embed is not None:
            raise ValueError(
                f"sequence of {seq} tokens exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        x = self.embed(input_ids)  # [B, T, d_model]
        pos = None
        if self.pos_embed is not None:
            table = self.pos_embed(torch.arange(seq, device=input_ids.device))  # [T, d_model]
            if self.config.positional == "learned":
                x = x + table
            else:
                pos = table
        patterns: list[torch.Tensor] = []
        for block in self.blocks:
            x, pattern = block(x, pos, output_attentions)
            if output_attentions:
                patterns.append(pattern)
        logits = self.lm_head(self.ln_f(x))  # [B, T, vocab]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits, attentions=tuple(patterns) if output_attentions else None)

    def attention_modules(self) -> Sequence[ToyAttention]:
        return [block.attn for block in self.blocks]
