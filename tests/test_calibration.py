"""Calibration of the detection rule (roles.rule): on randomly initialised models, which have no head functions,
at most 1% of (head, role) pairs may be detected at the defaults. 20 random models per architecture, cycling through
three initialisations: the architecture's training init, unit attention logits (std = hidden_size ** -0.5, the
sharp patterns a random head can have), and twice that."""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "disabled"

import pytest
import torch
import transformers
from tiny_models import tiny_config

import toymodels
from data.tasks import make_task
from roles.mapping import DetectConfig
from roles.registry import measure_heads
from roles.rule import apply_rule

pytestmark = pytest.mark.slow
MODELS = 20
HIDDEN = 32
SCALES = {"training init": None, "unit logits": HIDDEN**-0.5, "twice unit logits": 2 * HIDDEN**-0.5}
PATTERNS = ["previous_token", "duplicate_token", "induction", "attention_sink"]


def random_model(arch: str, seed: int, std: float | None) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "toy":
        config = toymodels.ToyTransformerConfig(vocab_size=33, max_position_embeddings=64, hidden_size=HIDDEN,
                                                num_hidden_layers=2, num_attention_heads=4)
        if std is not None:
            config.initializer_range = std
        return toymodels.ToyTransformer(config).eval()
    config = tiny_config(arch)
    if std is not None:
        config.initializer_range = std
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch():
    """Random ordinary tokens with one repeated segment (every attention detector has targets)."""
    task = make_task("induction", vocab=30, length=48, min_segment=8, max_segment=16)
    return {"input_ids": task.detection_batch(DetectConfig().batch_size, 1)["input_ids"] + 3}


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "bert", "toy"])
def test_random_models_detect_at_most_one_percent_of_head_role_pairs(arch, batch):
    names = PATTERNS if arch == "bert" else [*PATTERNS, "copying"]  # an encoder has no OV map to logits
    detected = pairs = 0
    stds = list(SCALES.values())
    for seed in range(MODELS):
        model = random_model(arch, seed, stds[seed % len(stds)])
        verdicts = apply_rule(measure_heads(model, dict(batch), names), d_head=8)
        detected += sum(int(v.detected.sum()) for v in verdicts.values())
        pairs += sum(v.detected.numel() for v in verdicts.values())
    assert pairs == MODELS * 2 * 4 * len(names)
    print(f"calibration {arch}: {detected} of {pairs} random (head, role) pairs detected ({detected / pairs:.2%})")
    assert detected / pairs <= 0.01, f"{arch}: {detected} of {pairs} random (head, role) pairs detected"


def test_fourier_mechanism_is_never_found_in_untrained_modular_addition_models():
    # the modular-addition config's architecture (configs/toy/modular_addition.yaml) at p = 53, 20 models at the toy
    # init (std 0.02) and 20 at std 128^-0.25 (Nanda et al.'s larger scale): a rule that passes none of 40 has a
    # false-positive rate below 7.2% at 95% confidence (1 - 0.05^(1/40)); none may pass
    from toymodels.fourier import fourier_report, train_mask_of

    task = make_task("modular_addition", p=53, train_fraction=0.5)
    passed, keys = 0, 0
    for std in (0.02, 128**-0.25):
        for seed in range(20):
            torch.manual_seed(seed)
            config = toymodels.ToyTransformerConfig(vocab_size=54, max_position_embeddings=3, hidden_size=128,
                                                    num_hidden_layers=1, num_attention_heads=4, attn_only=False,
                                                    intermediate_size=512, layer_norm=False, initializer_range=std)
            report = fourier_report(toymodels.ToyTransformer(config).eval(), 53, train_mask_of(task))
            passed += report["formed"]
            keys += bool(report["key_frequencies"])
    print(f"fourier calibration: {passed}/40 untrained models pass, {keys}/40 have any key frequency")
    assert passed == 0
