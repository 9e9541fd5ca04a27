"""Hostile inputs (issue 21's battery): each case as a table row with its expected exit code, and the check that
nothing outside the run's own files changed. A case that must fail may neither exit 0 or 1 nor touch a user file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"

import numpy as np
import pytest

from data import write_cache
from headlab.cli import main

PROBE = ["--logger", "none", "--control.permutations", "0", "--control.bootstrap", "0"]


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (except under ``skip``, the run's own new folder) with its size and mtime."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and (skip is None or skip not in path.parents):
            stat = path.stat()
            out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], list[str]]  # (tmp, cache) -> the command line; may plant user files
    code: int
    message: str
    own: str | None = None  # a folder the run may create (its own files), relative to tmp


def _drafts(tmp: Path, cache: Path) -> list[str]:
    (tmp / "results").mkdir()
    (tmp / "results" / "heads.csv").write_text("my draft, not a headlab file\n")
    (tmp / "results" / "summary.json").write_text('{"mine": true}\n')
    return ["probe", "--cache", str(cache), "--out", str(tmp / "results"), *PROBE]


def _look_alike_temp(tmp: Path, cache: Path) -> list[str]:
    (tmp / "results").mkdir()
    (tmp / "results" / ".notes.txt.abcdefgh.tmp").write_text("someone's file named like a temporary one\n")
    return ["probe", "--cache", str(cache), "--out", str(tmp / "results"), *PROBE]


def _foreign_reemergence(tmp: Path, cache: Path) -> list[str]:
    for name in ("single", "other"):
        (tmp / name).mkdir()
        (tmp / name / "roles.csv").write_text("layer,head,role\n")
    (tmp / "single" / ".headlab-run.json").write_text(json.dumps({"command": "toy"}))
    return ["reemergence", "--runs", f"[{tmp / 'other'}]", "--out", str(tmp / "single")]


CASES = [
    Case("--out names a folder of the user's drafts", _drafts, 2, "holds files headlab did not write"),
    Case("--out names a folder holding a look-alike temporary file", _look_alike_temp, 2,
         "holds files headlab did not write"),
    Case('--out ""', lambda tmp, cache: ["probe", "--cache", str(cache), "--out", "", *PROBE], 2,
         "names the current folder"),
    Case("--out .", lambda tmp, cache: ["probe", "--cache", str(cache), "--out", ".", *PROBE], 2,
         "names the current folder"),
    Case("--out names the current folder by its path",
         lambda tmp, cache: ["probe", "--cache", str(cache), "--out", str(tmp), *PROBE], 2, "names the current folder"),
    Case("reemergence --out another toy run", _foreign_reemergence, 2, "is a toy run whose report"),
    Case("a new --out is the run's own", lambda tmp, cache: ["probe", "--cache", str(cache), "--out",
                                                           str(tmp / "fresh"), *PROBE], 0, "", own="fresh"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2, 2, 4)).astype(np.float16)
    return write_cache(tmp_path_factory.mktemp("cache") / "c", x, {"label": np.arange(60) % 2}).path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_inputs(case, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = case.setup(tmp_path, cache)
    before = _snapshot(tmp_path)
    assert main(args) == case.code
    err = capsys.readouterr().err.strip()
    if case.code:
        assert err.startswith("error: ") and case.message in err and len(err.splitlines()) == 1, err
    own = tmp_path / case.own if case.own else None
    assert _snapshot(tmp_path, skip=own) == before  # no file outside the run's own folder changed or appeared


def test_stale_temporary_files_are_removed_only_at_the_top_of_the_runs_own_folders(cache, tmp_path):
    out = tmp_path / "run"
    assert main(["probe", "--cache", str(cache), "--out", str(out), *PROBE]) == 0
    (out / ".heads.csv.abcdefgh.tmp").write_text("left by a killed run")
    (out / "notes").mkdir()
    (out / "notes" / ".mine.txt.abcdefgh.tmp").write_text("a user's file in a subfolder")
    assert main(["probe", "--cache", str(cache), "--out", str(out), *PROBE]) == 0
    assert not (out / ".heads.csv.abcdefgh.tmp").exists()
    assert (out / "notes" / ".mine.txt.abcdefgh.tmp").read_text() == "a user's file in a subfolder"


def test_files_get_the_mode_the_umask_gives(tmp_path):
    from headlab.runs import atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_a_full_disk_is_a_clean_error_naming_the_path(cache, tmp_path, monkeypatch, capsys):
    import errno

    import probes.command

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "heads.csv"))

    monkeypatch.setattr(probes.command, "write_heads", full)
    assert main(["probe", "--cache", str(cache), "--out", str(tmp_path / "run"), *PROBE]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device writing" in err and "heads.csv" in err and "bug" not in err


def test_a_crashed_run_leaves_no_marker_lock_or_config_in_the_folder_it_created(cache, tmp_path, monkeypatch):
    import probes.command

    def crash(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(probes.command, "evaluate", crash)
    assert main(["probe", "--cache", str(cache), "--out", str(tmp_path / "run"), *PROBE]) == 1
    assert not (tmp_path / "run").exists()


def test_a_rerun_that_stops_half_way_leaves_no_summary_vouching_for_its_files(cache, tmp_path, monkeypatch):
    """summary.json is the commit mark of a probe run: written last, and removed before a rerun replaces the
    files, so heads.csv from a run that stopped half-way is never read as finished."""
    import errno

    import probes.command

    out = tmp_path / "run"
    assert main(["probe", "--cache", str(cache), "--out", str(out), *PROBE]) == 0
    assert (out / "summary.json").exists()

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "heatmap.png"))

    monkeypatch.setattr(probes.command, "plot_heatmap", full)
    assert main(["probe", "--cache", str(cache), "--out", str(out), *PROBE]) == 2
    assert (out / "heads.csv").exists() and not (out / "summary.json").exists()
