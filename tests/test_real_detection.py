"""Head functions of Hugging Face models on one path: every tiny architecture through `detect`, the OV circuit
under grouped-query attention, exact ablation with the clean prefix reused, and the attribution screen."""

from __future__ import annotations

import json
import os

os.environ["WANDB_MODE"] = "disabled"

import pandas as pd
import pytest
import torch
from tiny_models import save_tiny_model, tiny_config, tiny_model

from data.tasks import sequence_loss
from headlab.cli import main
from headlab.heads import head_sites, hook_heads
from roles.ablation import ablation_effects, capture_z
from roles.attribution import attribution_effects, screen_and_confirm
from roles.ov import copying

CONTRACT = ["layer", "head", "role", "score", "detected", "functional", "ablation_effect"]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "bert"])
def test_detect_maps_every_tiny_architecture(arch, tmp_path, capsys):
    path = save_tiny_model(arch, tmp_path / arch)
    out = tmp_path / "out"
    assert main(["detect", "--model", str(path), "--task", "induction", "--out", str(out), "--length", "24",
                 "--detection.batch_size", "4", "--detection.eval_batch_size", "4", "--detection.n_null", "2",
                 "--detection.random_groups", "19"]) == 0
    roles = pd.read_csv(out / "roles.csv")
    assert list(roles.columns[: len(CONTRACT)]) != [] and set(CONTRACT) <= set(roles.columns)
    assert len(roles) == roles["role"].nunique() * 2 * 4  # one row per (layer, head, role)
    metrics = json.loads((out / "metrics.json").read_text())
    if arch == "bert":  # an encoder: detection only, no OV map to logits
        assert roles["functional"].isna().all() and roles["ablation_effect"].isna().all()
        assert metrics["kind"] == "encoder" and any("OV detectors" in n for n in metrics["notes"])
    else:
        assert {"copying", "name_mover", "name_copy"} <= set(roles["role"])
        assert roles["ablation_effect"].notna().all() and set(roles["effect_method"]) == {"exact"}
        assert metrics["kind"] == "causal_lm" and metrics["clean_loss"] > 0


def test_ov_circuit_under_grouped_query_attention_known_answer():
    """Llama with 4 query heads sharing 2 key/value heads: KV head 0 copies (identity on 8 residual dimensions) and
    its two query heads write it back (W_O = identity), KV head 1's query heads write it back negated. The copying
    score is 1 for both query heads of group 0 and -1 for both of group 1."""
    model = tiny_model("llama", causal_lm=True)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        embed = model.get_input_embeddings().weight  # [vocab, 32]
        model.lm_head.weight.copy_(embed)  # W_U = E^T: the map is E_n P P^T E^T, positive semi-definite
        v = torch.zeros_like(attention.v_proj.weight)  # [2 kv heads * 8, 32]
        v[:8, :8] = torch.eye(8)
        v[8:, :8] = torch.eye(8)
        attention.v_proj.weight.copy_(v)
        o = torch.zeros_like(attention.o_proj.weight)  # [32, 4 heads * 8]
        for head, sign in enumerate([1.0, 1.0, -1.0, -1.0]):
            o[:8, head * 8:(head + 1) * 8] = sign * torch.eye(8)
        attention.o_proj.weight.copy_(o)
    scores = copying(model, {}).score[0]
    assert scores.tolist() == pytest.approx([1.0, 1.0, -1.0, -1.0], abs=1e-4)


def _mean_ablated_losses(model, ids, targets, layer, head, scale=1.0):
    """Sequence losses with head (layer, head) moved ``scale`` of the way to its batch mean, without prefix reuse."""
    clean = capture_z(model, ids)
    mean = clean[layer][:, :, head].mean(0, keepdim=True)

    def edit(at, z):
        if at != layer:
            return None
        z = z.clone()
        z[:, :, head] = z[:, :, head] + scale * (mean - z[:, :, head])
        return z

    with torch.no_grad(), hook_heads(model, edit):
        return sequence_loss(model(input_ids=ids).logits, targets)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_exact_ablation_with_a_reused_prefix_equals_full_recomputation(arch):
    model = tiny_model(arch, causal_lm=True)
    ids = torch.randint(3, 30, (6, 16), generator=torch.Generator().manual_seed(0))
    targets = ids.roll(-1, 1)
    result = ablation_effects(model, {"input_ids": ids, "targets": targets}, "mean")
    with torch.no_grad():
        clean = sequence_loss(model(input_ids=ids).logits, targets)
    for layer, head in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        diff = _mean_ablated_losses(model, ids, targets, layer, head) - clean
        assert float(result.effect[layer, head]) == pytest.approx(float(diff.mean()), abs=1e-6)
        assert float(result.stderr[layer, head]) == pytest.approx(float(diff.std() / 6**0.5), abs=1e-6)


def test_attribution_is_the_derivative_of_the_ablation_effect():
    """Attribution patching is the first-order term: it equals the finite difference of moving the head's output a
    small step towards its ablated value, divided by the step."""
    model = tiny_model("llama", causal_lm=True)
    ids = torch.randint(3, 30, (6, 16), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    estimate = attribution_effects(model, {"input_ids": ids, "targets": targets}, "mean")
    assert not estimate.exact.any()
    with torch.no_grad():
        clean = sequence_loss(model(input_ids=ids).logits, targets)
    step = 1e-3
    for layer, head in [(0, 1), (1, 3)]:
        moved = _mean_ablated_losses(model, ids, targets, layer, head, scale=step)
        derivative = float((moved - clean).mean()) / step
        assert float(estimate.effect[layer, head]) == pytest.approx(derivative, rel=2e-2, abs=1e-4)


def test_screen_and_confirm_measures_the_heads_a_verdict_rests_on_exactly():
    model = tiny_model("gpt2", causal_lm=True)
    ids = torch.randint(3, 30, (6, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "targets": ids.roll(-1, 1)}
    result = screen_and_confirm(model, batch, "mean", must=[(0, 2)], top_k=2, n_random=3, seed=0)
    exact = ablation_effects(model, batch, "mean")
    assert bool(result.exact[0, 2]) and int(result.exact.sum()) >= 3 + 1  # must + random (top-2 may overlap)
    assert int(result.exact.sum()) <= 1 + 2 + 2 + 3  # must, top-2 by estimate, top-2 by |estimate|, random
    measured = result.exact
    torch.testing.assert_close(result.effect[measured], exact.effect[measured])
    estimate = attribution_effects(model, batch, "mean").effect.flatten()
    top = torch.argsort(estimate, descending=True)[:2]
    top_size = torch.argsort(estimate.abs(), descending=True)[:2]
    assert result.exact.flatten()[top].all() and result.exact.flatten()[top_size].all()


def test_detect_refuses_a_toy_task_on_a_hugging_face_model(tmp_path, capsys):
    path = save_tiny_model("gpt2", tmp_path / "gpt2")
    assert main(["detect", "--model", str(path), "--task", "successor", "--out", str(tmp_path / "o")]) == 2
    assert "use --task induction or ioi" in capsys.readouterr().err
    assert tiny_config("gpt2").n_head == 4 and len(head_sites(tiny_model("gpt2"))) == 2
