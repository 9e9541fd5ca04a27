"""Sweeps whose workers share one study: on a real PostgreSQL server (started by the ``postgres_url`` fixture of
tests/postgres.py) and on Optuna's journal file. Workers are separate ``python train.py sweep`` processes; a worker
"on another machine" runs under its own hostname (``unshare --uts``), so that only the heartbeat, not the process-id
check of this machine, can tell that it died. Every wait polls for a state (a file, a trial's state) with a
deadline; the heartbeat is shortened to 1 s with a 3 s grace."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from headlab.cli import main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
GRACE = 3
ENV = {**os.environ, "WANDB_MODE": "disabled", "HEADLAB_SWEEP_HEARTBEAT": "1", "HEADLAB_SWEEP_GRACE": str(GRACE),
       "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
COMPLETE, RUNNING, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.FAIL)


def sweep_file(path: Path, xs: list[float], ys: list[int], hold: Path | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "command": "sweep_target:quadratic", "base": {"hold": str(hold)} if hold else {},
        "space": {"x": xs, "y": ys}, "objective": {"metric": "score", "direction": "maximize"},
        "sampler": "grid", "trials": len(xs) * len(ys), "seed": 0}))
    return path


@pytest.fixture
def start() -> Iterator[Callable[..., subprocess.Popen]]:
    """``start(config, out, storage, host=None)``: a sweep worker; with ``host``, under that hostname (a UTS
    namespace), as if on another machine. Workers still running when the test ends are killed."""
    workers: list[subprocess.Popen] = []
    namespaces = ["--uts"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--uts"]

    def start_worker(config: Path, out: Path, storage: str, host: str | None = None) -> subprocess.Popen:
        command = [sys.executable, str(REPO / "train.py"), "sweep", "--config", str(config), "--out", str(out),
                   "--storage", storage, "--study_name", "shared"]
        if host is not None:  # unshare execs the shell, which execs Python: the process keeps its id
            can = subprocess.run(["unshare", *namespaces, "true"], capture_output=True, text=True, check=False)
            if can.returncode != 0:
                pytest.fail(f"cannot run a worker under another hostname with `unshare {' '.join(namespaces)}` "
                            f"({can.stderr.strip()}): run as root (CAP_SYS_ADMIN) or allow user namespaces",
                            pytrace=False)
            command = ["unshare", *namespaces, "sh", "-c", 'hostname "$0" && exec "$@"', host, *command]
        workers.append(subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
        return workers[-1]

    yield start_worker
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
        worker.communicate(timeout=60)


def finish(worker: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, err = worker.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        out, err = worker.communicate(timeout=60)
        pytest.fail(f"a worker ran for more than {timeout} s:\n{out}\n{err}")
    assert worker.returncode == 0, f"worker exited {worker.returncode}:\n{out}\n{err}"
    return out + err


def wait_for(condition: Callable[[], bool], what: str, workers: tuple = (), timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for worker in workers:
            assert worker.poll() is None, f"a worker ended while waiting for {what}: {worker.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@functools.cache
def opened(storage: str):
    """One storage object per URL for the test's many reads (not one database engine per poll)."""
    from headlab.sweep_storage import open_storage

    return open_storage(storage, Path("."))


def study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="shared", storage=opened(storage))


def trial(storage: str, number: int):
    found = [t for t in study(storage).get_trials(deepcopy=False) if t.number == number]
    return found[0] if found else None


def wait_until_stale(storage: str, number: int, workers: tuple = ()) -> None:
    """Until trial ``number`` has sent no heartbeat for the grace period, as the workers judge it."""
    from headlab.sweep_storage import quiet_experimental

    with quiet_experimental():
        rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=GRACE)
    try:
        study_id = rdb.get_study_id_from_name("shared")
        trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, number)
        wait_for(lambda: trial_id in rdb._get_stale_trial_ids(study_id), f"trial {number}'s heartbeat to go stale",
                 workers)
    finally:
        rdb.remove_session()
        rdb.engine.dispose()


def assert_whole_grid_once(storage: str, xs: list[float], ys: list[int], outs: list[Path]) -> list:
    """Exactly one COMPLETE trial per grid point; any other trial failed without running (a surplus trial) or is
    named by the caller; one run directory with results per grid point across the workers' folders."""
    trials = study(storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == COMPLETE]
    points = sorted((t.params["x"], t.params["y"]) for t in complete)
    assert points == sorted((x, y) for x in xs for y in ys), [(t.number, t.state.name, t.params) for t in trials]
    results = [path for out in outs for path in (out / "trials").glob("*/metrics.json")]
    assert len(results) == len(points), results
    return trials


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgres", "journal"])
def test_two_workers_run_every_grid_point_exactly_once(request, tmp_path, kind, start):
    storage = (request.getfixturevalue("postgres_url") if kind == "postgres"
               else f"journal:{tmp_path / 'study.log'}")
    xs, ys = [0.0, 0.1, 0.2, 0.3], [1, 2]
    config = sweep_file(tmp_path / "grid.yaml", xs, ys)
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]  # each worker as on its own machine
    workers = [start(config, out, storage) for out in outs]
    for worker in workers:
        finish(worker)
    trials = assert_whole_grid_once(storage, xs, ys, outs)
    for t in trials:
        if t.state != COMPLETE:  # two workers finishing together may each start an 9th trial: never run
            assert t.state == FAIL and t.user_attrs["error"].startswith("not run: the study already had its 8")


@pytest.mark.slow
def test_a_worker_killed_on_another_machine_is_retried_through_its_heartbeat(tmp_path, postgres_url, start):
    xs = [0.0, 0.3]
    hold = tmp_path / "hold-{x}"
    for x in xs:
        Path(str(hold).replace("{x}", str(x))).write_text("trials at this x wait while this file exists")
    config = sweep_file(tmp_path / "grid.yaml", xs, [2], hold)
    killed = start(config, tmp_path / "machine-k", postgres_url, host="other-host")
    wait_for(lambda: (tmp_path / "machine-k" / "trials" / "0000").is_dir(), "trial 0 to start", (killed,))
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    dead = trial(postgres_url, 0)
    assert dead.state == RUNNING and dead.user_attrs["worker"] == f"other-host:{killed.pid}"
    for x in xs:
        Path(str(hold).replace("{x}", str(x))).unlink()
    # its pid is gone from this machine, but the worker ran on "other-host": only the heartbeat can tell
    wait_until_stale(postgres_url, 0)
    output = finish(start(config, tmp_path / "machine-b", postgres_url))
    assert f"trial 0 (worker other-host:{killed.pid}) sent no heartbeat for {GRACE} s" in output
    trials = assert_whole_grid_once(postgres_url, xs, [2], [tmp_path / "machine-k", tmp_path / "machine-b"])
    failed = [t for t in trials if t.state == FAIL]
    assert [t.number for t in failed] == [0] and "error" not in failed[0].user_attrs  # not the pid check's doing
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state == COMPLETE and retried[0].params == dead.params


@pytest.mark.slow
def test_a_new_worker_never_fails_a_live_workers_running_trial(tmp_path, postgres_url, start):
    xs = [0.0, 0.3, 0.6]
    hold = tmp_path / "hold-{x}"
    held = {x: Path(str(hold).replace("{x}", str(x))) for x in xs}
    for path in held.values():
        path.write_text("trials at this x wait while this file exists")
    config = sweep_file(tmp_path / "grid.yaml", xs, [2], hold)
    outs = {name: tmp_path / f"machine-{name}" for name in ("a", "k", "b")}
    live = start(config, outs["a"], postgres_url, host="host-a")
    wait_for(lambda: (outs["a"] / "trials" / "0000").is_dir(), "worker A's trial 0 to start", (live,))
    killed = start(config, outs["k"], postgres_url, host="host-k")  # a control: a worker that does die
    wait_for(lambda: (outs["k"] / "trials" / "0001").is_dir(), "worker K's trial 1 to start", (live, killed))
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    kept = trial(postgres_url, 0).params["x"]
    for x, path in held.items():
        if x != kept:
            path.unlink()
    # A's trial started before K's: had A's heartbeat stopped too, its trial would be stale by now as well
    wait_until_stale(postgres_url, 1, (live,))
    newcomer = start(config, outs["b"], postgres_url, host="host-b")
    wait_for(lambda: newcomer.poll() is not None or trial(postgres_url, 0).state != RUNNING, "worker B to end")
    assert trial(postgres_url, 0).state == RUNNING, "worker B failed the live worker A's trial"
    output = finish(newcomer)
    assert f"trial 1 (worker host-k:{killed.pid}) sent no heartbeat" in output and "trial 0 (worker" not in output
    assert trial(postgres_url, 0).state == RUNNING and live.poll() is None
    held[kept].unlink()  # A finishes its trial
    finish(live)
    trials = assert_whole_grid_once(postgres_url, xs, [2], list(outs.values()))
    assert trial(postgres_url, 0).state == COMPLETE and trial(postgres_url, 0).user_attrs["worker"].startswith(
        "host-a:")
    assert [t.number for t in trials if t.state == FAIL] == [1]


@pytest.mark.parametrize(("storage", "message"), [
    ("journal:", "--storage 'journal:' names no file; pass journal:PATH"),
    ("journal:  ", "names no file"),
    ("journal:{tmp}/no/such/study.log", "the folder {tmp}/no/such does not exist; create it"),
    ("journal:{tmp}", "is a folder; name a file in it"),
    ("redis://db:6379", "--storage 'redis://db:6379' is not a storage headlab knows; pass postgresql+psycopg://"),
    ("postgres://u:secret@db/x", "'postgres://u:***@db/x' is not a storage headlab knows; SQLAlchemy spells it "
                                 "postgresql://"),
    ("runs/study.db", "--storage 'runs/study.db' is not a storage headlab knows"),
], ids=["journal-empty", "journal-blank", "journal-no-folder", "journal-folder", "unknown-scheme", "postgres-alias",
        "plain-path"])
def test_bad_storage_values_are_one_line_errors(tmp_path, capsys, storage, message):
    config = sweep_file(tmp_path / "grid.yaml", [0.0], [2])
    storage, message = storage.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out"), "--storage", storage]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "secret" not in err[-1]
    assert not (tmp_path / "out" / "trials").exists()


@pytest.mark.parametrize(("variables", "message"), [
    ({"HEADLAB_SWEEP_HEARTBEAT": "0"}, "HEADLAB_SWEEP_HEARTBEAT='0' is not a whole number of seconds >= 1"),
    ({"HEADLAB_SWEEP_GRACE": "soon"}, "HEADLAB_SWEEP_GRACE='soon' is not a whole number"),
    ({"HEADLAB_SWEEP_HEARTBEAT": "10", "HEADLAB_SWEEP_GRACE": "10"}, "HEADLAB_SWEEP_GRACE=10 must exceed"),
], ids=["zero-heartbeat", "word-grace", "grace-not-above-heartbeat"])
def test_bad_heartbeat_settings_are_one_line_errors(tmp_path, capsys, monkeypatch, variables, message):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    config = sweep_file(tmp_path / "grid.yaml", [0.0], [2])
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


def test_a_journal_study_is_resumable_and_has_no_heartbeat(tmp_path):
    from headlab.sweep_storage import open_storage

    storage = f"journal:{tmp_path / 'study.log'}"
    config = sweep_file(tmp_path / "grid.yaml", [0.0, 0.3], [2])
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out"), "--storage", storage,
                 "--study_name", "shared", "--trials", "1"]) == 0
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out"), "--storage", storage,
                 "--study_name", "shared"]) == 0
    assert sorted(t.params["x"] for t in study(storage).get_trials(states=(COMPLETE,))) == [0.0, 0.3]
    assert not hasattr(open_storage(storage, tmp_path), "record_heartbeat")  # so fail_stale_trials does nothing
    assert not (tmp_path / "out" / "study.db").exists()
