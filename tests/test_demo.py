"""The quickstart's first line: `python train.py demo` runs the whole pipeline offline (SmolLM2, toy seeds, MiniLM)."""

import os

os.environ["WANDB_MODE"] = "disabled"

import json

import pandas as pd
import pytest

from headlab.demo import demo


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.smollm2
def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = demo(out=tmp_path / "demo", logger="none", device="cpu")
    printed = capsys.readouterr().out
    assert "demo finished" in printed
    heads = pd.read_csv(out / "stages" / "work" / "smollm2" / "probe-capitals" / "heads.csv")
    assert len(heads) == 270  # 30 layers x 9 query heads of SmolLM2-135M-Instruct
    for seed in (0, 1):
        assert (out / "toy" / f"seed-{seed}" / "roles.csv").exists()
    assert (out / "toy" / "reemergence.md").read_text().startswith("# Re-emergence over 2 seeds")
    assert {"smollm2", "minilm"} <= set(pd.read_csv(out / "stages" / "stages.csv")["model"])
    trials = pd.read_csv(out / "sweep" / "trials.csv")
    assert len(trials) == 4 and (out / "sweep" / "best.yaml").exists()
    assert json.loads((out / "toy" / "seeds.json").read_text())["seeds"] == [0, 1]
