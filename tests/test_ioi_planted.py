"""A planted IOI circuit (InterpBench-style positive control, ``cybershiptrooper/iit``, ``iit/tasks/ioi/``): a toy
transformer whose weights are set by hand so that a duplicate-token head (L0H1) marks the subject's second mention,
an S-inhibition head (L1H2) reads the subject's name from there into an inhibition subspace at every later position,
and two name movers (L2H0, L2H3) attend from the final position to the names that are *not* inhibited (the indirect
object) and copy them into the logits. The other 8 heads keep their small random initialisation.

The IOI detector (the ``name_mover`` role with its ``name_copy`` partner, :mod:`roles.rule`) and the toy IOI
verdict (:func:`roles.mapping.map_heads` and :class:`roles.mapping.TargetSummary`) must find exactly the two
planted name movers, and nothing once their attention is made uniform or their OV circuit zeroed. The expected heads
are the ones planted here, not anything the code under test computes.

Residual stream (no LayerNorm, attention only, width 64): dims 0-23 the name's one-hot, 24-47 the inhibition
subspace, then a constant 1, an is-name flag, an is-filler flag, the position ``j`` and the duplicate head's output.
Logit scales below are after the ``1 / sqrt(d_head)`` of the attention.
"""

from __future__ import annotations

import math

import pytest
import torch

from data.tasks import make_task
from roles.mapping import Batches, DetectConfig, TargetSummary, map_heads
from roles.registry import measure_heads
from roles.rule import apply_rule
from toymodels.ioi_circuit import name_mover_circuit
from toymodels.modeling import ToyTransformer, ToyTransformerConfig

N_NAMES, D_MODEL, D_HEAD = 24, 64, 32
NAME, INHIB = slice(0, 24), slice(24, 48)
BIAS, IS_NAME, IS_FILLER, POS, DPOS = 48, 49, 50, 51, 52
DUPLICATE, S_INHIBITION = (0, 1), (1, 2)
NAME_MOVERS = {(2, 0), (2, 3)}
SCALE = math.sqrt(D_HEAD)


def _head(model: ToyTransformer, layer: int, head: int) -> tuple[torch.nn.Module, slice]:
    """The attention module of ``layer`` and the rows of ``head`` in its q/k/v projections, all zeroed."""
    attn = model.blocks[layer].attn
    rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight[rows] = 0
    attn.out_proj.weight[:, rows] = 0
    return attn, rows


def _embeddings(model: ToyTransformer, vocab: int, seq: int) -> None:
    """Names: one-hot + is-name; fillers: is-filler; every token the constant 1; position ``j`` in POS; the
    unembedding reads the name one-hot (logit 5 per unit)."""
    model.embed.weight.zero_()
    model.embed.weight[:, BIAS] = 1
    model.embed.weight[:N_NAMES, NAME] = torch.eye(N_NAMES)
    model.embed.weight[:N_NAMES, IS_NAME] = 1
    model.embed.weight[N_NAMES:vocab, IS_FILLER] = 1
    model.pos_embed.weight.zero_()
    model.pos_embed.weight[:seq, POS] = torch.arange(seq, dtype=torch.float32)
    model.lm_head.weight.zero_()
    model.lm_head.weight[:N_NAMES, NAME] = 5 * torch.eye(N_NAMES)


def _duplicate_head(model: ToyTransformer) -> None:
    """Score ``30 [name_i = name_j]`` (self included), so the subject's second mention splits its attention between
    both mentions; it writes ``-(mean attended position)`` into DPOS, so ``POS + DPOS`` is half the gap there and 0
    at a name's first mention."""
    attn, rows = _head(model, *DUPLICATE)
    start = rows.start
    attn.q_proj.weight[start:start + N_NAMES, NAME] = 30 * SCALE * torch.eye(N_NAMES)
    attn.k_proj.weight[start:start + N_NAMES, NAME] = torch.eye(N_NAMES)
    attn.v_proj.weight[start, POS] = -1
    attn.out_proj.weight[DPOS, start] = 1


def _s_inhibition_head(model: ToyTransformer) -> None:
    """From every query, score ``20 (POS + DPOS) - 300 is_filler`` on the key: the subject's second mention wins;
    it copies that name's one-hot into INHIB."""
    attn, rows = _head(model, *S_INHIBITION)
    start = rows.start
    attn.q_proj.weight[start, BIAS] = SCALE
    attn.k_proj.weight[start, POS] = 20
    attn.k_proj.weight[start, DPOS] = 20
    attn.k_proj.weight[start, IS_FILLER] = -300
    attn.v_proj.weight[start:start + N_NAMES, NAME] = torch.eye(N_NAMES)
    attn.out_proj.weight[INHIB, start:start + N_NAMES] = torch.eye(N_NAMES)


def _name_mover(model: ToyTransformer, layer: int, head: int, attend: bool = True, copy: bool = True) -> None:
    """Score ``10 is_name_j - 20 <INHIB_i, name_j>``: the names not inhibited (the IO) win; OV copies the name's
    one-hot into the name dims the unembedding reads. ``attend=False`` leaves the query zero (uniform attention),
    ``copy=False`` the OV circuit zero."""
    attn, rows = _head(model, layer, head)
    start = rows.start
    if attend:
        attn.q_proj.weight[start, BIAS] = 10 * SCALE
        attn.k_proj.weight[start, IS_NAME] = 1
        attn.q_proj.weight[start + 1:start + 1 + N_NAMES, INHIB] = -20 * SCALE * torch.eye(N_NAMES)
        attn.k_proj.weight[start + 1:start + 1 + N_NAMES, NAME] = torch.eye(N_NAMES)
    if copy:
        attn.v_proj.weight[start:start + N_NAMES, NAME] = torch.eye(N_NAMES)
        attn.out_proj.weight[NAME, start:start + N_NAMES] = torch.eye(N_NAMES)


@torch.no_grad()
def planted_model(attend: bool = True, copy: bool = True, inhibit: bool = True) -> ToyTransformer:
    """The planted 3 x 4 model (see the module docstring); ``inhibit=False`` zeroes the S-inhibition head."""
    task = make_task("ioi")
    torch.manual_seed(0)
    config = ToyTransformerConfig(vocab_size=task.vocab_size, max_position_embeddings=task.seq_len,
                                  hidden_size=D_MODEL, num_hidden_layers=3, num_attention_heads=4, head_dim=D_HEAD,
                                  attn_only=True, layer_norm=False, positional="learned")
    model = ToyTransformer(config)
    _embeddings(model, task.vocab_size, task.seq_len)
    _duplicate_head(model)
    if inhibit:
        _s_inhibition_head(model)
    else:
        _head(model, *S_INHIBITION)
    for layer, head in sorted(NAME_MOVERS):
        _name_mover(model, layer, head, attend, copy)
    return model.eval()


def _batches() -> Batches:
    task = make_task("ioi")
    return Batches(task.detection_batch(32, 1), task.batch(128, 2), task.batch(128, 3))


def _detected(verdict) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in verdict.detected.nonzero().tolist()}


def _name_mover_heads(model: ToyTransformer) -> set[tuple[int, int]]:
    evidence = measure_heads(model, _batches().detect, ["name_mover", "name_copy"])
    return _detected(apply_rule(evidence, D_HEAD)["name_mover"])


def test_planted_circuit_solves_ioi():
    batch = _batches().eval
    logits = planted_model()(input_ids=batch["input_ids"]).logits[:, -1]
    assert bool((logits.argmax(-1) == batch["targets"][:, -1]).all())


def test_planted_duplicate_and_s_inhibition_heads_attend_where_the_circuit_says():
    batch = _batches().detect
    out = planted_model()(input_ids=batch["input_ids"], output_attentions=True)
    rows = torch.arange(len(batch["input_ids"]))
    s_positions = batch["s_mask"].int().cumsum(1)  # 1 at the first mention onwards, 2 from the second
    s1 = (s_positions == 1).int().argmax(1)
    s2 = (s_positions == 2).int().argmax(1)
    duplicate = out.attentions[DUPLICATE[0]][rows, DUPLICATE[1], s2, s1]
    inhibition = out.attentions[S_INHIBITION[0]][rows, S_INHIBITION[1], -1, s2]
    assert duplicate.min() > 0.49 and inhibition.min() > 0.99


def test_name_mover_detector_finds_exactly_the_planted_name_movers():
    assert _name_mover_heads(planted_model()) == NAME_MOVERS


def test_toy_ioi_verdict_finds_exactly_the_planted_name_movers_and_their_group_is_functional():
    cfg = DetectConfig(n_null=0)
    head_map = map_heads(planted_model(), _batches(), "name_mover", cfg, seed=0)
    rows = head_map.table.rows("name_mover")
    detected = {(int(r.layer), int(r.head)) for r in rows.itertuples() if r.detected}
    target = TargetSummary.of(head_map, "name_mover", cfg.min_effect)
    assert detected == NAME_MOVERS
    assert set(head_map.group.heads) == NAME_MOVERS and target.group_functional and target.formed
    effect = head_map.ablations[cfg.ablation].effect
    planted = NAME_MOVERS | {DUPLICATE, S_INHIBITION}
    others = [float(effect[a, b]) for a in range(3) for b in range(4) if (a, b) not in planted]
    assert min(float(effect[a, b]) for a, b in NAME_MOVERS) > 0.1 and max(others) < 0.01


def test_toy_name_mover_circuit_verdict_passes_on_the_planted_circuit_and_patching_removes_selectivity():
    """The toy IOI verdict (selectivity on ABBA and BABA, OV copy, ablation against random groups, patching the
    S-inhibition candidates from ABC runs) on the planted circuit: exactly the planted movers, most of the clean
    logit difference removed by their ablation, and the movers' selectivity gone once the S-inhibition head's
    output comes from ABC runs (where no name repeats, so it cannot say which name to avoid)."""
    circuit = name_mover_circuit(planted_model(), None, _batches().eval, floor=0.3)
    assert set(circuit.heads) == NAME_MOVERS and circuit.passed
    assert circuit.drop > 0.5 * circuit.clean_logit_diff > 0
    assert set(circuit.s_inhibition_heads) == {S_INHIBITION}
    assert circuit.mover_selectivity > 0.9 and circuit.patched_selectivity < 0.1


def test_toy_name_mover_circuit_verdict_fails_without_selective_attention():
    assert not name_mover_circuit(planted_model(attend=False), None, _batches().eval, floor=0.3).passed


@pytest.mark.parametrize("change", [{"attend": False}, {"copy": False}], ids=["uniform-attention", "zero-ov"])
def test_name_movers_with_uniform_attention_or_zero_ov_are_not_detected(change):
    assert _name_mover_heads(planted_model(**change)) == set()
