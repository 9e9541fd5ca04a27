"""Run directories: atomic file writes, the resolved config, and where W&B writes.

Every command writes a run directory holding its resolved config (``config.yaml``, loadable again with
``--config``), its metrics and plots. Writes go to a temporary name in the same directory and are then renamed,
so a killed run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
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
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, payload: bytes | memoryview) -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(payload))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_plain(obj), indent=2, sort_keys=False) + "\n")


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
