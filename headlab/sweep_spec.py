"""Sweep files: the command, base config, search space, objective and sampler of a sweep, read and checked.

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
``headlab_command`` key) is accepted too; see :func:`from_wandb`. The objective is read from the trial run's
``metrics.json`` or ``summary.json`` (:func:`read_metric`).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from headlab.errors import HeadlabError
from headlab.runs import load_config

METRICS_FILE = "metrics.json"
Sampler = Literal["tpe", "random", "grid"]


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


SWEEP_KEYS = ("command", "base", "base_config", "space", "objective", "sampler", "trials", "seed", "prune")
"""The keys of a headlab sweep file."""


def _known_keys(mapping: dict[str, Any], known: tuple[str, ...], path: str, prefix: str) -> None:
    unknown = [str(k) for k in mapping if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean `{prefix}{close[0]}`?)" if close else ""
        raise HeadlabError(f"{path}: unknown key `{prefix}{unknown[0]}`{hint}; a sweep file's keys are: "
                           f"{', '.join(prefix + k for k in known)}")


def study_identity(spec: SweepSpec) -> dict[str, Any]:
    """What makes two sweep files the same study: everything but the trial count (raising it continues a study)."""
    from headlab.runs import to_plain

    return {"command": spec.command, "base": to_plain(spec.base), "space": to_plain(spec.space),
            "metric": spec.metric, "direction": spec.direction, "sampler": spec.sampler, "seed": spec.seed,
            "prune": spec.prune}


def parse_sweep(raw: dict[str, Any], path: str = "sweep file") -> SweepSpec:
    """Read a headlab sweep file (or a W&B one, converted by :func:`from_wandb`)."""
    from headlab.cli import COMMANDS

    if "parameters" in raw and "space" not in raw:
        raw = from_wandb(raw, path)
    else:
        _known_keys(raw, SWEEP_KEYS, path, "")
        if isinstance(raw.get("objective"), dict):
            _known_keys(raw["objective"], ("metric", "direction"), path, "objective.")
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
    numbers = {}
    for key, default in (("trials", 10), ("seed", 0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise HeadlabError(f"{path}: `{key}: {value}` must be a whole number")
        numbers[key] = value
    prune = raw.get("prune", True)
    if not isinstance(prune, bool):
        raise HeadlabError(f"{path}: `prune: {prune}` must be true or false")
    return SweepSpec(command, base, [_param(k, v) for k, v in space.items()], objective["metric"], direction,
                     sampler, numbers["trials"], numbers["seed"], prune)


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


def read_sweep_file(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise HeadlabError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise HeadlabError(f"sweep file {path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(raw, dict):
        raise HeadlabError(f"sweep file {path} must be a mapping with command, space and objective")
    return raw


def read_metric(run_dir: Path, metric: str) -> float:
    """The objective from ``RUN/metrics.json`` or ``RUN/summary.json`` (dotted keys reach into nested dicts)."""
    files = [run_dir / name for name in (METRICS_FILE, "summary.json") if (run_dir / name).exists()]
    if not files:
        raise HeadlabError(f"run {run_dir} wrote neither {METRICS_FILE} nor summary.json to read the objective from")
    logged: dict[str, Any] = {}
    for path in files:
        node: Any = json.loads(path.read_text())
        logged.update(_flat_numbers(node))
        for part in metric.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node)
    top = sorted(k for k in logged if "." not in k)[:8]  # the run's own headline numbers
    close = difflib.get_close_matches(metric, list(logged), n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise HeadlabError(f"run {run_dir} does not log metric '{metric}'; {hint}top-level metrics: "
                       f"{', '.join(top) or 'none'} (dotted keys reach nested ones)")


def _flat_numbers(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted.key: value}`` of every number in a JSON object (lists are not entered)."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat_numbers(value, f"{prefix}{key}.").items()}
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return {prefix.rstrip("."): node}
    return {}
