"""Many seeds: the stacked (vmapped) model equals its single models, --seeds runs, the re-emergence report."""

import os

os.environ["WANDB_MODE"] = "disabled"

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from data.tasks import make_task, target_loss
from headlab.cli import main
from headlab.errors import HeadlabError
from roles.mapping import DetectConfig
from toymodels.command import toy
from toymodels.modeling import ToyTransformer
from toymodels.reemergence import match_heads, reemergence, role_vectors
from toymodels.stacked import StackedToyModel
from toymodels.training import ToyConfig, TrainConfig, make_optimizer

TINY = {"vocab": 12, "length": 16, "min_segment": 3, "max_segment": 6}
TINY_MODEL = ToyConfig(n_layers=2, n_heads=2, d_model=16)
TINY_TRAIN = TrainConfig(steps=16, batch_size=8, track_every=8, eval_batch_size=16, log_every=4)
FAST_DETECT = DetectConfig(batch_size=8, n_null=2, eval_batch_size=16)


def _models(config: ToyConfig, task, seeds) -> list[ToyTransformer]:
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(ToyTransformer(config.hf_config(task.vocab_size, task.seq_len)))
    return models


@pytest.mark.parametrize(
    "config",
    [
        ToyConfig(n_layers=2, n_heads=2, d_model=16),
        ToyConfig(n_layers=2, n_heads=2, d_model=16, positional="rotary"),
        ToyConfig(n_layers=1, n_heads=2, d_model=16, positional="shortformer", attn_only=False),
        ToyConfig(n_layers=2, n_heads=4, d_model=16, positional="none", layer_norm=False, tie_embeddings=True),
    ],
    ids=["learned", "rotary", "shortformer-mlp", "none-tied-nonorm"],
)
def test_stacked_forward_equals_each_model(config):
    task = make_task("induction", **TINY)
    models = _models(config, task, range(3))
    ids = torch.stack([task.batch(4, seed)["input_ids"] for seed in range(3)])  # [3, 4, T]
    expected = torch.stack([model(input_ids=ids[i]).logits for i, model in enumerate(models)])
    torch.testing.assert_close(StackedToyModel(models)(ids), expected, rtol=1e-5, atol=1e-5)


def test_stacked_training_equals_training_each_seed_alone():
    """Summed losses + element-wise AdamW: every slice follows its own seed's trajectory (incl. weight decay)."""
    task = make_task("induction", **TINY)
    train = TrainConfig(lr=3e-3, weight_decay=0.1)
    models = _models(TINY_MODEL, task, range(2))
    alone = [copy.deepcopy(model) for model in models]
    streams = [task.stream(8, seed) for seed in range(2)]
    batches = [[next(stream) for _ in range(12)] for stream in streams]

    stacked = StackedToyModel(models)
    optimizer = make_optimizer(stacked.parameters(), train)
    for step in range(12):
        ids = torch.stack([batches[s][step]["input_ids"] for s in range(2)])
        targets = torch.stack([batches[s][step]["targets"] for s in range(2)])
        logits = stacked(ids)
        loss = sum(target_loss(logits[s], targets[s]) for s in range(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for seed, model in enumerate(alone):
        optimizer = make_optimizer(model.parameters(), train)
        for batch in batches[seed]:
            loss = target_loss(model(input_ids=batch["input_ids"]).logits, batch["targets"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    stacked.write_to(models)
    for trained, reference in zip(models, alone):
        for (name, a), b in zip(trained.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-fused-backward", "recomputing-backward"])
def test_stacked_gradients_equal_each_models_gradients(monkeypatch, fused):
    """Both backward paths of the vmapped attention (the CPU kernel's, and the recomputing one used elsewhere)."""
    import toymodels.stacked

    monkeypatch.setattr(toymodels.stacked, "_fused_cpu_kernel", lambda q: fused)
    task = make_task("induction", **TINY)
    models = _models(TINY_MODEL, task, range(2))
    batches = [task.batch(4, seed) for seed in range(2)]
    for model, batch in zip(models, batches):
        target_loss(model(input_ids=batch["input_ids"]).logits, batch["targets"]).backward()
    stacked = StackedToyModel(models)
    logits = stacked(torch.stack([b["input_ids"] for b in batches]))
    sum(target_loss(logits[s], batches[s]["targets"]) for s in range(2)).backward()
    for name in stacked.names:
        expected = torch.stack([dict(m.named_parameters())[name].grad for m in models])
        torch.testing.assert_close(stacked.stack[name.replace(".", "__")].grad, expected, rtol=1e-4, atol=1e-6)


def test_match_heads_recovers_permuted_heads():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 4, 5)) * 3  # [layers, heads, roles], well separated
    perms = [np.arange(4), np.array([2, 0, 3, 1]), np.array([3, 2, 1, 0])]
    vectors = [base[:, perm] + rng.normal(scale=0.05, size=base.shape) for perm in perms]
    assignment = match_heads(vectors)  # [seeds, layers, slots]
    for s, perm in enumerate(perms):
        # slot k holds seed 0's head k, which seed s stores at the position where perm == k
        expected = np.argsort(perm)
        assert (assignment[s, 0] == expected).all() and (assignment[s, 1] == expected).all()


def _table(functional: dict[tuple[int, int], int | None], roles=("induction", "previous_token")) -> pd.DataFrame:
    """A hand-built roles.csv: (layer, head) -> emergence step of an induction head; (0, 0) is previous-token."""
    rows = []
    for layer in range(2):
        for head in range(2):
            for role in roles:
                is_role = (role == "induction" and (layer, head) in functional) or (
                    role == "previous_token" and (layer, head) == (0, 0)
                )
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "role": role,
                        "score": 0.8 if is_role else 0.05,
                        "floor": 0.3,
                        "control": 0.05,
                        "p_value": 1e-6 if is_role else 0.5,
                        "p_adjusted": 1e-5 if is_role else 0.9,
                        "detected": is_role,
                        "ablation_effect": 0.5 if is_role else 0.0,
                        "effect_stderr": 0.01,
                        "effect_method": "exact",
                        "effect_reference": 0.0,
                        "functional": is_role,
                        "null_mean": 0.05,
                        "null_std": 0.01,
                        "emerged_step": functional.get((layer, head)) if role == "induction" and is_role else None,
                    }
                )
    return pd.DataFrame(rows)


def _write_run(path, seed: int, table: pd.DataFrame, formed: bool) -> None:
    path.mkdir(parents=True)
    table.to_csv(path / "roles.csv", index=False)
    metrics = {
        "task": "induction",
        "seed": seed,
        "target": {"role": "induction", "formed": formed},
        "phase_change_step": 500,
        "final_eval": {"loss": 0.1, "accuracy": 0.9},
    }
    (path / "metrics.json").write_text(json.dumps(metrics))


def test_reemergence_report_known_answer(tmp_path):
    # seed 0: induction at L1H0 (step 200); seed 1: at L1H1 (step 400) and L1H0 (step 300); seed 2: none
    tables = [_table({(1, 0): 200}), _table({(1, 1): 400, (1, 0): 300}), _table({})]
    for seed, table in enumerate(tables):
        _write_run(tmp_path / f"seed-{seed}", seed, table, formed=seed < 2)
    report = reemergence([tmp_path / f"seed-{s}" for s in range(3)], tmp_path / "report")
    induction = report.roles.set_index("role").loc["induction"]
    assert induction["emerged_fraction"] == pytest.approx(2 / 3)
    assert induction["layers"] == "L1:2"
    assert induction["redundancy_mean"] == pytest.approx(1.5) and induction["redundancy_max"] == 2
    # seed 1's best head: both score 0.8, sorted stably -> the first listed (L1H0, step 300)
    assert induction["emerged_step_min"] == 200 and induction["emerged_step_max"] == 300
    previous = report.roles.set_index("role").loc["previous_token"]
    assert previous["emerged_fraction"] == 1.0 and previous["layers"] == "L0:3"
    assert report.summary["target_formed_fraction"] == pytest.approx(2 / 3)
    layer0 = report.slots[report.slots["layer"] == 0]
    assert sorted(layer0["n_previous_token"]) == [0, 3]  # seed to seed, the previous-token head lands in one slot
    layer1 = report.slots[report.slots["layer"] == 1]
    assert sorted(layer1["n_induction"]) == [1, 2]  # seed 1's two induction heads fill both slots, seed 0's one
    for name in ("reemergence.csv", "matching.csv", "slots.csv", "reemergence.md", "reemergence.png", "seeds.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| induction | 2/3 | 2/3 |" in (tmp_path / "report" / "reemergence.md").read_text()


def test_role_vectors_are_log_compressed_effects_over_the_floor():
    table = _table({(1, 0): 100})
    vectors = role_vectors(table, ["induction", "previous_token"])
    effect = (0.8 - 0.05) / 0.3  # (score - control) / floor
    assert vectors[1, 0, 0] == pytest.approx(np.log1p(effect)) and vectors[0, 1, 0] == pytest.approx(0.0)
    table.loc[0, "control"] = np.nan  # a missing control counts as 0
    assert role_vectors(table, ["induction"])[0, 0, 0] == pytest.approx(np.log1p(0.05 / 0.3))


def test_reemergence_without_null_models(tmp_path):
    """Runs made with --detection.n_null 0 have no null columns' values; the report must not need them."""
    for seed, heads in enumerate([{(1, 0): 200}, {(1, 1): 300}]):
        table = _table(heads)
        table[["null_mean", "null_std"]] = np.nan
        _write_run(tmp_path / f"seed-{seed}", seed, table, formed=True)
    report = reemergence([tmp_path / "seed-0", tmp_path / "seed-1"], tmp_path / "report")
    assert report.roles.set_index("role").loc["induction", "emerged_fraction"] == 1.0
    layer1 = report.slots[report.slots["layer"] == 1]
    assert sorted(layer1["n_induction"]) == [0, 2]  # the two seeds' induction heads matched into one slot


@pytest.mark.slow
def test_toy_seeds_stacked_matches_single_runs_and_resumes(tmp_path, capsys):
    common = dict(
        task="induction", task_options=TINY, model=TINY_MODEL, train=TINY_TRAIN, detection=FAST_DETECT, logger="none"
    )
    out = toy(out=tmp_path / "seeds", seed=3, seeds=2, stack_seeds=True, **common)
    for seed in (3, 4):
        assert (out / f"seed-{seed}" / "roles.csv").exists() and (out / f"seed-{seed}" / "model").is_dir()
    for name in ("reemergence.csv", "matching.csv", "slots.csv", "reemergence.md", "reemergence.png", "seeds.json"):
        assert (out / name).exists()
    assert json.loads((out / "seeds.json").read_text())["stacked"] is True

    single = toy(out=tmp_path / "single", seed=4, **common)
    curve_stacked = pd.read_csv(out / "seed-4" / "eval_curve.csv")
    curve_single = pd.read_csv(single / "eval_curve.csv")
    np.testing.assert_allclose(curve_stacked["eval_loss"], curve_single["eval_loss"], rtol=1e-4)
    roles_stacked, roles_single = pd.read_csv(out / "seed-4" / "roles.csv"), pd.read_csv(single / "roles.csv")
    np.testing.assert_allclose(roles_stacked["score"], roles_single["score"], rtol=1e-3, atol=1e-5)

    capsys.readouterr()
    toy(out=tmp_path / "seeds", seed=3, seeds=3, **common)  # seeds 3, 4 reused, 5 trained alone
    assert "reusing 2 finished seed run(s)" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "seeds" / "matching.csv")["seed"].unique()) == 3

    with pytest.raises(HeadlabError, match="different config"):
        toy(out=tmp_path / "seeds", seed=3, seeds=2, **{**common, "train": TrainConfig(steps=8, batch_size=8)})


@pytest.mark.slow
def test_sequential_seeds_and_the_reemergence_command(tmp_path, capsys):
    out = toy(
        task="induction",
        task_options=TINY,
        model=TINY_MODEL,
        train=TINY_TRAIN,
        detection=FAST_DETECT,
        logger="none",
        out=tmp_path / "seq",
        seeds=2,
        stack_seeds=False,
    )
    assert json.loads((out / "seeds.json").read_text())["stacked"] is False
    main(["reemergence", "--runs", f"[{out}]", "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "reemergence.md").read_text().startswith("# Re-emergence over 2 seeds")


def test_bad_seed_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["toy", "--seeds", "0", "--out", str(tmp_path / "x"), "--logger", "none"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    with pytest.raises(HeadlabError, match="not a finished toy run"):
        reemergence([tmp_path, tmp_path], tmp_path / "r")
    _write_run(tmp_path / "only", 0, _table({}), formed=False)
    with pytest.raises(HeadlabError, match="at least 2 runs"):
        reemergence([tmp_path / "only"], tmp_path / "r")


def test_iteration_seeds_report_the_circuit_and_its_verdict(tmp_path):
    out = toy(task="iteration", task_options={"min_bits": 1, "max_bits": 4, "rule": "polynomial", "modulus": 5,
                                               "prefix_max": 2},
              model=ToyConfig(n_layers=2, n_heads=1, d_model=16, attn_only=False), train=TINY_TRAIN,
              detection=FAST_DETECT, logger="none", out=tmp_path / "it", seeds=2, stack_seeds=False)
    per_seed = json.loads((out / "metrics.json").read_text())["per_seed"]
    assert [row["seed"] for row in per_seed] == [0, 1]
    for row in per_seed:
        seed = json.loads((out / f"seed-{row['seed']}" / "metrics.json").read_text())
        circuit = seed["circuit"]
        assert 0 <= circuit["layer0_eoi_attention"] <= 1 and 0 <= circuit["layer1_diagonal"] <= 1
        assert circuit["passed"] == (min(circuit["layer0_eoi_attention"], circuit["layer1_diagonal"]) >= 0.3)
        assert seed["target"]["formed"] == (circuit["head_formed"] and circuit["passed"]) == row["formed"]
        assert row["layer0_eoi_attention"] == circuit["layer0_eoi_attention"]
