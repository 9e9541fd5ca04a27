"""Sweeps: search spaces, resumable studies, shared storage across workers, W&B sweep files, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from headlab.cli import main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def write_sweep(path: Path, **overrides) -> Path:
    spec = {
        "command": "sweep_target:quadratic",
        "base": {"scale": {"power": 2}},
        "space": {"x": {"low": -1.0, "high": 1.0}, "y": [0, 1, 2, 3]},
        "objective": {"metric": "score", "direction": "maximize"},
        "sampler": "random",
        "trials": 6,
        "seed": 0,
    }
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_writes_trials_best_config_and_plots(tmp_path, capsys):
    config = write_sweep(tmp_path / "s.yaml")
    assert main(["sweep", "--config", str(config), "--trials", "5", "--out", str(tmp_path / "out")]) == 0
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert len(trials) == 5 and set(trials["state"]) == {"COMPLETE"}
    assert {"number", "state", "params.x", "params.y", "objective"} <= set(trials.columns)
    expected = -((trials["params.x"] - 0.3) ** 2 + (trials["params.y"] - 2) ** 2)
    assert (trials["objective"] - expected).abs().max() < 1e-9
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best["x"] == trials.loc[trials["objective"].idxmax(), "params.x"]
    assert (tmp_path / "out" / "objective.png").exists()
    for run_dir in trials["run_dir"]:
        assert (Path(run_dir) / "config.yaml").exists()
    # best.yaml is accepted by the swept command as --config
    from headlab.cli import build_parser

    parser, _ = build_parser("sweep_target:quadratic")
    assert parser.parse_args(["--config", str(tmp_path / "out" / "best.yaml")]).x == best["x"]


def test_rerunning_continues_the_study(tmp_path):
    config = write_sweep(tmp_path / "s.yaml")
    main(["sweep", "--config", str(config), "--trials", "3", "--out", str(tmp_path / "out")])
    main(["sweep", "--config", str(config), "--trials", "5", "--out", str(tmp_path / "out")])
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert sorted(trials["number"]) == [0, 1, 2, 3, 4]


def test_grid_sampler_visits_every_point_once(tmp_path):
    config = write_sweep(tmp_path / "s.yaml", sampler="grid", space={"x": [0.0, 0.3], "y": [1, 2, 3]})
    main(["sweep", "--config", str(config), "--trials", "6", "--out", str(tmp_path / "out")])
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert sorted(zip(trials["params.x"], trials["params.y"])) == [(x, y) for x in (0.0, 0.3) for y in (1, 2, 3)]
    assert trials["objective"].max() == 0.0


def test_dotted_keys_reach_nested_groups(tmp_path):
    config = write_sweep(tmp_path / "s.yaml", space={"scale.power": [1, 2]}, sampler="grid", base={"x": 1.3, "y": 2})
    main(["sweep", "--config", str(config), "--trials", "2", "--out", str(tmp_path / "out")])
    trials = pd.read_csv(tmp_path / "out" / "trials.csv").sort_values("params.scale.power")
    assert trials["objective"].round(9).tolist() == [-1.0, -1.0]
    assert yaml.safe_load((Path(trials["run_dir"].iloc[0]) / "config.yaml").read_text())["scale"]["power"] == 1


def test_wandb_sweep_files_are_accepted(tmp_path):
    path = tmp_path / "wandb.yaml"
    path.write_text(yaml.safe_dump({
        "program": "train.py", "method": "random", "metric": {"name": "score", "goal": "maximize"},
        "command": ["${env}", "python", "${program}", "sweep_target:quadratic", "${args}"],
        "parameters": {"x": {"distribution": "uniform", "min": 0.0, "max": 0.5}, "y": {"values": [2]},
                       "scale.power": {"value": 2}},
    }))
    assert main(["sweep", "--config", str(path), "--trials", "3", "--out", str(tmp_path / "out")]) == 0
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert len(trials) == 3 and trials["params.x"].between(0, 0.5).all()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"space": {}}, "search space is empty"),
    ({"space": {"no_such_key": [1, 2]}}, "does not parse"),
    ({"space": {"scale.nope": [1, 2]}}, "does not parse"),
    ({"space": {"x": {"low": 1.0, "high": 0.0}}}, "low >= high"),
    ({"sampler": "grid", "space": {"x": {"low": 0.0, "high": 1.0}}}, "grid search needs a list"),
    ({"command": "nonsense"}, "`command` must be one of"),
])
def test_bad_sweep_files_fail_before_any_trial(tmp_path, capsys, overrides, message):
    config = write_sweep(tmp_path / "s.yaml", **overrides)
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out" / "trials").exists()


def test_objective_the_run_does_not_log_is_reported(tmp_path, capsys):
    config = write_sweep(tmp_path / "s.yaml", objective={"metric": "accuracy"})
    main(["sweep", "--config", str(config), "--trials", "1", "--out", str(tmp_path / "out")])
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert trials["state"].tolist() == ["FAIL"] and "does not log metric 'accuracy'" in trials["error"][0]


def test_a_missing_metric_names_the_closest_ones_in_one_short_line(tmp_path):
    from headlab.errors import HeadlabError
    from headlab.sweep_spec import read_metric

    (tmp_path / "metrics.json").write_text('{"score": 1.0, "nested": {"x": 0.5, "scores": [1, 2]}, "name": "a"}')
    assert read_metric(tmp_path, "nested.x") == 0.5
    with pytest.raises(HeadlabError) as caught:
        read_metric(tmp_path, "scor")
    message = str(caught.value)
    assert "closest: score" in message and "top-level metrics: score" in message
    assert len(message) < 250 and ". " not in message.split("closest:")[1].split(";")[0]  # no 'score.' keys


def test_wandb_file_with_unsupported_distribution_is_refused(tmp_path, capsys):
    path = tmp_path / "wandb.yaml"
    path.write_text(yaml.safe_dump({"method": "bayes", "metric": {"name": "score"}, "headlab_command": "probe",
                                    "parameters": {"x": {"distribution": "normal", "mu": 0, "sigma": 1}}}))
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "distribution 'normal'" in capsys.readouterr().err


def test_unreachable_storage_is_a_clear_error(tmp_path, capsys):
    config = write_sweep(tmp_path / "s.yaml")
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out"),
                 "--storage", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    assert "cannot open sweep storage" in capsys.readouterr().err


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_without_duplicates(tmp_path):
    config = write_sweep(tmp_path / "s.yaml", trials=8)
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(REPO / "train.py"), "sweep", "--config", str(config), "--out",
               str(tmp_path / "out")]
    workers = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 8 and done["number"].is_unique and done["run_dir"].is_unique
    # two workers finishing together may each start a 9th trial: it fails without running
    assert all(str(error).startswith("not run: the study already had its 8")
               for error in trials[trials["state"] != "COMPLETE"]["error"])


def test_a_trial_beyond_the_total_fails_without_running_and_leaves_its_grid_point_unvisited(tmp_path):
    """What a worker does when another one started the study's last trial between its count and its next trial."""
    import optuna

    from headlab.sweep import _objective, _sampler
    from headlab.sweep_spec import parse_sweep

    config = write_sweep(tmp_path / "s.yaml", sampler="grid", space={"x": [0.0, 0.3, 0.6], "y": [2]}, trials=2)
    spec = parse_sweep(yaml.safe_load(config.read_text()))
    sampler = _sampler(spec)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    running = [study.ask() for _ in range(2)]  # the study's 2 trials, running on other workers
    study.optimize(_objective(spec, tmp_path / "out", "s", [], total=2), n_trials=5, catch=(Exception,))
    extra = study.trials[2:]
    assert len(extra) == 1 and extra[0].state == optuna.trial.TrialState.FAIL  # it also stopped this worker
    assert extra[0].user_attrs["error"].startswith("not run: the study already had its 2 trials")
    assert not (tmp_path / "out" / "trials").exists()
    for trial in running:  # their workers finish them (in their own processes: no sampler hook runs here)
        trial.storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [0.0])
    assert not sampler.is_exhausted(study)  # the third grid point is still to run, when the total is raised


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_parse_with_their_command(path, tmp_path):
    from headlab.sweep import _parse
    from headlab.sweep_spec import parse_sweep, trial_config

    spec = parse_sweep(yaml.safe_load(path.read_text()), str(path))
    config = trial_config(spec, {p.key: p.example() for p in spec.space}, tmp_path / "trial")
    _parse(spec.command, config, tmp_path / "check.yaml")


def test_pruning_callback_reports_with_the_study_direction_and_prunes_bad_runs():
    import optuna

    from headlab.tracking import PruningCallback, current_trial, sweep_callbacks

    class Trainer:  # the few attributes the callback reads
        sanity_checking = False

        def __init__(self, step, loss):
            self.global_step, self.callback_metrics = step, {"train/loss": loss}

    assert sweep_callbacks("train/loss") == []
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    token = current_trial.set(good)
    PruningCallback("train/loss", mode="min").on_train_batch_end(Trainer(100, 0.1), None, None, None, 0)
    current_trial.reset(token)
    assert good.storage.get_trial(good._trial_id).intermediate_values == {100: -0.1}
    study.tell(good, 1.0)
    bad = study.ask()
    token = current_trial.set(bad)
    try:
        with pytest.raises(optuna.TrialPruned):
            sweep_callbacks("train/loss")[0].on_train_batch_end(Trainer(100, 5.0), None, None, None, 0)
    finally:
        current_trial.reset(token)


def test_an_edited_sweep_file_is_refused_in_the_same_out(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(write_sweep(tmp_path / "s.yaml", trials=2)), "--out", str(out)]) == 0
    before = (out / "trials.csv").read_text()
    capsys.readouterr()
    edited = write_sweep(tmp_path / "s.yaml", trials=2, objective={"metric": "nested.x", "direction": "minimize"})
    assert main(["sweep", "--config", str(edited), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds study 's' of another sweep (it differs in metric, direction)" in err and "--study_name" in err
    assert (out / "trials.csv").read_text() == before
    # a new study name in the same folder runs; raising the trial count of the same file continues the study
    assert main(["sweep", "--config", str(edited), "--out", str(out), "--study_name", "other"]) == 0
    same = write_sweep(tmp_path / "s.yaml", trials=3)
    assert main(["sweep", "--config", str(same), "--out", str(out), "--trials", "3"]) == 0


@pytest.mark.parametrize("extra, message", [({"objectiv": {"metric": "score"}}, "unknown key `objectiv`"),
                                            ({"objective": {"metric": "score", "goal": "max"}},
                                             "unknown key `objective.goal`")])
def test_unknown_keys_in_a_sweep_file_are_refused(tmp_path, capsys, extra, message):
    config = write_sweep(tmp_path / "s.yaml", **extra)
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
