"""A run killed at any moment (SIGKILL: no cleanup code runs) loses no finished work: re-running the same command
ends as an uninterrupted run would, and leaves no stray temporary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tiny_models import save_tiny_model

from data import HeadCache

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=ENV, capture_output=True, text=True,
                          timeout=600, check=False)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 180.0) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fail if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before it could be killed:\n{process.communicate()[0]}"
        assert time.monotonic() < deadline, "never reached the point to kill it"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _stray_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp") or
                  p.name.startswith(".check-config") or p.name.endswith(".config.yaml"))


def _plant(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half-written")


def _listed_shards(cache: Path) -> int:
    try:
        return len(json.loads((cache / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_killed_cache_resumes_to_the_uninterrupted_result(tmp_path):
    model = save_tiny_model("gpt2", tmp_path / "gpt2")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the capital of {w} is rome", "label": i % 2}) + "\n"
                            for i, w in enumerate(["paris", "france", "berlin", "italy"] * 50)))
    args = ["cache", "--model", str(model), "--dataset", str(data), "--batch_size", "1", "--shard_mb", "0.0001"]
    killed = tmp_path / "killed"
    _kill_when(_start(*args, "--out", str(killed)), lambda: _listed_shards(killed) >= 2)
    listed = _listed_shards(killed)
    assert 2 <= listed < 200
    _plant(killed, "shards/.00500.npy.abcdefgh.tmp", ".manifest.json.abcdefgh.tmp", "labels/.label.npy.zyxwvuts.tmp")
    rerun = _run(*args, "--out", str(killed))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming" in rerun.stdout + rerun.stderr
    assert _run(*args, "--out", str(tmp_path / "whole")).returncode == 0
    resumed, whole = HeadCache.open(killed), HeadCache.open(tmp_path / "whole")
    resumed.verify()
    np.testing.assert_array_equal(resumed.activations[:], whole.activations[:])
    pd.testing.assert_frame_equal(resumed.labels, whole.labels)
    assert _stray_files(killed) == []


def _sweep_file(path: Path, trials: int) -> Path:
    path.write_text(yaml.safe_dump({
        "command": "sweep_target:quadratic", "base": {"seconds": 1.5}, "space": {"x": {"low": -1.0, "high": 1.0}},
        "objective": {"metric": "score"}, "sampler": "random", "trials": trials, "seed": 0}))
    return path


def test_killed_sweep_retries_the_trial_it_left_running(tmp_path):
    config, out = _sweep_file(tmp_path / "s.yaml", trials=3), tmp_path / "sweep"
    _kill_when(_start("sweep", "--config", str(config), "--out", str(out)), lambda: (out / "trials" / "0001").exists())
    _plant(out, ".trials.csv.abcdefgh.tmp")
    rerun = _run("sweep", "--config", str(config), "--out", str(out))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "left running by a killed worker" in rerun.stdout
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == 3
    assert trials.loc[trials["number"] == 1, "state"].item() == "FAIL"  # the killed one, retried as another trial
    killed_x = trials.loc[trials["number"] == 1, "params.x"].item()
    assert (trials.loc[trials["state"] == "COMPLETE", "params.x"] == killed_x).sum() == 1
    assert _stray_files(out) == []


def test_a_sweep_where_no_trial_completes_exits_nonzero_naming_the_first_error(tmp_path, capsys):
    from headlab.cli import main

    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"command": "sweep_target:quadratic", "space": {"x": [0.1, 0.2]},
                                      "objective": {"metric": "no_such_metric"}, "trials": 2}))
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no trial of the sweep completed" in lines[0]
    assert "does not log metric 'no_such_metric'" in lines[0] and "0000.log" in lines[0]
    log = (tmp_path / "out" / "trials" / "0000.log").read_text()
    assert "Traceback" in log and "Traceback" not in captured.out + captured.err
    assert captured.out.count("failed: error: run") == 2  # each trial's one-line error


def test_killed_toy_seeds_reuse_the_finished_seeds(tmp_path):
    out = tmp_path / "seeds"
    args = ["toy", "--seeds", "3", "--out", str(out), "--logger", "none", "--train.steps", "30",
            "--task_options", '{"vocab": 8, "length": 16, "min_segment": 2, "max_segment": 6}',
            "--model.d_model", "16", "--model.n_heads", "2", "--train.track_every", "15", "--detection.n_null", "2",
            "--detection.batch_size", "4", "--detection.eval_batch_size", "8", "--train.eval_batch_size", "8"]
    _kill_when(_start(*args), lambda: (out / "seed-0" / "metrics.json").exists() and (out / "seed-1").exists())
    finished = (out / "seed-0" / "metrics.json").read_bytes()
    _plant(out, "seed-1/.roles.csv.abcdefgh.tmp")
    rerun = _run(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "reusing 1 finished seed run(s)" in rerun.stdout
    assert (out / "seed-0" / "metrics.json").read_bytes() == finished
    assert (out / "reemergence.csv").exists() and (out / "seed-2" / "metrics.json").exists()
    assert _stray_files(out) == []
