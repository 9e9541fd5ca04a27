"""Tiny randomly initialised Hugging Face models of each tested architecture, with a local word-level tokenizer.

Nothing is downloaded: configs are built in code and the tokenizer from a fixed vocabulary with ``tokenizers``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = (
    "the capital of is a city country true false paris france berlin germany rome italy when and went to "
    "store gave drink mary john movie was good bad not very"
).split()
ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "bert")


def word_tokenizer(padding_side: str = "right", bos: bool = False) -> transformers.PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if bos:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", padding_side=padding_side,
        model_max_length=64,
    )


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    vocab = len(WORDS) + 3
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                       bos_token_id=2, eos_token_id=2)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    if arch == "bert":
        return transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0,
                                       attention_probs_dropout_prob=0)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, causal_lm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(arch)
    auto = transformers.AutoModelForCausalLM if causal_lm and arch != "bert" else transformers.AutoModel
    model = auto.from_config(config)
    with torch.no_grad():  # random biases too, so bias handling is tested
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


def save_tiny_model(arch: str, path: Path, padding_side: str = "right", seed: int = 0) -> Path:
    tiny_model(arch, seed).save_pretrained(path)
    word_tokenizer(padding_side, bos=arch in ("gpt2", "gpt_neox", "llama")).save_pretrained(path)
    return path


def seeded_unit(seed: int, size: int = 8) -> torch.Tensor:
    """A random unit vector ``[size]`` from its own seeded generator (planted directions of the steering tests)."""
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def llama_o_proj(model, layer: int) -> torch.nn.Linear:
    """A tiny Llama's attention output projection of ``layer`` (where the planted heads write)."""
    return model.model.layers[layer].self_attn.o_proj
