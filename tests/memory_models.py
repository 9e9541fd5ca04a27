"""Tiny Llama models for the knockout localiser: factual prompts ``BOS the capital of SUBJECT is -> ANSWER`` over a
64-token vocabulary, and a model with a memory head planted at a shallow layer.

The planted head reads the subject at the final position and writes its answer: its query (from "is") and key (from
a subject flag) live in the RoPE pair with the lowest frequency (``rope_theta = 1e6``: a rotation of ~1e-5 rad per
position), so its score does not depend on position; its value copies the subject's identity dimensions and its
output writes them onto the answer's dimensions, which the unembedding reads. Everything else is the ordinary
random initialisation (std 0.02), so no other head matters.
"""

from __future__ import annotations

import torch
import transformers

VOCAB, D_MODEL, N_HEADS, N_SUBJECTS = 64, 64, 4, 16
BOS, THE, CAPITAL, OF, IS = 1, 2, 3, 4, 5
SUBJECT0, ANSWER0 = 8, 40  # subject i is token 8 + i, its answer 40 + i
SUBJECT_FLAG, IS_FLAG, ANSWER_DIM0 = 16, 17, 32  # embedding dimensions


def fact_batch(n: int = N_SUBJECTS) -> dict[str, torch.Tensor]:
    """``input_ids`` ``[n, 6]``, ``answers`` ``[n]``, ``subject_mask`` ``[n, 6]`` (position 4)."""
    subjects = torch.arange(SUBJECT0, SUBJECT0 + n)
    ids = torch.tensor([BOS, THE, CAPITAL, OF, 0, IS]).repeat(n, 1)
    ids[:, 4] = subjects
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4] = True
    return {"input_ids": ids, "answers": subjects - SUBJECT0 + ANSWER0, "subject_mask": mask,
            "distractors": torch.arange(ANSWER0, ANSWER0 + N_SUBJECTS)}


def fact_model(n_layers: int = 4, kv_heads: int = N_HEADS, seed: int = 0, init: float = 0.02) -> torch.nn.Module:
    """A random tiny Llama (eager attention) for :func:`fact_batch`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=n_layers,
                                      num_attention_heads=N_HEADS, num_key_value_heads=kv_heads,
                                      intermediate_size=128, max_position_embeddings=32, rope_theta=1e6,
                                      tie_word_embeddings=False, initializer_range=init,
                                      attn_implementation="eager")
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def plant_memory_head(model: torch.nn.Module, layer: int = 0, head: int = 0, gain: float = 4.0) -> torch.nn.Module:
    """Make head (``layer``, ``head``) of a :func:`fact_model` a memory head (see the module docstring)."""
    d_head = D_MODEL // N_HEADS
    embed = model.model.embed_tokens.weight
    for i in range(N_SUBJECTS):
        embed[SUBJECT0 + i, i] += 1.0
        embed[SUBJECT0 + i, SUBJECT_FLAG] += 1.0
    embed[IS, IS_FLAG] += 1.0
    attn = model.model.layers[layer].self_attn
    rows = slice(head * d_head, (head + 1) * d_head)
    slow = head * d_head + d_head // 2 - 1  # the lowest-frequency RoPE pair: dimensions d/2 - 1 and d - 1
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight[rows] = 0
    attn.q_proj.weight[slow, IS_FLAG] = 1.0
    attn.k_proj.weight[slow, SUBJECT_FLAG] = 1.0
    attn.v_proj.weight[rows, :d_head] = torch.eye(d_head)
    attn.o_proj.weight[:, rows] = 0
    attn.o_proj.weight[ANSWER_DIM0:ANSWER_DIM0 + d_head, rows] = gain * torch.eye(d_head)
    model.lm_head.weight[ANSWER0:ANSWER0 + N_SUBJECTS, ANSWER_DIM0:ANSWER_DIM0 + N_SUBJECTS] += torch.eye(N_SUBJECTS)
    return model


@torch.no_grad()
def plant_amplifier_head(model: torch.nn.Module, layer: int = 2, head: int = 1, gain: float = 4.0) -> torch.nn.Module:
    """Make head (``layer``, ``head``) of a :func:`fact_model` (with a memory head below it) an amplification head:
    from the final position it attends to the final position itself (query and key both read the "is" flag) and
    writes back, amplified, the answer dimensions it finds there; it never reads the subject."""
    d_head = D_MODEL // N_HEADS
    model.model.embed_tokens.weight[IS, IS_FLAG] = 1.0
    attn = model.model.layers[layer].self_attn
    rows = slice(head * d_head, (head + 1) * d_head)
    slow = head * d_head + d_head // 2 - 1
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight[rows] = 0
    attn.q_proj.weight[slow, IS_FLAG] = 20.0  # the answer dimensions dominate the normed residual there: scale up
    attn.k_proj.weight[slow, IS_FLAG] = 20.0
    attn.v_proj.weight[rows, ANSWER_DIM0:ANSWER_DIM0 + d_head] = torch.eye(d_head)
    attn.o_proj.weight[:, rows] = 0
    attn.o_proj.weight[ANSWER_DIM0:ANSWER_DIM0 + d_head, rows] = gain * torch.eye(d_head)
    return model
