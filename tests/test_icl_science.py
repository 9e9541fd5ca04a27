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
from pathlib import Path

import pytest
import yaml

from roles.mapping import DetectConfig
from toymodels.command import toy
from toymodels.training import ToyConfig, TrainConfig

pytestmark = pytest.mark.slow

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "toy" / "icl.yaml").read_text())


def _run(tmp_path_factory, bursty: bool) -> dict:
    out = tmp_path_factory.mktemp(f"icl-bursty-{bursty}")
    options = CONFIG["task_options"] if bursty else {**CONFIG["task_options"], "p_bursty": 0.0, "bursty_novel": False}
    toy(task="icl", task_options=options, out=out,
        model=ToyConfig(**CONFIG["model"]), train=TrainConfig(**{**CONFIG["train"], "track_every": 1000}),
        detection=DetectConfig(n_null=0), logger="none", seed=0)
    return json.loads((out / "metrics.json").read_text())


def test_in_context_classification_appears_only_with_bursty_training_data(tmp_path_factory):
    bursty = _run(tmp_path_factory, True)
    plain = _run(tmp_path_factory, False)
    # both learn the memorised mapping (the query's class absent from the context)
    assert bursty["splits"]["iw"]["accuracy"] > 0.95 and plain["splits"]["iw"]["accuracy"] > 0.95
    # only the bursty model reads novel items' labels off the context (chance: 1/32, or 1/2 among the two
    # repeated labels)
    assert bursty["splits"]["ic"]["accuracy"] > 0.9
    assert plain["splits"]["ic"]["accuracy"] < 0.5
    # and only it grows a functional induction head
    assert bursty["target"]["formed"] and not plain["target"]["formed"]
