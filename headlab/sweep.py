"""``python train.py sweep``: hyperparameter search over any config key of a headlab command, with Optuna.

A sweep file names the command, a base config, a search space over dotted config keys, the objective and the
sampler::

    command: probe      # a headlab command, or package.module:function, that writes RUN/metrics.json
    base: {cache: runs/demo/cache, logger: none}       # or base_config: path/to/config.yaml
    space:
      probe.l2: {low: 1.0e-4, high: 1.0, log: true}    # float range
      probe.epochs: {low: 5, high: 50, step: 5}        # int range (ints for low/high)
      probe.standardize: [true, false]                 # categorical
    objective: {metric: test_accuracy_top1, direction: maximize}
    sampler: tpe                          # tpe | random | grid (grid needs lists or int ranges with a step)
    trials: 20
    seed: 0

A W&B sweep file (``method``/``metric``/``parameters``, with the headlab command in its ``command`` list or a
``headlab_command`` key) is accepted too; see :func:`from_wandb`.

Every trial is a normal run directory (``OUT/trials/NNNN``, with its resolved ``config.yaml``) and a W&B run
grouped by the sweep. The study lives in ``OUT/study.db`` (SQLite) unless ``--storage`` names a database URL
(PostgreSQL/MySQL) that many workers on many machines share; re-running continues the study until it holds
``trials`` trials. Outputs: ``OUT/trials.csv``, ``OUT/best.yaml`` (a ready-to-run ``--config`` for the command),
``OUT/objective.png`` and ``OUT/importance.png``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from headlab.errors import HeadlabError
from headlab.runs import atomic_write_text, load_config, save_config, to_plain

log = logging.getLogger("headlab")

METRICS_FILE = "metrics.json"
Sampler = Literal["tpe", "random", "grid"]

# The Optuna trial of the run in progress (None outside a sweep): training loops report to it for pruning.
current_trial: contextvars.ContextVar[Any] = contextvars.ContextVar("headlab_current_trial", default=None)


@dataclass
class Param:
    """One dimension of the search space."""

    key: str  # dotted config key, e.g. "probe.l2"
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in (self.low, self.high))

    def grid_values(self) -> list[Any]:
        if self.choices is not None:
            return list(self.choices)
        if self.is_int and self.step:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        raise HeadlabError(
            f"grid search needs a list of values for '{self.key}' (or an int range with a step); "
            "give `[v1, v2, ...]` or use sampler tpe/random"
        )

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def example(self) -> Any:
        return self.choices[0] if self.choices is not None else (int(self.low) if self.is_int else float(self.low))


@dataclass
class SweepSpec:
    command: str
    base: dict[str, Any]
    space: list[Param]
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"
    sampler: Sampler = "tpe"
    trials: int = 10
    seed: int = 0
    prune: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _param(key: str, spec: Any) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise HeadlabError(f"search space entry '{key}' is an empty list; give at least one value")
        return Param(key, choices=spec)
    if isinstance(spec, dict):
        if "values" in spec or "choices" in spec:
            return _param(key, list(spec.get("values", spec.get("choices"))))
        if "low" in spec and "high" in spec:
            if spec["low"] >= spec["high"]:
                raise HeadlabError(f"search space entry '{key}' has low >= high ({spec['low']} >= {spec['high']})")
            if spec.get("log") and spec["low"] <= 0:
                raise HeadlabError(f"search space entry '{key}' is log-scaled but low is {spec['low']}; use low > 0")
            return Param(key, low=spec["low"], high=spec["high"], step=spec.get("step"), log=bool(spec.get("log")))
    raise HeadlabError(
        f"search space entry '{key}' must be a list of values or {{low, high[, step, log]}}, got {spec!r}"
    )


def parse_sweep(raw: dict[str, Any], path: str = "sweep file") -> SweepSpec:
    """Read a headlab sweep file (or a W&B one, converted by :func:`from_wandb`)."""
    from headlab.cli import COMMANDS

    if "parameters" in raw and "space" not in raw:
        raw = from_wandb(raw, path)
    command = raw.get("command")
    user_function = isinstance(command, str) and re.fullmatch(r"[\w.]+:\w+", command) is not None
    if not user_function and (command not in COMMANDS or command in {"sweep", "demo"}):
        choices = ", ".join(c for c in COMMANDS if c not in {"sweep", "demo"})
        raise HeadlabError(f"{path}: `command` must be one of {choices} (or package.module:function), got {command!r}")
    space = raw.get("space") or {}
    if not space:
        raise HeadlabError(f"{path}: the search space is empty; add `space:` with at least one config key")
    base = dict(raw.get("base") or {})
    if raw.get("base_config"):
        base = {**load_config(raw["base_config"]), **base}
    objective = raw.get("objective") or {}
    if not objective.get("metric"):
        raise HeadlabError(f"{path}: give `objective: {{metric: NAME, direction: maximize|minimize}}`")
    direction = objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise HeadlabError(f"{path}: objective direction must be maximize or minimize, got {direction!r}")
    sampler = raw.get("sampler", "tpe")
    if sampler not in ("tpe", "random", "grid"):
        raise HeadlabError(f"{path}: sampler must be tpe, random or grid, got {sampler!r}")
    return SweepSpec(command, base, [_param(k, v) for k, v in space.items()], objective["metric"], direction,
                     sampler, int(raw.get("trials", 10)), int(raw.get("seed", 0)), bool(raw.get("prune", True)))


_WANDB_METHODS = {"grid": "grid", "random": "random", "bayes": "tpe"}


def from_wandb(raw: dict[str, Any], path: str = "sweep file") -> dict[str, Any]:
    """Convert a W&B sweep config (``method``, ``metric``, ``parameters``) into a headlab sweep.

    Supported parameter forms: ``value``, ``values``, ``min``/``max`` with ``distribution`` uniform,
    int_uniform, q_uniform, log_uniform_values or categorical. The headlab command comes from ``headlab_command``
    or from the ``command`` list (``[${env}, python, ${program}, probe, ${args}]``).
    """
    from headlab.cli import COMMANDS

    command = raw.get("headlab_command")
    if command is None and isinstance(raw.get("command"), list):
        command = next((c for c in raw["command"]
                        if c in COMMANDS or re.fullmatch(r"[\w.]+:\w+", str(c))), None)
    method = raw.get("method", "random")
    if method not in _WANDB_METHODS:
        raise HeadlabError(f"{path}: W&B method {method!r} is not supported; use grid, random or bayes")
    base, space = {}, {}
    for key, spec in (raw.get("parameters") or {}).items():
        if not isinstance(spec, dict):
            raise HeadlabError(f"{path}: parameter '{key}' must be a mapping, got {spec!r}")
        if "value" in spec:
            base[key] = spec["value"]
            continue
        if "values" in spec:
            space[key] = list(spec["values"])
            continue
        distribution = spec.get("distribution", "int_uniform" if isinstance(spec.get("min"), int) else "uniform")
        if distribution in ("uniform", "int_uniform"):
            space[key] = {"low": spec["min"], "high": spec["max"]}
        elif distribution == "q_uniform":
            space[key] = {"low": spec["min"], "high": spec["max"], "step": spec.get("q", 1)}
        elif distribution == "log_uniform_values":
            space[key] = {"low": spec["min"], "high": spec["max"], "log": True}
        else:
            raise HeadlabError(
                f"{path}: parameter '{key}' uses distribution {distribution!r}, which headlab does not support; "
                "use uniform, int_uniform, q_uniform, log_uniform_values or values"
            )
    metric = raw.get("metric") or {}
    nested_base: dict[str, Any] = {}
    for key, value in base.items():
        _set_dotted(nested_base, key, value)
    return {"command": command, "base": nested_base, "space": space,
            "objective": {"metric": metric.get("name"),
                          "direction": "minimize" if metric.get("goal") == "minimize" else "maximize"},
            "sampler": _WANDB_METHODS[method], "trials": raw.get("run_cap", 10)}


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HeadlabError(f"config key '{key}' goes through '{part}', which is not a group of options")
    node[parts[-1]] = value


def trial_config(spec: SweepSpec, params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    import copy

    config = copy.deepcopy(spec.base)
    for key, value in params.items():
        _set_dotted(config, key, value)
    config["out"] = str(run_dir)
    return config


def _parse(command: str, config: dict[str, Any], where: Path):
    """Parse ``config`` with the command's own parser; unknown keys or bad values become a one-line error."""
    from headlab.cli import parse_command

    save_config(where.parent, config, name=where.name)
    try:
        return parse_command(command, ["--config", str(where)], exit_on_error=False)
    except HeadlabError:
        raise
    except Exception as error:  # jsonargparse raises ArgumentError / ParserError subclasses
        message = " ".join(str(error).split())
        raise HeadlabError(f"the sweep's config for `{command}` does not parse: {message}") from error


def read_metric(run_dir: Path, metric: str) -> float:
    """The objective from ``RUN/metrics.json`` or ``RUN/summary.json`` (dotted keys reach into nested dicts)."""
    import json

    files = [run_dir / name for name in (METRICS_FILE, "summary.json") if (run_dir / name).exists()]
    if not files:
        raise HeadlabError(f"run {run_dir} wrote neither {METRICS_FILE} nor summary.json to read the objective from")
    logged: list[str] = []
    for path in files:
        node: Any = json.loads(path.read_text())
        logged += _flat_keys(node)
        for part in metric.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node)
    raise HeadlabError(f"run {run_dir} does not log metric '{metric}'; it logs: {', '.join(sorted(logged))}")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    return [k for key, value in node.items() for k in _flat_keys(value, f"{prefix}{key}.")] if node else []


class PruningCallback:
    """A Lightning callback that reports ``monitor`` to the current Optuna trial every ``every_n_steps`` training
    steps (and after each validation) and stops the run when the pruner says so. ``mode`` says whether the
    monitored value is better high (``max``) or low (``min``); it is sign-flipped when the study optimises the
    other way, so a sweep maximising accuracy can prune on training loss. Does nothing outside a sweep."""

    def __new__(cls, monitor: str, mode: Literal["min", "max"] = "min", every_n_steps: int = 100):
        from lightning.pytorch.callbacks import Callback

        class _Pruning(Callback):
            def _report(self, trainer) -> None:
                trial = current_trial.get()
                value = trainer.callback_metrics.get(monitor)
                if trial is None or value is None or trainer.sanity_checking:
                    return
                import optuna

                maximize = trial.study.direction == optuna.study.StudyDirection.MAXIMIZE
                value = float(value)
                trial.report(value if (mode == "max") == maximize else -value, step=trainer.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {trainer.global_step} ({monitor}={value:.4g})")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if trainer.global_step and trainer.global_step % every_n_steps == 0:
                    self._report(trainer)

            def on_validation_end(self, trainer, pl_module) -> None:
                self._report(trainer)

        return _Pruning()


def sweep_callbacks(monitor: str, mode: Literal["min", "max"] = "min") -> list:
    """Callbacks a training command adds so that sweeps can prune it: empty outside a sweep."""
    if current_trial.get() is None:
        return []
    return [PruningCallback(monitor, mode)]


def _retrying(make, attempts: int = 5):
    """Run ``make()``, retrying briefly: workers starting together race to create the study's tables and rows."""
    for attempt in range(attempts):
        try:
            return make()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def _storage(url: str | None, out: Path):
    import optuna

    url = url or f"sqlite:///{(out / 'study.db').resolve()}"
    storages = optuna.storages
    retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    kwargs: dict[str, Any] = {"heartbeat_interval": 30, "grace_period": 120,
                              "heartbeat_stale_trial_callback": retry(max_retry=1)}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    attempts = 5 if url.startswith("sqlite") else 2
    try:
        return _retrying(lambda: optuna.storages.RDBStorage(url, **kwargs), attempts)
    except Exception as error:
        raise HeadlabError(
            f"cannot open sweep storage {url.split('@')[-1]!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160]}); check the URL, the server and its driver"
        ) from error


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


def sweep(
    config: Path,
    out: Path = Path("runs/sweep"),
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> Path:
    """Search hyperparameters of a headlab command with Optuna (resumable; many workers can share a study).

    Args:
        config: the sweep file (headlab format or a W&B sweep YAML).
        out: sweep directory: trials/, study.db, trials.csv, best.yaml, plots.
        trials: total trials the study should hold (default: the file's `trials`); re-running continues to it.
        storage: database URL shared by many workers (default: sqlite in OUT/study.db).
        study_name: name of the study in the storage (default: the sweep file's name).
    """
    import optuna

    raw = _read_sweep_file(config)
    spec = parse_sweep(raw, str(config))
    total = trials if trials is not None else spec.trials
    if total < 1:
        raise HeadlabError(f"--trials must be at least 1, got {total}")
    out.mkdir(parents=True, exist_ok=True)
    # Fail before any trial: every key must parse with the command's own parser.
    check = out / f".check-config-{os.getpid()}.yaml"  # one per worker: many may start at once
    try:
        _parse(spec.command, trial_config(spec, {p.key: p.example() for p in spec.space}, out / "trials" / "check"),
               check)
    finally:
        check.unlink(missing_ok=True)
    _check_metric_is_logged(spec)
    name = study_name or Path(config).stem
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_storage = _storage(storage, out)
    study = _retrying(lambda: optuna.create_study(
        study_name=name, storage=study_storage, sampler=_sampler(spec), direction=spec.direction, load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2) if spec.prune else None))
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(to_plain(raw), sort_keys=False))

    def objective(trial) -> float:
        params = {p.key: p.suggest(trial) for p in spec.space}
        run_dir = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        fn, kwargs = _parse(spec.command, trial_config(spec, params, run_dir), run_dir / "config.yaml")
        token = current_trial.set(trial)
        started = time.perf_counter()
        try:
            with _trial_env(name):
                fn(**kwargs)
            value = read_metric(run_dir, spec.metric)
        except HeadlabError as error:
            trial.set_user_attr("error", str(error))
            log.warning("trial %d failed: %s", trial.number, error)
            raise
        finally:
            current_trial.reset(token)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            from headlab.tracking import finish_wandb

            finish_wandb()
        log.info("trial %d: %s=%.4g %s", trial.number, spec.metric, value, params)
        return value

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL,
              optuna.trial.TrialState.RUNNING)
    remaining = total - len(study.get_trials(deepcopy=False, states=states))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(HeadlabError,),
                       callbacks=[optuna.study.MaxTrialsCallback(total, states=states)])
    write_summary(study, spec, out)
    return out


def _read_sweep_file(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise HeadlabError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise HeadlabError(f"sweep file {path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(raw, dict):
        raise HeadlabError(f"sweep file {path} must be a mapping with command, space and objective")
    return raw


# What each command writes to RUN/metrics.json, so a sweep can refuse an objective nobody logs before it starts.
# A command not listed here is checked after its first trial instead.
LOGGED_METRICS: dict[str, list[str]] = {}


def _check_metric_is_logged(spec: SweepSpec) -> None:
    known = LOGGED_METRICS.get(spec.command)
    if known is not None and spec.metric not in known:
        raise HeadlabError(
            f"`{spec.command}` does not log metric '{spec.metric}'; choose one of: {', '.join(known)}"
        )


def write_summary(study, spec: SweepSpec, out: Path) -> None:
    """trials.csv, best.yaml and the plots, from whatever the study holds now."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, **{f"params.{k}": v for k, v in t.params.items()},
                     "objective": t.value, "seconds": t.user_attrs.get("seconds"),
                     "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error")})
    table = pd.DataFrame(rows)
    atomic_write_text(out / "trials.csv", table.to_csv(index=False))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        log.warning("no trial completed; see %s", out / "trials.csv")
        return
    best = study.best_trial
    best_config = load_config(Path(best.user_attrs["run_dir"]) / "config.yaml")
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
    fig.savefig(out / "objective.png", dpi=120)
    plt.close(fig)
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
        fig.savefig(out / "importance.png", dpi=120)
        plt.close(fig)
