"""Science check: in-context classification appears only when the training data is bursty (Chan et al. 2022).

Two runs of the real ``toy`` command on ``configs/toy/icl.yaml``'s task and model (Reddy 2023's 2-layer, 1-head
network; Chan et al.'s 3-shot 2-way bursts), differing only in burstiness: the config (p_bursty 0.9 for sequences of
training classes, novel-item sequences always bursty) and none at all (p_bursty 0 and ``bursty_novel`` off: no
training context ever holds the query's class). Both are scored on the same held-out ``ic`` split: novel items in bursty
contexts, with labels drawn per sequence, so only the context can answer.
"""

import os

os.environ["WANDB_MODE"] = "disabled"

import json
import math
from pathlib import Path

import pytest
import yaml
from scipy.stats import binom

from roles.mapping import DetectConfig
from toymodels.command import toy
from toymodels.training import ToyConfig, TrainConfig

pytestmark = pytest.mark.slow

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "toy" / "icl.yaml").read_text())


def _run(tmp_path_factory, bursty: bool, seed: int = 0) -> dict:
    out = tmp_path_factory.mktemp(f"icl-bursty-{bursty}-{seed}")
    options = CONFIG["task_options"] if bursty else {**CONFIG["task_options"], "p_bursty": 0.0, "bursty_novel": False}
    toy(task="icl", task_options=options, out=out,
        model=ToyConfig(**CONFIG["model"]), train=TrainConfig(**{**CONFIG["train"], "track_every": 1000}),
        detection=DetectConfig(n_null=0), logger="none", seed=seed)
    return json.loads((out / "metrics.json").read_text())


N_LABELS = CONFIG["task_options"]["n_labels"]
EVAL_ROWS = TrainConfig().eval_batch_size  # the split metrics' batch
# A model that cannot read the context sees a novel item's label drawn uniformly from the 32 labels: accuracy 1/32,
# loss ln 32. Bound: the 99.9% binomial quantile of 1/32 over the evaluated rows (11 of 128).
CHANCE_BOUND = binom.ppf(0.999, EVAL_ROWS, 1 / N_LABELS) / EVAL_ROWS


def test_in_context_classification_appears_only_with_bursty_training_data(tmp_path_factory):
    bursty = _run(tmp_path_factory, True)
    plains = [_run(tmp_path_factory, False, seed) for seed in range(3)]
    # both learn the memorised mapping (the query's class absent from the context)
    assert bursty["splits"]["iw"]["accuracy"] > 0.95 and all(p["splits"]["iw"]["accuracy"] > 0.95 for p in plains)
    # only the bursty model reads novel items' labels off the context
    assert bursty["splits"]["ic"]["accuracy"] > 0.9
    # the plain models stay at chance in every seed (measured: accuracy 5, 1 and 4 of 128; loss 3.46, 3.48 and
    # 3.44 against ln 32 = 3.466): not merely below one half, at the level of a context-blind guess
    for plain in plains:
        assert plain["splits"]["ic"]["accuracy"] <= CHANCE_BOUND
        assert abs(plain["splits"]["ic"]["loss"] - math.log(N_LABELS)) < 0.15
    # and only it grows a functional induction head
    assert bursty["target"]["formed"] and not any(p["target"]["formed"] for p in plains)
