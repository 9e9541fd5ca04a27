"""The command line: ``python train.py COMMAND [--config FILE.yaml] [--key value ...] [--print_config]``.

Each command is a plain typed function in one of the packages; jsonargparse builds its parser from the signature
and docstring, so ``--help`` documents every option, ``--config`` reads YAML, dotted flags override nested
fields (``--probe.l2 0.01``), and ``--print_config`` prints the resolved config. Merge order: defaults < YAML <
command line. Commands are imported only when chosen, so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from headlab.errors import HeadlabError, Interrupted

# command name -> ("module:function", one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "cache": ("data.cache_command:cache", "cache every head's output of a Hugging Face model over a labelled dataset"),
    "probe": ("probes.command:probe", "train a linear probe for every (layer, head) of a head cache"),
    "toy": ("toymodels.command:toy", "train a toy transformer on a synthetic task and map its head functions"),
    "detect": ("roles.detect:detect", "score every head of a saved model with the function detectors"),
    "reemergence": ("toymodels.reemergence:reemergence_command",
                    "which head functions re-emerge across seeds of a toy run"),
    "stages": ("roles.stages.command:stages",
               "toy vs real: detected heads by the survey's four stages and relative depth"),
    "sweep": ("headlab.sweep:sweep", "search hyperparameters of a probe or toy run (Optuna)"),
    "demo": ("headlab.demo:demo", "the whole pipeline on built-in defaults, offline"),
}


def resolve(command: str) -> Callable:
    """The function behind a command name, or behind ``package.module:function`` (used by sweeps of user code)."""
    target = COMMANDS[command][0] if command in COMMANDS else command
    if ":" not in target:
        raise HeadlabError(f"unknown command '{command}'; choose one of: {', '.join(COMMANDS)}")
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise HeadlabError(f"command '{command}': module {module_name} cannot be imported") from error
        raise
    if not callable(getattr(module, function_name, None)):
        raise HeadlabError(f"command '{command}': {module_name} has no function {function_name}")
    return getattr(module, function_name)


def build_parser(command: str, exit_on_error: bool = True):
    from jsonargparse import ActionConfigFile, ArgumentParser

    fn = resolve(command)
    parser = ArgumentParser(
        prog=f"{os.path.basename(sys.argv[0]) or 'headlab'} {command}",
        description=COMMANDS[command][1] if command in COMMANDS else (fn.__doc__ or "").strip().split("\n")[0],
        default_config_files=[],
        exit_on_error=exit_on_error,
    )
    # A command whose own first option is `config` (sweep: the sweep file) reads that file itself.
    if "config" not in inspect.signature(fn).parameters:
        parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_function_arguments(fn, fail_untyped=True)
    return parser, fn


def parse_command(command: str, args: Sequence[str], exit_on_error: bool = True) -> tuple[Callable, dict]:
    """The command's function and its keyword arguments, parsed from ``args`` (defaults < YAML < flags)."""
    parser, fn = build_parser(command, exit_on_error=exit_on_error)
    cfg = parser.parse_args(list(args))
    check_values(cfg.as_dict())
    kwargs = parser.instantiate_classes(cfg).as_dict()
    if "config" not in inspect.signature(fn).parameters:
        kwargs.pop("config", None)
    kwargs.pop("__path__", None)
    return fn, kwargs


def check_values(tree: object, name: str = "") -> None:
    """The checks every value from outside gets, whatever its option (flags, YAML, JSON maps): numbers are finite.
    Types, choices and unknown keys are jsonargparse's (from the signatures); ranges are each config's own."""
    import math

    if isinstance(tree, dict):
        for key, value in tree.items():
            check_values(value, f"{name}.{key}" if name else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            check_values(value, f"{name}[{index}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise HeadlabError(f"--{name} {tree} is not a finite number; give a finite value")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python train.py COMMAND [--config FILE.yaml] [options] [--print_config] [--help]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input ends with one ``error:`` line on stderr and exit code 2.

    ``--debug`` (anywhere on the command line) or ``HEADLAB_DEBUG=1`` shows the full traceback instead. An
    unexpected exception (a bug, not bad input) is reported on one line with exit code 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HEADLAB_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from headlab.tracking import quiet_libraries

    quiet_libraries()
    try:
        fn, kwargs = parse_command(command, rest, exit_on_error=False)
        with signals_interrupt():
            fn(**kwargs)
    except Interrupted as stop:
        return interrupted(command, stop.signum)
    except KeyboardInterrupt:
        return interrupted(command, signal.SIGINT)
    except SystemExit as stop:  # Lightning ends a run told to stop (SIGTERM) with a SIGTERMException (exit code 0)
        if type(stop).__name__ != "SIGTERMException":
            raise  # --help and the like
        return interrupted(command, signal.SIGTERM)
    except Exception as error:
        if debug:
            raise
        code, message = describe_error(error, command)
        print(f"error: {message}", file=sys.stderr)
        return code
    return 0


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM (how SLURM and Kubernetes stop a job) and SIGINT raise
    :class:`headlab.errors.Interrupted`, which ``except Exception`` blocks let through and Lightning re-raises; the
    previous handlers come back afterwards. Only the main thread can install handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interrupted(command: str, signum: int) -> int:
    """Print what was interrupted and how to resume; the conventional exit code ``128 + signum``."""
    name = signal.Signals(signum).name
    print(f"interrupted ({name}): `{command}` stopped before it finished; completed work is on disk, run the same "
          "command again to resume", file=sys.stderr, flush=True)
    return 128 + int(signum)


def describe_error(error: BaseException, command: str) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception that ended ``command``."""
    import argparse

    text = " ".join(str(error).split())
    if isinstance(error, HeadlabError):
        return 2, text
    if isinstance(error, argparse.ArgumentError) or type(error).__module__.startswith("jsonargparse"):
        return 2, f"{text}; see python train.py {command} --help"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return 2, f"no space left on the device{where}; free some space or choose an --out on another disk"
    if isinstance(error, OSError) and error.filename is not None:
        return 2, f"cannot use {error.filename}: {error.strerror or text}; check the path and its permissions"
    return 1, (f"unexpected {type(error).__name__}: {text[:300]} (a bug in headlab: rerun with --debug for the "
               "traceback and report it)")


def run() -> None:
    sys.exit(main())
