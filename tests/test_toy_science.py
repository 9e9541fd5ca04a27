"""Science checks: induction heads need two layers, and the detector tells a positional head from an induction head.

Runs the real ``toy`` command on a small config (vocabulary 16, length 32, d_model 32, 2 heads per layer).
"""

import os

os.environ["WANDB_MODE"] = "disabled"

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import toymodels  # noqa: F401  (registers the toy model)
from data.tasks import make_task
from roles.mapping import DetectConfig
from roles.registry import score_heads
from roles.table import RoleTable
from toymodels.command import toy
from toymodels.training import ToyConfig, TrainConfig

SMALL_TASK = {"vocab": 16, "length": 32, "min_segment": 4, "max_segment": 12}
SMALL_TRAIN = TrainConfig(steps=500, batch_size=32, lr=3e-3, track_every=50, eval_batch_size=64)
SMALL_DETECT = DetectConfig(batch_size=32, n_null=3, eval_batch_size=64)

pytestmark = pytest.mark.slow


def _run(tmp_path_factory, name: str, n_layers: int, **task_options):
    out = tmp_path_factory.mktemp(name)
    toy(
        task="induction",
        task_options={**SMALL_TASK, **task_options},
        out=out,
        model=ToyConfig(n_layers=n_layers, n_heads=2, d_model=32),
        train=SMALL_TRAIN,
        detection=SMALL_DETECT,
        logger="none",
        seed=0,
    )
    return out


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory):
    return _run(tmp_path_factory, "two_layer", 2)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return _run(tmp_path_factory, "one_layer", 1)


def _ln_vocab() -> float:
    return float(torch.log(torch.tensor(float(SMALL_TASK["vocab"]))))


def test_two_layer_model_forms_a_functional_induction_head_in_layer_one(two_layer):
    metrics = json.loads((two_layer / "metrics.json").read_text())
    assert RoleTable.read(two_layer / "roles.csv").formed("induction")
    target = metrics["target"]
    assert target["layer"] == 1 and target["formed"]
    # the rule's ingredients: effect size over the floor, above its control, significant after correction
    assert target["score"] > target["floor"] and target["score"] > target["control"]
    assert target["p_adjusted"] < DetectConfig().alpha
    assert target["ablation_effect"] - target["effect_reference"] > 3 * target["effect_stderr"]
    assert target["emerged_step"] is not None and 0 < target["emerged_step"] <= SMALL_TRAIN.steps
    assert metrics["final_eval"]["loss"] < 0.5 * _ln_vocab()  # the repeated part became predictable
    assert metrics["phase_change_step"] is not None


def test_one_layer_model_does_not_form_an_induction_head(one_layer, two_layer):
    one = json.loads((one_layer / "metrics.json").read_text())
    two = json.loads((two_layer / "metrics.json").read_text())
    assert not one["target"]["formed"]
    assert one["target"]["score"] < 0.5 * two["target"]["score"]
    assert one["final_eval"]["loss"] > 0.7 * _ln_vocab()  # the repeated part stays unpredictable


def test_detector_tells_a_positional_head_from_an_induction_head(tmp_path_factory, two_layer):
    # With a fixed repeat offset a 1-layer model solves the task by position alone (attend to i - offset + 1).
    fixed = _run(tmp_path_factory, "fixed_offset", 1, fixed_offset=16)
    positional = AutoModelForCausalLM.from_pretrained(fixed / "model").eval()
    induction = AutoModelForCausalLM.from_pretrained(two_layer / "model").eval()
    fixed_batch = make_task("induction", **SMALL_TASK, fixed_offset=16).batch(32, seed=5)
    random_batch = make_task("induction", **SMALL_TASK).batch(32, seed=5)
    positional_fixed = float(score_heads(positional, fixed_batch, ["induction"])["induction"].max())
    positional_random = float(score_heads(positional, random_batch, ["induction"])["induction"].max())
    induction_random = float(score_heads(induction, random_batch, ["induction"])["induction"].max())
    # on fixed-offset data the positional head looks like an induction head ...
    assert positional_fixed > 0.3
    # ... but on random offsets (the detector's batches) only the real induction head keeps its score
    assert positional_random < 0.5 * positional_fixed
    assert induction_random > 2 * positional_random
    fixed_metrics = json.loads((fixed / "metrics.json").read_text())
    assert fixed_metrics["final_eval"]["loss"] < 0.5 * _ln_vocab()  # it did solve the fixed-offset task
    # and the toy run's own role map (detectors score random offsets) does not call its heads induction heads
    assert not fixed_metrics["target"]["detected"] and not fixed_metrics["target"]["formed"]


def _per_token_loss(model, input_ids: torch.Tensor, ablate: list[tuple[int, int]]) -> torch.Tensor:
    """``[batch, seq - 1]`` next-token cross-entropy with the given heads mean-ablated, by hand: a pre-hook on each
    block's output projection replaces the head's slice of its input by the slice's mean over the batch."""
    d_head = model.config.hidden_size // model.config.num_attention_heads
    hooks = []
    for layer in {layer for layer, _ in ablate}:
        heads = [h for at, h in ablate if at == layer]

        def hook(module, args, heads=heads):
            (z,) = args  # [batch, seq, heads * d_head]
            z = z.clone()
            for h in heads:
                part = z[..., h * d_head:(h + 1) * d_head]
                z[..., h * d_head:(h + 1) * d_head] = part.mean(dim=0, keepdim=True).expand_as(part)
            return (z,)

        hooks.append(model.blocks[layer].attn.out_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[:, :-1]
    finally:
        for h in hooks:
            h.remove()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")


def test_previous_token_heads_sit_in_an_earlier_layer_than_the_induction_heads(two_layer):
    table = RoleTable.read(two_layer / "roles.csv")
    previous = table.functional_rows("previous_token")
    induction = table.functional_rows("induction")
    assert not previous.empty and not induction.empty
    assert previous["layer"].max() < induction["layer"].min()  # Olsson et al.: L0 previous-token, L1 induction


def test_ablating_the_induction_heads_removes_the_in_context_loss_gain(two_layer):
    model = AutoModelForCausalLM.from_pretrained(two_layer / "model").eval()
    table = RoleTable.read(two_layer / "roles.csv")
    rows = table.rows("induction")
    heads = [(int(r.layer), int(r.head)) for r in rows[rows["detected"].astype(bool)].itertuples() if r.layer >= 1]
    assert heads
    batch = make_task("induction", **SMALL_TASK).batch(128, seed=11)
    repeated = batch["targets"][:, :-1] != -100  # predictable from the earlier copy
    fresh = ~batch["repeat_mask"][:, 1:]  # the next token is drawn at random: no context helps
    clean = _per_token_loss(model, batch["input_ids"], [])
    ablated = _per_token_loss(model, batch["input_ids"], heads)
    gain_clean = float(clean[fresh].mean() - clean[repeated].mean())  # the in-context loss gain (nats)
    assert gain_clean > 0.5 * _ln_vocab()
    # The claim, on the repeated tokens alone (the fresh-token loss also moves when the heads go, 4.74 -> 3.58 nats:
    # clean induction heads copy confidently where nothing repeats, so a gain over fresh tokens would mix two
    # effects). Measured over seeds 0-4 of this config: ablation raises the repeated-token loss by 1.98, 2.01, 2.00,
    # 2.04 and 2.12 nats (mean 2.03, sd 0.05; mean - 6 sd = 1.71), to 3.05-3.13 nats (mean - 6 sd = 2.84), above
    # ln 16 = 2.77, the loss of a uniform guess.
    rise = float(ablated[repeated].mean() - clean[repeated].mean())
    assert rise > 1.5
    assert float(ablated[repeated].mean()) > _ln_vocab()  # no more predictable than guessing uniformly
