"""SIGTERM (how SLURM and Kubernetes stop a job) and SIGINT never end a run with exit 0: the command exits with
128 + the signal, prints one line saying what was interrupted and how to resume, and leaves resumable state; a
sweep's interrupted trial is failed, listed in trials.csv and retried by the next run. Each signal is sent after a
state the test observes (a file the run writes), never after a guessed sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from headlab.cli import main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_when(process: subprocess.Popen, ready, signum: int, timeout: float = 240.0) -> tuple[str, str]:
    """Send ``signum`` once ``ready()`` holds (fail if the process ended first); its output after it exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"ended before the signal: {process.communicate()}"
        assert time.monotonic() < deadline, "the observed state never came"
        time.sleep(0.05)
    process.send_signal(signum)
    return process.communicate(timeout=240)


@pytest.mark.slow
def test_a_toy_run_stopped_inside_lightning_exits_143_and_restarts(tmp_path):
    out = tmp_path / "toy"
    args = ["toy", "--task", "induction", "--task_options", '{"vocab": 12, "length": 16, "min_segment": 3, '
            '"max_segment": 6}', "--model.n_layers", "1", "--model.d_model", "16", "--train.track_every", "50",
            "--train.log_every", "5", "--logger", "csv", "--out", str(out)]
    process = _start(*args, "--train.steps", "1000000")
    _, err = _signal_when(process, lambda: (out / "lightning_logs" / "metrics.csv").exists(), signal.SIGTERM)
    assert process.returncode == 143, err
    assert "interrupted (SIGTERM): `toy` stopped before it finished" in err and "run the same command again" in err
    assert not (out / "metrics.json").exists()  # no result pretends the run finished
    again = subprocess.run([sys.executable, str(REPO / "train.py"), *args, "--train.steps", "10"], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert "restarting it from step 0" in again.stdout + again.stderr and (out / "metrics.json").exists()


def _sweep_file(path: Path, hold: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "command": "sweep_target:quadratic", "base": {"hold": str(hold)},
        "space": {"x": [0.0, 0.3], "y": [2]}, "objective": {"metric": "score", "direction": "maximize"},
        "sampler": "grid", "trials": 2, "seed": 0}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_sweep_stopped_mid_trial_fails_the_trial_lists_it_and_retries_it(tmp_path, signum):
    out = tmp_path / "sweep"
    hold = tmp_path / "hold"
    hold.write_text("trials wait while this file exists")
    config = _sweep_file(tmp_path / "sweep.yaml", hold)
    process = _start("sweep", "--config", str(config), "--out", str(out))
    _, err = _signal_when(process, lambda: (out / "trials" / "0000").is_dir(), signum)
    assert process.returncode == 128 + signum, err
    assert f"interrupted ({signal.Signals(signum).name}): `sweep`" in err
    trials = pd.read_csv(out / "trials.csv")
    assert trials["state"].tolist() == ["FAIL", "WAITING"]  # the stopped trial, and its retry queued
    assert trials["error"][0].startswith("interrupted")
    stopped = trials["params.x"][0]
    hold.unlink()  # the same sweep again, its trials no longer held
    again = subprocess.run([sys.executable, str(REPO / "train.py"), "sweep", "--config", str(config), "--out",
                            str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    trials = pd.read_csv(out / "trials.csv")
    complete = trials[trials["state"] == "COMPLETE"]
    assert len(complete) == 2 and stopped in set(complete["params.x"])  # the stopped point was retried
    assert set(complete["params.x"]) == {0.0, 0.3}


def test_lightnings_sigterm_exit_is_reported_as_an_interruption(monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import headlab.cli

    def stopped(**_kwargs):
        raise SIGTERMException  # what Lightning raises (a SystemExit with no code) when told to stop

    monkeypatch.setattr(headlab.cli, "parse_command", lambda *a, **k: (stopped, {}))
    assert main(["toy"]) == 143
    assert "interrupted (SIGTERM)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_cache_stopped_by_sigterm_exits_143_and_resumes(tmp_path):
    import json

    from tiny_models import save_tiny_model

    model = save_tiny_model("gpt2", tmp_path / "gpt2", padding_side="left")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"the capital of rome {i}", "label": i % 2}) + "\n"
                            for i in range(400)))
    out = tmp_path / "cache"
    args = ["cache", "--model", str(model), "--dataset", str(data), "--out", str(out), "--batch_size", "1",
            "--shard_mb", "0.000001"]

    def some_shards() -> bool:
        try:
            return len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3
        except (OSError, ValueError, KeyError):
            return False

    process = _start(*args)
    _, err = _signal_when(process, some_shards, signal.SIGTERM)
    assert process.returncode == 143, err
    assert "interrupted (SIGTERM): `cache` stopped before it finished" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"]
    done = manifest["shards"][-1]["end_example"]
    again = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out} from example {done} of 400" in again.stdout + again.stderr
    assert json.loads((out / "manifest.json").read_text())["rows"] == 400
