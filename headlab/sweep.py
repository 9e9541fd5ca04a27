"""``python train.py sweep``: hyperparameter search over any config key of a headlab command, with Optuna.

The sweep file's format is described in :mod:`headlab.sweep_spec`. Every trial is a normal run directory
(``OUT/trials/NNNN``, with its resolved ``config.yaml``) and a W&B run grouped by the sweep. The study lives in
``OUT/study.db`` (SQLite) unless ``--storage`` names a database URL (PostgreSQL/MySQL) that many workers on many
machines share, or a journal file on a shared filesystem (:mod:`headlab.sweep_storage`); re-running continues the
study until it holds ``trials`` trials. Outputs: ``OUT/trials.csv``, ``OUT/best.yaml`` (a ready-to-run
``--config`` for the command), ``OUT/objective.png`` and ``OUT/importance.png``.

A sweep file runs code, like a Python script: its ``command`` may name any importable ``package.module:function``,
which the sweep imports and calls with the trial's config. Run sweep files you trust.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from headlab.errors import HeadlabError, Interrupted
from headlab.runs import atomic_write_text, run_directory, save_config, save_figure, to_plain
from headlab.sweep_spec import (
    SweepSpec,
    parse_sweep,
    read_metric,
    read_sweep_file,
    study_identity,
    trial_config,
)
from headlab.sweep_storage import open_storage, quiet_experimental, retrying
from headlab.tracking import current_trial

log = logging.getLogger("headlab")


def _parse(command: str, config: dict[str, Any], where: Path):
    """Parse ``config`` (written to the file ``where``, removed afterwards) with the command's own parser; unknown
    keys or bad values become a one-line error."""
    from headlab.cli import parse_command

    save_config(where.parent, config, name=where.name)
    try:
        return parse_command(command, ["--config", str(where)], exit_on_error=False)
    except HeadlabError:
        raise
    except Exception as error:  # jsonargparse raises ArgumentError / ParserError subclasses
        message = " ".join(str(error).split())
        raise HeadlabError(f"the sweep's config for `{command}` does not parse: {message}") from error
    finally:
        where.unlink(missing_ok=True)


def _sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid_values() for p in spec.space}, seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


@contextlib.contextmanager
def _trial_env(group: str) -> Iterator[None]:
    previous = os.environ.get("WANDB_RUN_GROUP")
    os.environ["WANDB_RUN_GROUP"] = group
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("WANDB_RUN_GROUP", None)
        else:
            os.environ["WANDB_RUN_GROUP"] = previous


class TrialFailed(HeadlabError):
    """A trial's command failed; its one-line error is the message, its traceback is in the trial's log."""


def sweep(
    config: Path,
    out: Path = Path("runs/sweep"),
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> Path:
    """Search hyperparameters of a headlab command with Optuna (resumable; many workers can share a study).

    A sweep file runs code, like a Python script: its ``command`` may name any importable
    ``package.module:function``, which the sweep imports and calls. Run only sweep files you trust.

    A failed trial prints its command's one-line error and keeps the traceback in ``OUT/trials/NNNN.log``; a sweep
    in which no trial completed ends with an error. Re-running a sweep continues it: a trial left running by a
    killed worker on this machine is marked failed and retried with the same parameters.

    Args:
        config: the sweep file (headlab format or a W&B sweep YAML).
        out: sweep directory: trials/, study.db, trials.csv, best.yaml, plots.
        trials: total trials the study should hold (default: the file's `trials`); re-running continues to it.
        storage: where the study lives (default: SQLite in OUT/study.db, for one machine). A database URL,
            e.g. postgresql+psycopg://USER@HOST/DB (pip install -e .[postgres]), lets workers on many machines share
            one study; a running trial records a heartbeat every HEADLAB_SWEEP_HEARTBEAT s (30), and a trial silent
            for HEADLAB_SWEEP_GRACE s (120) is failed and retried by the next worker that starts a trial.
            journal:PATH is Optuna's journal file on a shared filesystem: no heartbeat, so a trial whose worker
            died on another machine stays RUNNING until a sweep is re-run on that machine (which retries it).
        study_name: name of the study in the storage (default: the sweep file's name).
    """
    import optuna

    raw = read_sweep_file(config)
    spec = parse_sweep(raw, str(config))
    total = trials if trials is not None else spec.trials
    if total < 1:
        raise HeadlabError(f"--trials must be at least 1, got {total}")
    with run_directory(out, "sweep", exclusive=False):  # workers share the folder; each trial has its own
        # Fail before any trial: every key must parse with the command's own parser.
        check = out / f".check-config-{os.getpid()}.yaml"  # one per worker: many may start at once
        try:
            _parse(spec.command, trial_config(spec, {p.key: p.example() for p in spec.space},
                                              out / "trials" / "check"), check)
        finally:
            check.unlink(missing_ok=True)
        name = study_name or Path(config).stem
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial prints its own line
        study_storage = open_storage(storage, out)
        study = retrying(lambda: optuna.create_study(
            study_name=name, storage=study_storage, sampler=_sampler(spec), direction=spec.direction,
            load_if_exists=True, pruner=optuna.pruners.MedianPruner(n_startup_trials=2) if spec.prune else None))
        _check_same_study(study, spec, name, out)
        atomic_write_text(out / "sweep.yaml", yaml.safe_dump(to_plain(raw), sort_keys=False))
        _retry_dead_trials(study, study_storage, name)
        with quiet_experimental():  # another machine's dead worker: its heartbeat stopped
            optuna.storages.fail_stale_trials(study)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                    optuna.trial.TrialState.RUNNING)
        remaining = total - len(study.get_trials(deepcopy=False, states=finished))
        if remaining > 0:
            stopped: list[dict] = []  # parameters of a trial a signal stopped
            try:
                study.optimize(_objective(spec, out, name, stopped, total), n_trials=remaining, catch=(HeadlabError,),
                               callbacks=[optuna.study.MaxTrialsCallback(total, states=finished)])
            except KeyboardInterrupt as stop:  # Optuna has failed the trial; the next run retries its parameters
                for params in stopped:
                    study.enqueue_trial(params, skip_if_exists=False)
                write_trials(study, out)
                raise (stop.__cause__ if isinstance(stop.__cause__, Interrupted) else stop) from None
        write_summary(study, spec, out)
    return out


def _check_same_study(study, spec: SweepSpec, name: str, out: Path) -> None:
    """A study records the sweep that made it; a sweep file that differs (other than in its trial count) is refused
    rather than reported as the old study's results."""
    identity = json.loads(json.dumps(study_identity(spec)))
    stored = study.user_attrs.get("sweep")
    if stored is None:
        if not study.trials:  # a new study: record what it is
            study.set_user_attr("sweep", identity)
        return
    differ = [key for key in identity if stored.get(key) != identity[key]]
    if differ:
        raise HeadlabError(f"--out {out} holds study '{name}' of another sweep (it differs in {', '.join(differ)}); "
                           "pass --study_name NEW to start a new study there, or choose a new --out")


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _retry_dead_trials(study, storage, name: str) -> None:
    """Fail the RUNNING trials whose worker was a process of this machine that no longer exists (a killed sweep),
    and queue a retry of each with the same parameters. Other machines' dead workers are caught by the heartbeat."""
    import optuna

    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:  # another worker starting now may have failed it first; then that one retries it
            storage.set_trial_user_attr(trial_id, "error", "its worker was killed; retried")
            if not storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        study.enqueue_trial(trial.params, skip_if_exists=False)
        print(f"sweep: trial {trial.number} was left running by a killed worker (pid {pid}); retrying its "
              "parameters", flush=True)


class _Surplus(HeadlabError):
    """The trial is one more than the study needs (another worker started the last one first); it is not run."""


def _surplus(trial, total: int) -> bool:
    """Whether ``total`` trials numbered before this one are running or done. Each worker checks the trial count
    after a trial and then creates the next one, so two workers finishing together may both create one; trial
    numbers are handed out in order, and only the later one is surplus."""
    import optuna

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=counted) if t.number < trial.number]
    return len(earlier) >= total


def _drop_surplus(trial, spec: SweepSpec, total: int) -> None:
    trial.set_user_attr("error", f"not run: the study already had its {total} trials (another worker started "
                                 "the last one first)")
    if spec.sampler == "grid":  # the grid sampler counts a failed trial's point as visited: this one never ran
        trial.storage.set_trial_system_attr(trial._trial_id, "search_space", {})
    trial.study.stop()
    raise _Surplus(f"trial {trial.number} is surplus")


def _objective(spec: SweepSpec, out: Path, group: str, stopped: list[dict], total: int):
    """Optuna's objective: run the command on the trial's config and read the metric from its run directory. A
    trial a signal stops appends its parameters to ``stopped`` and ends as a KeyboardInterrupt, which Optuna turns
    into a failed trial before re-raising. A trial beyond the study's ``total`` fails at once, without running."""
    import optuna

    from headlab.tracking import finish_wandb

    def objective(trial) -> float:
        trial.set_user_attr("worker", _worker())
        if _surplus(trial, total):
            _drop_surplus(trial, spec, total)
        params = {p.key: p.suggest(trial) for p in spec.space}
        run_dir = out / "trials" / f"{trial.number:04d}"
        log_path = out / "trials" / f"{trial.number:04d}.log"
        trial.set_user_attr("run_dir", str(run_dir))
        token = current_trial.set(trial)
        started = time.perf_counter()
        try:
            config = trial_config(spec, params, run_dir)
            trial.set_user_attr("config", to_plain(config))  # best.yaml is built from it
            fn, kwargs = _parse(spec.command, config, out / "trials" / f".{trial.number:04d}.config.yaml")
            with _trial_env(group):
                fn(**kwargs)
            if run_dir.is_dir() and not (run_dir / "config.yaml").exists():  # a user function's run directory
                save_config(run_dir, config)
            value = read_metric(run_dir, spec.metric)
        except optuna.TrialPruned:
            raise
        except (Interrupted, KeyboardInterrupt) as stop:  # Optuna fails a trial on KeyboardInterrupt only
            trial.set_user_attr("error", f"interrupted ({stop or 'SIGINT'}); retried when the sweep runs again")
            stopped.append(dict(trial.params))
            raise KeyboardInterrupt(str(stop)) from stop
        except Exception as error:
            from headlab.cli import describe_error

            _, message = describe_error(error, spec.command)
            atomic_write_text(log_path, f"trial {trial.number} {params}\nerror: {message}\n\n"
                                        + "".join(traceback.format_exception(error)))
            trial.set_user_attr("error", message)
            trial.set_user_attr("log", str(log_path))
            print(f"sweep: trial {trial.number} failed: error: {message} (log: {log_path})", flush=True)
            raise TrialFailed(message) from error
        finally:
            current_trial.reset(token)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            finish_wandb()
        log.info("trial %d: %s=%.4g %s", trial.number, spec.metric, value, params)
        return value

    return objective


def write_trials(study, out: Path) -> None:
    """trials.csv: one row per trial of the study, in any state."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, **{f"params.{k}": v for k, v in t.params.items()},
                     "objective": t.value, "seconds": t.user_attrs.get("seconds"),
                     "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error")})
    atomic_write_text(out / "trials.csv", pd.DataFrame(rows).to_csv(index=False))


def write_summary(study, spec: SweepSpec, out: Path) -> None:
    """trials.csv, best.yaml and the plots, from whatever the study holds now."""
    write_trials(study, out)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        failed = [t for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL" and "log" in t.user_attrs]
        first = (f"; the first failure (trial {failed[0].number}): {failed[0].user_attrs.get('error')} "
                 f"(log: {failed[0].user_attrs['log']})") if failed else ""
        raise HeadlabError(f"no trial of the sweep completed (see {out / 'trials.csv'}){first}")
    best = study.best_trial
    best_config = dict(best.user_attrs["config"])
    best_config["out"] = str(out / "best-run")
    header = (f"# best of {len(complete)} trials of {out}: {spec.metric}={best.value:.6g} (trial {best.number})\n"
              f"# python train.py {spec.command} --config {out / 'best.yaml'}\n")
    atomic_write_text(out / "best.yaml", header + yaml.safe_dump(to_plain(best_config), sort_keys=False))
    _plots(study, complete, spec, out)
    print(f"sweep: {len(complete)} complete trials; best {spec.metric}={best.value:.4g} (trial {best.number}, "
          f"{best.params}) -> {out / 'best.yaml'}")


def _plots(study, complete, spec: SweepSpec, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [t.number for t in complete]
    values = [t.value for t in complete]
    running = []
    for v in values:
        prev = running[-1] if running else v
        running.append(max(prev, v) if spec.direction == "maximize" else min(prev, v))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(numbers, values, "o", label="trial")
    ax.plot(numbers, running, "-", label="best so far")
    ax.set(xlabel="trial", ylabel=spec.metric, title=f"{spec.command} sweep: objective over trials")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "objective.png", dpi=120)
    try:
        import optuna

        importance = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few or constant trials
        importance = {}
    if importance and all(math.isfinite(v) for v in importance.values()):
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importance)))
        ax.barh(list(importance)[::-1], list(importance.values())[::-1])
        ax.set(xlabel="importance (fANOVA)", title="parameter importance")
        fig.tight_layout()
        save_figure(fig, out / "importance.png", dpi=120)
