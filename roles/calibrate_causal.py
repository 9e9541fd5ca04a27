"""The functional and group criteria rows of the calibration table (:mod:`roles.calibrate`), on the toy path.

Task: predict the current token (``targets = input_ids``) of random token sequences, so a head that attends to its
own token and copies it helps, and nothing else does.

* Null: random toy models (:func:`roles.calibration_cases.random_model`), where no head matters. The **functional**
  criterion (:func:`roles.ablation.is_functional` at the defaults: effect minus the mean effect of the other heads
  above ``effect_sigma`` standard errors, ``min_effect`` and the other heads' spread) is applied to each head in
  turn as if it alone were detected;
  the **group** criterion (:meth:`roles.mapping.GroupCheck.functional`, against ``random_groups`` random groups)
  to :data:`GROUP_PAIRS` pairs of heads drawn at random per model (as if a detector had picked two arbitrary
  heads).
* Planted: the same models with head (0, 0) made a self-copying head (:func:`plant_self_copy`), which must pass
  the functional criterion; and with heads (0, 0) and (0, 1) made two redundant self-copying heads, which together
  must pass the group criterion (random pairs holding one of them lose little: the other still copies).
"""

from __future__ import annotations

import copy

import torch

from roles import calibration_cases as cases
from roles.ablation import ablation_effects, is_functional, random_head_reference, random_head_spread
from roles.mapping import Batches, DetectConfig, group_check

VOCAB, LENGTH = 64, 24
GAIN = 4.0
"""Scale of the planted head's output."""
GROUP_PAIRS = 5
"""Random pairs judged by the group criterion per random model (tests of the group row: models x pairs)."""


def copy_batch(size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens whose target at each position is the token itself."""
    ids = torch.randint(3, VOCAB, (size, LENGTH), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "targets": ids.clone()}


@torch.no_grad()
def plant_self_copy(model: torch.nn.Module, heads: tuple[tuple[int, int], ...] = ((0, 0),)) -> torch.nn.Module:
    """A copy of a toy ``model`` whose ``heads`` (default (0, 0)) attend to their own token and copy it:
    ``W_Q = W_K = s Q`` and ``W_V W_O = GAIN Q Q^T``, ``Q`` the top ``d_head`` right singular vectors of the centred
    embeddings, the unembedding tied to the embedding (query-key score ``s^2 |Q^T x|^2`` is largest for the same
    token). Several planted heads are redundant: each alone already copies."""
    planted = copy.deepcopy(model)
    embed = planted.embed.weight
    _, _, vh = torch.linalg.svd(embed - embed.mean(-1, keepdim=True), full_matrices=False)
    for layer, head in heads:
        attn = planted.blocks[layer].attn
        d_head = attn.v_proj.weight.shape[0] // planted.config.num_attention_heads
        q = vh[:d_head]  # [d_head, d_model]
        rows = slice(head * d_head, (head + 1) * d_head)
        for proj, scale in ((attn.q_proj, 4.0), (attn.k_proj, 4.0), (attn.v_proj, GAIN)):
            proj.weight[rows] = scale * q
            if getattr(proj, "bias", None) is not None:
                proj.bias[rows] = 0
        attn.out_proj.weight[:, rows] = q.T
    planted.lm_head.weight.copy_(embed)
    return planted


def functional_heads(model: torch.nn.Module, batch: dict, cfg: DetectConfig) -> torch.Tensor:
    """Bool ``[layer, head]``: each head judged functional as if it alone were detected."""
    result = ablation_effects(model, batch, cfg.ablation)
    out = torch.zeros_like(result.effect, dtype=torch.bool)
    for layer, head in [(a, b) for a in range(out.shape[0]) for b in range(out.shape[1])]:
        alone = torch.zeros_like(out)
        alone[layer, head] = True
        reference = random_head_reference(result.effect, alone)
        spread = random_head_spread(result.effect, alone)
        out[layer, head] = bool(is_functional(result.effect, result.stderr, alone, reference, cfg.effect_sigma,
                                              cfg.min_effect, spread)[layer, head])
    return out


def group_passes(model: torch.nn.Module, batch: dict, heads: list[tuple[int, int]], cfg: DetectConfig,
                 seed: int) -> bool:
    detected = torch.zeros(2, 4, dtype=torch.bool)
    for layer, head in heads:
        detected[layer, head] = True
    batches = Batches(batch, batch, copy_batch(len(batch["input_ids"]), seed + 1))
    check = group_check(model, batches, detected, cfg, seed)
    return check is not None and check.functional(cfg.min_effect, cfg.alpha)


def causal_counts(models: int, size: int = 64) -> dict[str, dict[str, int]]:
    """Counts ``tests``, ``fp``, ``planted``, ``found`` of the functional and group criteria over ``models``."""
    cfg = DetectConfig()
    functional = {"tests": 0, "fp": 0, "planted": 0, "found": 0}
    group = dict(functional)
    for seed in range(models):
        batch = copy_batch(size, seed)
        model = cases.random_model("toy", seed, VOCAB)
        null = functional_heads(model, batch, cfg)
        functional["tests"] += null.numel()
        functional["fp"] += int(null.sum())
        generator = torch.Generator().manual_seed(seed)
        for draw in range(GROUP_PAIRS):
            picked = torch.randperm(8, generator=generator)[:2].tolist()
            group["tests"] += 1
            group["fp"] += int(group_passes(model, batch, [divmod(i, 4) for i in picked], cfg, seed + 1000 * draw))
        planted = plant_self_copy(model)
        functional["planted"] += 1
        functional["found"] += int(functional_heads(planted, batch, cfg)[0, 0])
        group["planted"] += 1
        pair = ((0, 0), (0, 1))
        group["found"] += int(group_passes(plant_self_copy(model, pair), batch, list(pair), cfg, seed))
    return {"functional": functional, "group": group}
