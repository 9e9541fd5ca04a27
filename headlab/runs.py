"""Run directories: atomic file writes, the resolved config, and where W&B writes.

Every command writes a run directory holding its resolved config (``config.yaml``, loadable again with
``--config``), its metrics and plots. Writes go to a temporary name in the same directory and are then renamed,
so a killed run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from headlab.errors import HeadlabError

CONFIG_NAME = "config.yaml"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a temp file in ``path``'s directory, fsync it, then rename it to ``path``.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    """The process's umask (read once: reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, payload: bytes | memoryview) -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(payload))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_plain(obj), indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not valid JSON or holds no object is a one-line error ending in
    ``fix`` (what the user should do, e.g. "rerun the toy run that wrote it")."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HeadlabError(f"{path} is not valid JSON ({error}); {fix}") from error
    if not isinstance(obj, dict):
        raise HeadlabError(f"{path} holds no JSON object; {fix}")
    return obj


def to_plain(obj: Any) -> Any:
    """Convert dataclasses, paths, enums, tuples and numpy scalars into YAML/JSON-safe builtins."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (see :func:`atomic_write`) and close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)


def save_config(run_dir: str | Path, config: Mapping[str, Any], name: str = CONFIG_NAME) -> Path:
    """Write the resolved config of a command into its run directory, in a form ``--config`` accepts again."""
    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump(to_plain(dict(config)), sort_keys=False))
    return path


def load_config(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def wandb_mode() -> str:
    """``online`` when a W&B account is configured (API key in the environment or ~/.netrc), else ``offline``.

    ``WANDB_MODE`` set by the user always wins.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def seed_number(path: Path) -> int | None:
    """``S`` for a directory named ``seed-S`` (what ``toy --seeds N`` writes), else None."""
    name = Path(path).name
    return int(name[5:]) if name.startswith("seed-") and name[5:].isdigit() else None


def find_runs(paths: Sequence[str | Path], marker: str, what: str) -> list[Path]:
    """Run directories from ``paths``: glob patterns are expanded; a directory holding ``marker`` is a run; a
    directory without it contributes its ``seed-*`` subdirectories that hold it, in seed order. ``what`` names the
    command that writes such runs, for the error messages."""
    import glob

    runs: list[Path] = []
    for raw in paths:
        text = str(raw)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches:
            raise HeadlabError(f"run pattern {text} matches nothing; pass directories written by `{what}`")
        for match in matches:
            path = Path(match)
            if not path.is_dir():
                raise HeadlabError(f"run directory {path} does not exist; pass a directory written by `{what}` "
                                   "(or its parent with seed-* runs)")
            if (path / marker).exists():
                runs.append(path)
                continue
            seeds = [p for p in path.glob("seed-*") if (p / marker).exists() and seed_number(p) is not None]
            if not seeds:
                raise HeadlabError(f"{path} has no {marker} and no seed-*/{marker}; pass a finished run directory "
                                   f"written by `{what}`")
            runs.extend(sorted(seeds, key=seed_number))
    return runs


RUN_MARKER = ".headlab-run.json"
LOCK_NAME = ".headlab.lock"
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # the names atomic_write gives its temporary files


@contextlib.contextmanager
def run_directory(out: str | Path, command: str, *, accepts: Sequence[str] = (),
                  exclusive: bool = True, layout: Sequence[str] = ()) -> Iterator[Path]:
    """Claim ``out`` for one run of ``command`` for the duration of the block.

    - The path is checked first: one that is a file, lies under a file, or cannot be written is a one-line error,
      before anything is written.
    - A directory holding the run of another command (its ``RUN_MARKER``, or a ``config.yaml`` without one) is
      refused, unless that command is in ``accepts``: a run never overwrites another run's files.
    - With ``exclusive`` (every command but a sweep, whose workers share one folder by design) the directory is
      locked (``flock`` on ``.headlab.lock``) until the block ends; a second run into it fails at once. Sweep
      workers hold the lock shared. The lock dies with its process, so a killed run never leaves a stale lock.
    - ``--out ""``, ``--out .`` (the current folder) and a folder holding files but no headlab run are refused:
      a run never mixes its files with a user's.
    - Whoever holds the folder alone removes the temporary files a killed run left behind: at the top level of
      ``out`` and of the run's own ``layout`` subfolders (e.g. a cache's ``shards``), nowhere else.
    - A directory this call created is removed again when the block ends in an error before any output was
      written (bad input found after the claim, or a crash): no marker, lock or config is left behind; results
      written so far, and an interrupted run's work, are kept.
    """
    out = Path(out)
    _check_not_here(out)
    _check_writable(out)
    marker = out / RUN_MARKER
    owner = run_owner(out)
    if owner is not None and owner != command and owner not in accepts:
        raise HeadlabError(
            f"--out {out} holds a `{owner}` run; a `{command}` run would overwrite its files: choose another --out"
        )
    if owner is None and out.is_dir() and any(out.iterdir()):
        raise HeadlabError(f"--out {out} holds files headlab did not write; a `{command}` run would mix its own "
                           "files with them: choose a new or empty folder")
    created = not out.exists()
    if created:
        _create_marked(out, command)
    handle = None
    try:
        handle = _lock(out, exclusive, layout)
        if owner is None and not created:  # an empty folder the user made; a new one has its marker already
            atomic_write_json(marker, {"command": command})
        yield out
    except Exception:  # an interrupted run (Interrupted, KeyboardInterrupt) keeps its folder to resume from
        bookkeeping = {RUN_MARKER, LOCK_NAME, CONFIG_NAME}
        if created and all(p.name in bookkeeping for p in out.iterdir()):  # failed before any output
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if handle is not None:
            handle.close()


def _create_marked(out: Path, command: str) -> None:
    """Create ``out`` with its run marker already inside (built under a temporary name, then renamed), so a run
    killed at any moment never leaves a folder of its own that looks like someone else's."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".claim", dir=out.parent))
    try:
        atomic_write_json(tmp / RUN_MARKER, {"command": command})
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.is_dir():  # another process created it meanwhile: go on with its folder
            raise


def _check_not_here(out: Path) -> None:
    """``--out ""``, ``--out .`` or any path naming the current folder would scatter a run's files among the user's."""
    if str(out) in ("", ".") or out.resolve() == Path.cwd().resolve():
        raise HeadlabError(f"--out {str(out)!r} names the current folder; a run writes many files: pass a folder of "
                           "its own, e.g. --out runs/NAME")


def _check_writable(out: Path) -> None:
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"lies under the file {parent}"
                raise HeadlabError(f"--out {out} {what}; pass a directory path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise HeadlabError(f"--out {out}: {parent} is not writable; choose a folder you can write to")
            return


def run_owner(out: Path) -> str | None:
    """The command whose run ``out`` holds: from its marker, or ``unknown`` for a config.yaml without one."""
    marker = out / RUN_MARKER
    if marker.exists():
        try:
            return str(json.loads(marker.read_text())["command"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            return "unknown"
    if (out / CONFIG_NAME).exists():
        return "unknown"
    return None


def _lock(out: Path, exclusive: bool, layout: Sequence[str] = ()):
    """Hold ``out``'s lock file for the run: exclusively, or shared with the other workers of a sweep. Whoever
    finds itself alone (an exclusive lock is free) removes the temporary files a killed run left."""
    import fcntl

    handle = open(out / LOCK_NAME, "a")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        if exclusive:
            handle.close()
            raise HeadlabError(
                f"another headlab run is writing to {out}; wait for it to finish or choose another --out"
            ) from error
        fcntl.flock(handle, fcntl.LOCK_SH)  # other sweep workers are running: share, and leave their files alone
        return handle
    for folder in (out, *(out / name for name in layout)):
        if folder.is_dir():
            _remove_stale_temp_files(folder)
    if not exclusive:
        fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def _remove_stale_temp_files(out: Path) -> None:
    """Temporary files of :func:`atomic_write` that a killed run left directly in ``out`` (we hold the lock, so
    none is in use). Its subfolders are left alone: they may be nested runs or hold anyone's files."""
    for path in out.iterdir():
        if path.is_file() and _TEMP_FILE.match(path.name):
            path.unlink(missing_ok=True)
