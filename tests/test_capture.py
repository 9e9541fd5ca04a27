"""Head outputs captured at the output projection equal a hand computation from the weights.

The reference recomputes attention per head from each layer's input: q, k, v projections (with rotary embedding
for GPT-NeoX and Llama, shared k/v for Llama's grouped-query heads), the causal (or, for BERT, bidirectional) mask,
softmax(q k^T / sqrt(d_head)) v. Each example is run alone, unpadded, so the comparison also checks that padded
batches (left and right) give the same head outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, word_tokenizer

from data.capture import HeadCapture
from headlab.heads import head_sites, hook_heads, output_weights

TEXTS = ["the capital of france is paris", "mary gave a drink to john", "the movie was not very good and bad",
         "rome"]


def _layers(model, arch):
    return model.h if arch == "gpt2" else model.encoder.layer if arch == "bert" else model.layers


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(x, rotary_dim, theta):  # x: [seq, heads, d_head]
    seq = x.shape[0]
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], -1)[:, None, :]  # [seq, 1, rotary_dim]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([rot * emb.cos() + _rotate_half(rot) * emb.sin(), rest], -1)


def reference_z(model, arch: str, layer_index: int, h_in: torch.Tensor) -> torch.Tensor:
    """Hand-computed head outputs ``[seq, heads, d_head]`` of one layer for one unpadded example ``[seq, d_model]``."""
    cfg = model.config
    layer = _layers(model, arch)[layer_index]
    n_heads = cfg.num_attention_heads
    d_head = cfg.hidden_size // n_heads
    seq = h_in.shape[0]
    theta = cfg.rope_parameters["rope_theta"] if arch in ("gpt_neox", "llama") else None
    if arch == "gpt2":
        q, k, v = layer.attn.c_attn(layer.ln_1(h_in)).split(cfg.hidden_size, dim=-1)
        q, k, v = (t.view(seq, n_heads, d_head) for t in (q, k, v))
    elif arch == "gpt_neox":
        qkv = layer.attention.query_key_value(layer.input_layernorm(h_in)).view(seq, n_heads, 3 * d_head)
        q, k, v = qkv.chunk(3, dim=-1)
        rotary_dim = int(d_head * cfg.rope_parameters["partial_rotary_factor"])
        q, k = _rotary(q, rotary_dim, theta), _rotary(k, rotary_dim, theta)
    elif arch == "llama":
        x = layer.input_layernorm(h_in)
        n_kv = cfg.num_key_value_heads
        q = layer.self_attn.q_proj(x).view(seq, n_heads, d_head)
        k = layer.self_attn.k_proj(x).view(seq, n_kv, d_head)
        v = layer.self_attn.v_proj(x).view(seq, n_kv, d_head)
        q, k = _rotary(q, d_head, theta), _rotary(k, d_head, theta)
        group = n_heads // n_kv  # query head h reads key/value head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    else:
        attn = layer.attention.self
        q, k, v = (proj(h_in).view(seq, n_heads, d_head) for proj in (attn.query, attn.key, attn.value))
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d_head)
    if arch != "bert":
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def layer_inputs(model, arch: str, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's input hidden states ``[seq, d_model]`` for one unpadded example."""
    inputs = []

    def grab(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"])[0].detach())

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in _layers(model, arch)]
    with torch.no_grad():
        model(input_ids=input_ids)
    for handle in handles:
        handle.remove()
    return inputs


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_captured_head_outputs_equal_hand_computed_attention(arch, padding_side):
    model = tiny_model(arch)
    tokenizer = word_tokenizer(padding_side, bos=arch != "bert")
    capture = HeadCapture(model, tokenizer, positions="all", store_dtype=torch.float32)
    batch = capture.run(TEXTS)
    checked = 0
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        h_ins = layer_inputs(model, arch, ids)
        rows = (batch.example == i).nonzero()[0]
        assert len(rows) == ids.shape[1]
        for layer in range(model.config.num_hidden_layers):
            expected = reference_z(model, arch, layer, h_ins[layer]).detach()  # [seq, heads, d_head]
            got = torch.from_numpy(batch.activations[rows, layer])  # [seq, heads, d_head]
            assert torch.equal(torch.from_numpy(batch.token[rows]), torch.arange(ids.shape[1]))
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
            checked += 1
    assert checked == len(TEXTS) * model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_times_output_weights_sum_to_attention_output(arch):
    model = tiny_model(arch)
    ids = torch.tensor([word_tokenizer()("the capital of france is paris")["input_ids"]])
    zs, outs = {}, {}
    sites = head_sites(model)
    handles = [s.module.register_forward_hook(lambda m, a, o, layer=s.layer: outs.__setitem__(layer, o))
               for s in sites]
    with torch.no_grad(), hook_heads(model, lambda layer, z: zs.__setitem__(layer, z.clone())):
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    for site in sites:
        w_o, bias = output_weights(site)
        total = torch.einsum("bshd,hdm->bsm", zs[site.layer], w_o)
        if bias is not None:
            total = total + bias
        torch.testing.assert_close(total, outs[site.layer], atol=1e-5, rtol=1e-5)


def test_last_and_mean_positions_ignore_padding():
    model = tiny_model("gpt2")
    for side in ("left", "right"):
        tokenizer = word_tokenizer(side, bos=True)
        every = HeadCapture(model, tokenizer, positions="all", store_dtype=torch.float32).run(TEXTS)
        last = HeadCapture(model, tokenizer, positions="last", store_dtype=torch.float32).run(TEXTS)
        mean = HeadCapture(model, tokenizer, positions="mean", store_dtype=torch.float32).run(TEXTS)
        for i in range(len(TEXTS)):
            rows = (every.example == i).nonzero()[0]
            torch.testing.assert_close(last.activations[i], every.activations[rows[-1]], atol=1e-5, rtol=0)
            torch.testing.assert_close(mean.activations[i], every.activations[rows].mean(0), atol=1e-5, rtol=0)
            assert last.token[i] == len(rows) - 1


def test_marked_positions_read_the_token_at_the_marked_character():
    model = tiny_model("llama")
    tokenizer = word_tokenizer("left", bos=True)
    texts = ["mary gave a drink to john", "the capital of france is paris"]
    marks = [[texts[0].index("drink")], [texts[1].index("france"), texts[1].index("paris")]]
    every = HeadCapture(model, tokenizer, positions="all", store_dtype=torch.float32).run(texts)
    marked = HeadCapture(model, tokenizer, positions="marked", store_dtype=torch.float32).run(texts, marks)
    # with a [BOS] token first, word w of a text is token w + 1
    assert marked.example.tolist() == [0, 1, 1]
    assert marked.token.tolist() == [4, 4, 6]
    for row, (example, token) in enumerate(zip(marked.example, marked.token)):
        match = ((every.example == example) & (every.token == token)).nonzero()[0]
        torch.testing.assert_close(marked.activations[row], every.activations[match[0]], atol=1e-5, rtol=0)


def test_layer_subset_and_negative_layers():
    model = tiny_model("gpt_neox")
    tokenizer = word_tokenizer(bos=True)
    full = HeadCapture(model, tokenizer, store_dtype=torch.float32).run(TEXTS)
    last_only = HeadCapture(model, tokenizer, layers=[-1], store_dtype=torch.float32)
    assert last_only.layers == [1]
    torch.testing.assert_close(last_only.run(TEXTS).activations[:, 0], full.activations[:, 1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_capture_in_half_precision_stays_close_to_float32(dtype):
    model = tiny_model("llama")
    tokenizer = word_tokenizer(bos=True)
    ref = HeadCapture(model, tokenizer, store_dtype=torch.float32).run(TEXTS).activations
    half = HeadCapture(model.to(dtype), tokenizer, store_dtype=torch.float32).run(TEXTS).activations
    # a few roundings of the format's precision relative to the largest output: float16 ~4e-4, bfloat16 ~3e-3
    # (measured: 1.1e-4 and 6.8e-4 of a largest |z| of 0.22; the mean |z| is 0.04)
    assert abs(half - ref).max() < 2 * torch.finfo(dtype).eps * abs(ref).max()
