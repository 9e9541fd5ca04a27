"""The toy transformer: a Hugging Face model that returns its attention patterns and exposes headlab's hook point."""

import os

os.environ["WANDB_MODE"] = "disabled"

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import toymodels
from data.tasks import sequence_loss, target_loss
from headlab.heads import head_sites, hook_heads
from headlab.interventions import zero_ablation
from roles.ablation import (
    AblationResult,
    ablation_effects,
    group_effect,
    is_functional,
    random_head_reference,
    random_head_spread,
)


def _model(**overrides) -> toymodels.ToyTransformer:
    torch.manual_seed(0)
    options = dict(vocab_size=20, max_position_embeddings=12, hidden_size=16, num_hidden_layers=2,
                   num_attention_heads=4, initializer_range=0.3)
    options.update(overrides)
    return toymodels.ToyTransformer(toymodels.ToyTransformerConfig(**options)).eval()


IDS = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("positional", ["learned", "rotary", "shortformer", "none"])
@pytest.mark.parametrize("attn_only", [True, False])
def test_attention_patterns_are_causal_rows_that_sum_to_one_and_match_the_fast_path(positional, attn_only):
    model = _model(positional=positional, attn_only=attn_only)
    out = model(IDS, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 12, 12)
    for pattern in out.attentions:
        assert torch.allclose(pattern.sum(-1), torch.ones(3, 4, 12), atol=1e-5)
        assert float(pattern.detach().triu(1).abs().max()) == 0.0
    assert torch.allclose(model(IDS).logits, out.logits, atol=1e-5)  # sdpa path == explicit path


def test_positional_scheme_changes_the_function():
    logits = [_model(positional=p)(IDS).logits for p in ("learned", "rotary", "shortformer", "none")]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(logits[a], logits[b], atol=1e-4)


def test_without_positions_a_causal_model_is_blind_to_order_of_the_prefix():
    # with no positional signal the last position's output is invariant to permuting the earlier tokens
    model = _model(positional="none", num_hidden_layers=1)
    ids = IDS[:1]
    permuted = torch.cat((ids[:, :-1].flip(1), ids[:, -1:]), dim=1)
    assert torch.allclose(model(ids).logits[:, -1], model(permuted).logits[:, -1], atol=1e-5)


def test_save_and_load_through_the_auto_classes(tmp_path):
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "headlab_toy"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, toymodels.ToyTransformer)
    assert loaded.lm_head.weight is loaded.embed.weight
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_hook_point_sees_pattern_times_values():
    model = _model()
    captured = {}
    with hook_heads(model, lambda layer, z: captured.setdefault(layer, z.clone())):
        out = model(IDS, output_attentions=True)
    sites = head_sites(model)
    assert [s.name for s in sites] == ["blocks.0.attn.out_proj", "blocks.1.attn.out_proj"]
    # layer 0 by hand: z_h = A_h (x W_V^h) with x = LN(embed + pos)
    attn = model.blocks[0].attn
    x = model.blocks[0].ln1(model.embed(IDS) + model.pos_embed(torch.arange(12)))
    v = attn.v_proj(x).view(3, 12, 4, 4).transpose(1, 2)  # [B, H, T, dh]
    expected = (out.attentions[0] @ v).transpose(1, 2)  # [B, T, H, dh]
    assert torch.allclose(captured[0], expected, atol=1e-5)


def test_zero_ablation_through_the_hook_equals_zeroing_the_heads_output_weights():
    model = _model()
    targets = IDS.roll(-1, dims=1)
    with hook_heads(model, zero_ablation([(1, 2)])):
        hooked = model(IDS).logits
    with torch.no_grad():
        model.blocks[1].attn.out_proj.weight[:, 8:12] = 0  # head 2's columns (d_head 4)
    assert torch.allclose(hooked, model(IDS).logits, atol=1e-6)
    assert float(target_loss(hooked, targets)) > 0


def test_ablation_effects_match_a_manual_weight_edit():
    model = _model()
    batch = {"input_ids": IDS, "targets": IDS.roll(-1, dims=1)}
    result = ablation_effects(model, batch, kind="zero")
    assert result.effect.shape == result.stderr.shape == (2, 4)
    clean = sequence_loss(model(IDS).logits, batch["targets"])
    assert result.clean_loss == pytest.approx(float(target_loss(model(IDS).logits, batch["targets"])), abs=1e-5)
    with torch.no_grad():
        model.blocks[0].attn.out_proj.weight[:, 4:8] = 0  # layer 0 head 1
    diff = sequence_loss(model(IDS).logits, batch["targets"]) - clean
    assert float(result.effect[0, 1]) == pytest.approx(float(diff.mean()), abs=1e-5)
    assert float(result.stderr[0, 1]) == pytest.approx(float(diff.std() / 3**0.5), abs=1e-5)


def test_pattern_preserving_ablation_keeps_later_patterns_fixed():
    model = _model()
    batch = {"input_ids": IDS, "targets": IDS.roll(-1, dims=1)}
    plain = ablation_effects(model, batch, kind="zero").effect
    preserved = ablation_effects(model, batch, kind="zero", pattern_preserving=True).effect
    # last layer heads feed no later attention, so freezing patterns changes nothing for them, but layer 0 does
    assert torch.allclose(plain[1], preserved[1], atol=1e-5)
    assert not torch.allclose(plain[0], preserved[0], atol=1e-5)


def test_functional_heads_beat_heads_without_a_function_by_more_than_their_noise():
    effect = torch.tensor([[0.1, 0.3], [1.0, 0.5]])
    stderr = torch.tensor([[0.05, 0.05], [0.1, 0.2]])
    detected_any = torch.tensor([[False, False], [True, True]])
    reference = random_head_reference(effect, detected_any)
    assert reference == pytest.approx(0.2)  # mean of the heads without a function, 0.1 and 0.3
    functional = is_functional(effect, stderr, detected_any, reference, n_sigma=3.0)
    # 1.0 - 0.2 = 0.8 > 3 * 0.1 -> functional; 0.5 - 0.2 = 0.3 < 3 * 0.2 -> not; undetected heads never are
    assert functional.tolist() == [[False, False], [True, False]]
    assert random_head_reference(effect, torch.ones(2, 2, dtype=torch.bool)) == 0.0
    tiny = is_functional(torch.full((1, 1), 0.005), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), 0.0)
    assert not bool(tiny)  # below the min_effect floor even with zero noise


def test_functional_heads_must_also_stand_out_from_the_other_heads_spread():
    # 7 heads without a function: effects 0.0 .. 0.6 (mean 0.3, sample sd 0.2160); two detected heads, no noise
    others = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    effect = torch.tensor([[*others, 1.42, 1.45]])
    stderr = torch.zeros(1, 9)
    detected = torch.tensor([[False] * 7 + [True, True]])
    s, n = random_head_spread(effect, detected)
    assert (s, n) == (pytest.approx(0.21602469, rel=1e-6), 7)
    # margin: the one-sided prediction bound at the normal tail of 3 sigma, t_6(0.99865) * s * sqrt(1 + 1/7),
    # with t_6(0.99865) = 4.9041 (a t table; a normal quantile, 3, would give a margin of 0.693): margin 1.1325
    margin = 4.9041 * 0.21602469 * (1 + 1 / 7) ** 0.5
    with_spread = is_functional(effect, stderr, detected, 0.3, n_sigma=3.0, spread=(s, n))
    assert 1.42 - 0.3 < margin < 1.45 - 0.3
    assert with_spread.tolist() == [[False] * 7 + [False, True]]  # 1.12 above the mean is inside, 1.15 outside
    without = is_functional(effect, stderr, detected, 0.3, n_sigma=3.0)
    assert without.tolist() == [[False] * 7 + [True, True]]  # noise alone (zero here) would call both functional


def test_group_ablation_equals_zeroing_all_heads_weights():
    model = _model()
    batch = {"input_ids": IDS, "targets": IDS.roll(-1, dims=1)}
    joint = group_effect(model, batch, [(0, 1), (1, 3)], kind="zero")
    clean = sequence_loss(model(IDS).logits, batch["targets"])
    with torch.no_grad():
        model.blocks[0].attn.out_proj.weight[:, 4:8] = 0
        model.blocks[1].attn.out_proj.weight[:, 12:16] = 0
    assert joint == pytest.approx(float((sequence_loss(model(IDS).logits, batch["targets"]) - clean).mean()), abs=1e-5)


def _manual_logits(model, ids, replace=None):
    """The toy model's forward written out by hand (attention-only, learned positions, LayerNorm): embeddings, then
    per layer ``z_h = softmax(q_h k_h^T / sqrt(d) + causal mask) v_h``, ``x += concat_h(z_h) W_O^T``. ``replace``
    maps ``(layer, head)`` to a function ``z_clean [B, T, dh] -> z_new``. Returns logits and every clean z."""
    n, t = ids.shape
    x = model.embed(ids) + model.pos_embed(torch.arange(t))
    zs = {}
    for layer, block in enumerate(model.blocks):
        a = block.attn
        h_in = block.ln1(x)
        q, k, v = (p(h_in).view(n, t, a.n_heads, a.d_head) for p in (a.q_proj, a.k_proj, a.v_proj))
        logits = torch.einsum("bihd,bjhd->bhij", q, k) / a.d_head**0.5
        logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        z = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v)  # [B, T, H, dh]
        zs[layer] = z.clone()
        for (rl, rh), fn in (replace or {}).items():
            if rl == layer:
                z[:, :, rh] = fn(z[:, :, rh])
        x = x + z.reshape(n, t, -1) @ a.out_proj.weight.T
    return model.lm_head(model.ln_f(x)), zs


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_mean_and_resample_ablation_match_a_hand_written_forward(kind):
    model = _model()
    ids = torch.randint(0, 20, (5, 12), generator=torch.Generator().manual_seed(1))
    other_ids = torch.randint(0, 20, (5, 12), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "targets": ids.roll(-1, dims=1)}
    result = ablation_effects(model, batch, kind=kind, other_batch={"input_ids": other_ids})
    with torch.no_grad():
        clean_logits, clean_z = _manual_logits(model, ids)
        _, other_z = _manual_logits(model, other_ids)
        clean = sequence_loss(clean_logits, batch["targets"])
        for layer in range(2):
            for head in range(4):
                if kind == "mean":  # the head's mean output over the batch, position by position
                    mean = clean_z[layer][:, :, head].mean(0, keepdim=True)

                    def fn(z, mean=mean):
                        return mean.expand_as(z)
                else:  # the head's output on another batch of the same task

                    def fn(z, layer=layer, head=head):
                        return other_z[layer][:, :, head]
                ablated, _ = _manual_logits(model, ids, {(layer, head): fn})
                diff = sequence_loss(ablated, batch["targets"]) - clean
                assert float(result.effect[layer, head]) == pytest.approx(float(diff.mean()), abs=1e-5)
                assert float(result.stderr[layer, head]) == pytest.approx(float(diff.std() / 5**0.5), abs=1e-5)
    assert result.effect.abs().max() > 1e-3  # the ablations do something


def test_the_iteration_heads_layer0_partner_is_not_its_random_reference():
    # a 2 x 1 model with Cabannes et al.'s circuit, as hand-built patterns on a real iteration batch: layer 0 attends
    # from the CoT positions to EoI, layer 1 reads x_t. Ablating the partner costs 2.9 nats, the iteration head 1.5.
    from data.tasks import make_task
    from roles.registry import DETECTORS, PATTERN_DETECTORS, applicable
    from roles.rule import apply_rule
    from roles.table import RoleTable
    from toymodels.circuits import circuit_of, iteration_scores

    task = make_task("iteration", min_bits=2, max_bits=6, rule="polynomial", modulus=5, bos=True)
    batch = task.batch(32, seed=0)
    ids, seq = batch["input_ids"], batch["input_ids"].shape[1]
    eoi = (ids == task.sep).int().argmax(1)
    n = batch["iteration_mask"].sum((1, 2))
    pos = torch.arange(seq)
    cot = (pos[None, :] > eoi[:, None]) & (pos[None, :] <= (eoi + n)[:, None])  # [B, T]: s_1 .. s_n
    to_eoi = cot[:, :, None] & (pos[None, None, :] == eoi[:, None, None])  # [B, T, T]
    earlier = torch.ones(seq, seq).tril()
    base = (earlier / earlier.sum(-1, keepdim=True)).expand(32, seq, seq)
    layer0 = torch.where(cot[:, :, None], to_eoi.float(), base)
    layer1 = torch.where(batch["iteration_mask"].any(-1, keepdim=True), batch["iteration_mask"].float(), base)
    patterns = torch.stack([layer0, layer1], 1)[:, :, None]  # [B, L=2, H=1, T, T]
    circuit = circuit_of(*iteration_scores(patterns, eoi, n), floor=0.3)
    assert circuit.passed and circuit.layer0_eoi_attention == pytest.approx(1.0)
    assert circuit.partners(2, 1).tolist() == [[True], [False]]
    batch["attentions"] = patterns
    names = [name for name in applicable(batch) if name in PATTERN_DETECTORS]  # every attention detector
    verdicts = apply_rule({name: DETECTORS[name](None, batch) for name in names}, d_head=16)
    assert verdicts["iteration"].detected.tolist() == [[False], [True]]
    assert not any(bool(v.detected[0, 0]) for v in verdicts.values())  # no detector names the EoI head
    ablation = AblationResult(torch.tensor([[2.9], [1.5]]), torch.full((2, 1), 0.05), 1.0)

    def functional(partners):
        rows = RoleTable.build(verdicts, ablation, partners=partners).frame.set_index(["role", "layer", "head"])
        row = rows.loc[("iteration", 1, 0)]
        return bool(row["functional"]), float(row["effect_reference"])

    # the partner left out: no head without a function remains, reference 0, and 1.5 > 3 * 0.05
    assert functional(circuit.partners(2, 1)) == (True, 0.0)
    # as "random", the partner would set the bar at 2.9 and fail the head that reads x_t
    assert functional(None) == (False, pytest.approx(2.9))
    # a layer 0 that misses EoI (uniform attention) is no partner, and stays the reference
    missed = circuit_of(*iteration_scores(torch.stack([base, layer1], 1)[:, :, None], eoi, n), floor=0.3)
    assert not missed.passed and missed.partners(2, 1).tolist() == [[False], [False]]
    assert functional(missed.partners(2, 1)) == (False, pytest.approx(2.9))


def test_random_iteration_models_have_no_functional_iteration_head_with_the_partner_rule():
    # no signal: 30 untrained 2 x 1 models of the iteration config's shape (training init, unit and twice-unit
    # attention logits). None of their layer-0 heads reaches the floor on EoI, so the rule leaves their reference as it
    # was; the worst case forces the layer-0 head out of the reference in every model (reference 0 for layer 1), and
    # still no iteration head is functional, since none is detected (the functional criterion's own rate on random
    # models is python -m roles.calibrate's)
    from data.tasks import make_task
    from roles.mapping import Batches, DetectConfig, map_heads
    from toymodels.circuits import task_circuit

    task = make_task("iteration", min_bits=1, max_bits=12, rule="polynomial", modulus=5, bos=True, copy_first=True)
    batches = Batches(task.detection_batch(32, 1), task.batch(64, 2), task.batch(64, 3))
    cfg = DetectConfig(n_null=0, random_groups=19)
    forced = torch.tensor([[True], [False]])
    functional, natural = 0, 0
    for seed in range(30):
        torch.manual_seed(seed)
        std = (0.02, 32 ** -0.5, 2 * 32 ** -0.5)[seed % 3]
        net = toymodels.ToyTransformer(toymodels.ToyTransformerConfig(
            vocab_size=task.vocab_size, max_position_embeddings=task.seq_len, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=1, attn_only=False, initializer_range=std)).eval()
        natural += int(task_circuit(net, task, batches.detect).partners(2, 1).any())
        frame = map_heads(net, batches, "iteration", cfg, seed, partners=forced).table.frame
        functional += int(frame.loc[frame["role"] == "iteration", "functional"].fillna(False).astype(bool).sum())
    assert natural == 0
    assert functional == 0
