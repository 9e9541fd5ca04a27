"""Successor heads as Gould et al. (2023) score them: each ordinal family weighted equally, the final norm's gain
folded into the unembedding, and tokens read through MLP0 alone. References by hand and from the model's own
forward pass with layer 0's attention switched off."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import toymodels
from roles.ov import final_norm_gain, mlp0_embeddings, successor


def _toy(ov: torch.Tensor, layer_norm: bool) -> toymodels.ToyTransformer:
    """1 layer, 1 head, vocab = d_model = 8, identity embedding, unembedding and W_V; W_O = ``ov``."""
    config = toymodels.ToyTransformerConfig(vocab_size=8, max_position_embeddings=8, hidden_size=8,
                                            num_hidden_layers=1, num_attention_heads=1, head_dim=8,
                                            layer_norm=layer_norm)
    model = toymodels.ToyTransformer(config)
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(8))
        model.lm_head.weight.copy_(torch.eye(8))
        model.blocks[0].attn.v_proj.weight.copy_(torch.eye(8))
        model.blocks[0].attn.out_proj.weight.copy_(ov.T)
    return model


def _cycle(members: list[int]) -> list[list[int]]:
    return [[a, members[(k + 1) % len(members)]] for k, a in enumerate(members)]


def test_each_family_counts_equally():
    # tokens 0-5: a cycle the head's OV maps to successors; tokens 6, 7: a family it copies (no successor). Pairs:
    # 6 of family 0, all right; 2 of family 1, all wrong. Per pair that is 6/8 = 0.75; per family (0 + 1) / 2.
    ov = torch.zeros(8, 8)
    for a, b in _cycle(list(range(6))):
        ov[a, b] = 1
    ov[6, 6] = ov[7, 7] = 1
    pairs = torch.tensor([*_cycle(list(range(6))), [6, 7], [7, 6]])
    family = torch.tensor([0] * 6 + [1] * 2)
    evidence = successor(_toy(ov, False), {"successor_pairs": pairs, "successor_family": family})
    assert float(evidence.score[0, 0]) == pytest.approx(0.5)
    assert float(evidence.differences.mean()) == pytest.approx(float(evidence.score[0, 0] - evidence.control[0, 0]))


def test_the_final_norms_gain_is_folded_into_the_unembedding():
    # two 4-cycles, OV = successor on both, final-norm gain -1 on dimension 5. After the input LayerNorm, token t
    # writes (e_{t+1} - 1/8) / s. With the gain folded, the logit of 5 flips sign: token 4 (successor 5) now ties
    # 4, 6 and 7 at -1/(8s) and the argmax takes 4 (a miss), while 5 -> 6, 6 -> 7 and 7 -> 4 still hit (token 5
    # only rises to +1/(8s) < 7/(8s)). Family scores 4/4 and 3/4: 0.875. Without folding: 1.
    ov = torch.zeros(8, 8)
    pairs = torch.tensor(_cycle([0, 1, 2, 3]) + _cycle([4, 5, 6, 7]))
    for a, b in pairs.tolist():
        ov[a, b] = 1
    model = _toy(ov, True)
    with torch.no_grad():
        model.ln_f.weight[5] = -1.0
    assert final_norm_gain(model).tolist() == [1, 1, 1, 1, 1, -1, 1, 1]
    batch = {"successor_pairs": pairs, "successor_family": torch.tensor([0] * 4 + [1] * 4)}
    assert float(successor(model, batch).score[0, 0]) == pytest.approx(1.0)
    assert float(successor(model, {**batch, "fold_final_norm": torch.tensor(True)}).score[0, 0]) == 0.875


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_mlp0_embeddings_are_the_first_block_without_attention(arch):
    # reference: the model's own forward pass on one token with layer 0's attention output zeroed and no position
    # embedding: hidden_states[1] = E[t] + MLP0(norm(E[t])) (NeoX's parallel residual gives the same)
    model = tiny_model(arch, seed=3, causal_lm=True).eval()
    tokens = torch.tensor([3, 5, 7, 11])
    ours = mlp0_embeddings(model, tokens)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            first_attention_out = any(f"{p}.0.{q}" in name for p in ("h", "layers")
                                      for q in ("attn.c_proj", "self_attn.o_proj", "attention.dense"))
            if first_attention_out or name.endswith("wpe.weight"):
                parameter.zero_()
        reference = model(input_ids=tokens[:, None], output_hidden_states=True).hidden_states[1][:, 0]
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference.float(), atol=1e-5)
    assert not torch.allclose(ours, model.get_input_embeddings().weight[tokens].float(), atol=1e-3)  # MLP0 adds
