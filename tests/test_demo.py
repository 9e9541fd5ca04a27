"""The quickstart's first line: `python train.py demo` runs the whole pipeline offline (real MiniLM, toy seeds)."""

import os

os.environ["WANDB_MODE"] = "disabled"

import json

import pandas as pd
import pytest

from headlab.demo import demo


@pytest.mark.slow
@pytest.mark.realmodel
def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = demo(out=tmp_path / "demo", logger="none", device="cpu")
    printed = capsys.readouterr().out
    assert "demo finished" in printed
    assert len(pd.read_csv(out / "probe" / "heads.csv")) == 72  # 6 layers x 12 heads of all-MiniLM-L6-v2
    for seed in (0, 1):
        assert (out / "toy" / f"seed-{seed}" / "roles.csv").exists()
    assert (out / "toy" / "reemergence.md").read_text().startswith("# Re-emergence over 2 seeds")
    assert {"minilm"} <= set(pd.read_csv(out / "stages" / "stages.csv")["model"])
    trials = pd.read_csv(out / "sweep" / "trials.csv")
    assert len(trials) == 4 and (out / "sweep" / "best.yaml").exists()
    assert json.loads((out / "toy" / "seeds.json").read_text())["seeds"] == [0, 1]
