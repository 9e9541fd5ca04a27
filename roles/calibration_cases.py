"""The cases of the calibration harness (:mod:`roles.calibrate`): random models per architecture, a detection batch
per role carrying the keys that role requires (from the task whose role it is), and planted positives.

Random models cycle through three initialisations, as ``tests/test_calibration.py`` does: the architecture's
training init, unit attention logits (``std = hidden ** -0.5``, the sharp patterns a random head can have) and twice
that. A **planted** head is one head (layer 1, head 0) of a random model whose attention pattern is replaced by
``PLANT * target + (1 - PLANT) * its own pattern``, ``target`` the role's target keys normalised per query (queries
without a target keep their own pattern); the detector reads the planted patterns through ``batch["attentions"]``
(:func:`roles.patterns.patterns_of`).
"""

from __future__ import annotations

import torch
import transformers

import toymodels
from data.tasks import Batch, make_task
from roles.mapping import DetectConfig

HIDDEN = 32
PATHS: tuple[str, ...] = ("toy", "gpt2", "gpt_neox", "llama", "bert")
PLANT = 0.6
"""Share of the planted head's attention on the role's targets (its floor is 0.3)."""
PLANT_BY_ROLE = {"operand_attention": 0.9}
"""Roles whose planted head puts more on its targets: a trained operand head leaves ``=`` almost no attention and
splits the rest over ``a`` and ``b`` (Nanda et al. 2023), and that role's floor is 0.6 of a chance-corrected score
(:func:`roles.patterns.operand_attention`), which a 0.6 mix over a sharp random pattern cannot reach."""
PLANTED = (1, 0)
"""(layer, head) of the planted head."""

GROUPS: dict[str, tuple[str, ...]] = {
    "induction": ("previous_token", "duplicate_token", "induction", "attention_sink", "copying"),
    "iteration": ("iteration",),
    "modular_addition": ("operand_attention",),
    "ioi": ("name_mover", "name_copy"),
    "successor": ("successor",),
    "knowledge": ("memory", "amplification"),
}
"""Which batch serves which detectors; the detectors of one batch are judged together (one BH correction), as in a
task's own run."""

OV_ROLES = {"copying", "successor", "name_copy", "amplification", "name_mover", "memory"}
"""Roles that read the model's map to logits (an encoder path has none); name_mover and memory need their OV or
logit partner (:data:`roles.rule.ALSO_REQUIRES`)."""


def knowledge_batch(size: int, vocab: int, seed: int, length: int = 12) -> Batch:
    """Synthetic factual prompts for memory and amplification on models without a tokenizer: random tokens, a
    two-token subject at positions 4-5, answers drawn from 8 distractor tokens (no signal: a random model knows
    no fact)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (size, length), generator=generator)
    distractors = torch.randperm(vocab - 3, generator=generator)[:8] + 3
    answers = distractors[torch.randint(0, 8, (size,), generator=generator)]
    subject = torch.zeros(size, length, dtype=torch.bool)
    subject[:, 4:6] = True
    return {"input_ids": ids, "answers": answers, "distractors": distractors, "subject_mask": subject}


def group_batch(group: str, size: int, seed: int = 1) -> Batch:
    """The detection batch of ``group`` (:data:`GROUPS`), ``size`` sequences."""
    if group == "induction":
        task = make_task("induction", vocab=30, length=48, min_segment=8, max_segment=16)
        return {"input_ids": task.detection_batch(size, seed)["input_ids"] + 3}
    if group == "knowledge":
        return knowledge_batch(size, 64, seed)
    if group == "modular_addition":
        return make_task("modular_addition", p=53).detection_batch(size, seed)
    return make_task(group).detection_batch(size, seed)


def vocab_of(batch: Batch) -> int:
    """A vocabulary that holds every token of ``batch`` (at least 64)."""
    top = max(int(v.max()) for k, v in batch.items()
              if isinstance(v, torch.Tensor) and v.dtype != torch.bool and k != "targets")
    return max(64, top + 1)


def _config(path: str, vocab: int) -> transformers.PretrainedConfig:
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if path == "toy":
        return toymodels.ToyTransformerConfig(**common)
    if path == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=HIDDEN, n_layer=2, n_head=4,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    if path == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, intermediate_size=64)
    if path == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, intermediate_size=64)
    return transformers.BertConfig(**common, intermediate_size=64, hidden_dropout_prob=0,
                                   attention_probs_dropout_prob=0)


def random_model(path: str, seed: int, vocab: int) -> torch.nn.Module:
    """A random model of ``path`` (2 layers, 4 heads, width 32); the initialisation cycles with ``seed`` through
    the training init, unit attention logits and twice unit logits."""
    torch.manual_seed(seed)
    config = _config(path, vocab)
    std = (None, HIDDEN**-0.5, 2 * HIDDEN**-0.5)[seed % 3]
    if std is not None:
        config.initializer_range = std
    if path == "toy":
        return toymodels.ToyTransformer(config).eval()
    auto = transformers.AutoModel if path == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager").eval()


def target_mask(role: str, batch: Batch) -> torch.Tensor | None:
    """Bool ``[batch, query, key]``: the keys a head of ``role`` attends to (None: no attention plant)."""
    if "input_ids" not in batch:  # a weights-only batch (the real-text ordinal families): nothing to attend to
        return None
    ids = batch["input_ids"]
    n, seq = ids.shape
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    if role == "previous_token":
        return (j == i - 1).expand(n, -1, -1)
    if role == "duplicate_token":
        return (ids[:, :, None] == ids[:, None, :]) & (j < i)
    if role == "induction":
        follows = torch.zeros(n, seq, seq, dtype=torch.bool)
        follows[:, :, 1:] = ids[:, :, None] == ids[:, None, :-1]
        return follows & (j < i) & (j >= 1)
    if role == "attention_sink":
        return ((j == 0) & (i >= 1)).expand(n, -1, -1)
    if role == "iteration":
        return batch["iteration_mask"]
    if role == "operand_attention":
        return batch["operand_mask"]
    if role == "name_mover":
        final = torch.zeros(n, seq, seq, dtype=torch.bool)
        final[:, -1] = batch["io_mask"]
        return final
    return None


WEIGHT_PLANTS = {"copying", "name_copy", "name_mover"}
"""Roles whose planted head also needs a copying OV circuit (:func:`plant_copying`; toy path only)."""


@torch.no_grad()
def plant_copying(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a toy ``model`` whose head :data:`PLANTED` copies: its OV circuit is ``Q Q^T`` (``W_V = Q``,
    ``W_O = Q^T``), ``Q`` the top ``d_head`` right singular vectors of the centred embeddings, and the unembedding
    tied to the embedding, so ``W_U norm(E)`` restricted to ``Q`` is close to a positive semi-definite Gram matrix
    and the head raises the logit of the token it reads."""
    import copy

    planted = copy.deepcopy(model)
    layer, head = PLANTED
    attn = planted.blocks[layer].attn
    d_head = attn.v_proj.weight.shape[0] // planted.config.num_attention_heads
    embed = planted.embed.weight
    _, _, vh = torch.linalg.svd(embed - embed.mean(-1, keepdim=True), full_matrices=False)
    q = vh[:d_head].T  # [d_model, d_head], orthonormal columns
    rows = slice(head * d_head, (head + 1) * d_head)
    attn.v_proj.weight[rows] = q.T
    attn.out_proj.weight[:, rows] = q
    if getattr(attn.v_proj, "bias", None) is not None:
        attn.v_proj.bias[rows] = 0
    planted.lm_head.weight.copy_(embed)
    return planted


def plant(patterns: torch.Tensor, target: torch.Tensor, share: float = PLANT) -> torch.Tensor:
    """``patterns`` ``[batch, layer, head, query, key]`` with head :data:`PLANTED` mixed towards ``target``, ``share``
    of its attention on the targets."""
    out = patterns.clone()
    layer, head = PLANTED
    weights = target.float()
    has = weights.sum(-1, keepdim=True) > 0
    wanted = weights / weights.sum(-1, keepdim=True).clamp_min(1)
    own = out[:, layer, head]
    out[:, layer, head] = torch.where(has, share * wanted + (1 - share) * own, own)
    return out


def batch_size() -> int:
    """The detection batch size at the defaults."""
    return DetectConfig().batch_size


SUCCESSOR_WIDTH = 64
"""Width of the 1-head-per-layer toy model that carries the planted successor head (see :func:`plant_successor`)."""


@torch.no_grad()
def plant_successor(seed: int, vocab: int, pairs: torch.Tensor) -> torch.nn.Module:
    """A random toy model (2 layers, one head of width :data:`SUCCESSOR_WIDTH` per layer, the seed's init) whose head
    :data:`PLANTED`'s layer maps each ordinal of ``pairs [n, 2]`` to its successor: ``W_V W_O = M``, ``M`` the
    least-squares map from the ordinals' embeddings, as the layer reads them (through its input norm), to their
    successors' embeddings, with the unembedding tied to the embedding. Succession over n ordinals needs an OV of
    rank >= n (55 in the toy successor batch), more than the calibration models' 8-wide heads have, hence the wider
    single head."""
    from roles.ov import ov_circuit

    torch.manual_seed(seed)
    config = toymodels.ToyTransformerConfig(vocab_size=vocab, hidden_size=SUCCESSOR_WIDTH, num_hidden_layers=2,
                                            num_attention_heads=1, max_position_embeddings=64)
    std = (None, SUCCESSOR_WIDTH**-0.5, 2 * SUCCESSOR_WIDTH**-0.5)[seed % 3]
    if std is not None:
        config.initializer_range = std
    model = toymodels.ToyTransformer(config).eval()
    model.lm_head.weight.copy_(model.embed.weight)
    layer, _ = PLANTED
    circuit = ov_circuit(model, layer)
    read = circuit.read(circuit.embed[pairs[:, 0]].float())  # [n, d_model]
    target = model.embed.weight[pairs[:, 1]]  # [n, d_model]
    mapping = torch.linalg.lstsq(read, target).solution  # [d_model, d_model]
    attn = model.blocks[layer].attn
    attn.v_proj.weight.copy_(mapping.T)  # v = x W_V with W_V = v_proj.weight^T
    attn.out_proj.weight.copy_(torch.eye(SUCCESSOR_WIDTH))
    if getattr(attn.v_proj, "bias", None) is not None:
        attn.v_proj.bias.zero_()
    return model
