"""Where a sweep's Optuna study lives: SQLite in the sweep folder, a database server many machines share, or a
journal file on a shared filesystem; and how a dead worker's trial is noticed.

* no ``--storage``: ``OUT/study.db`` (SQLite), for workers on one machine.
* ``--storage postgresql+psycopg://USER@HOST/DB`` (``pip install -e .[postgres]``) or ``mysql+pymysql://...``: one
  study shared by workers on many machines. Every running trial records a heartbeat in the database every
  ``HEADLAB_SWEEP_HEARTBEAT`` seconds (default 30); a worker that starts a trial fails any RUNNING trial whose
  heartbeat is older than ``HEADLAB_SWEEP_GRACE`` seconds (default 120) and queues one retry of its parameters.
  That is how a worker killed on another machine is noticed; one killed on this machine is noticed at once by its
  process id (:func:`headlab.sweep._retry_dead_trials`).
* ``--storage journal:PATH``: Optuna's journal file (an append-only log, locked by a symlink, so it works on NFS).
  It has no heartbeat: a trial whose worker died on another machine stays RUNNING (and counts towards the study's
  trials) until a sweep is re-run on that machine, which fails and retries it by its process id.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headlab.errors import HeadlabError

DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb")
FORMS = ("postgresql+psycopg://USER@HOST/DB (workers on many machines; pip install -e .[postgres]), "
         "journal:PATH (a file on a shared filesystem), or no --storage (SQLite in --out)")
HEARTBEAT = ("HEADLAB_SWEEP_HEARTBEAT", 30)  # seconds between a running trial's heartbeats
GRACE = ("HEADLAB_SWEEP_GRACE", 120)  # seconds without a heartbeat after which a RUNNING trial is failed


def retrying(make, attempts: int = 5):
    """Run ``make()``, retrying briefly: workers starting together race to create the study's tables and rows."""
    for attempt in range(attempts):
        try:
            return make()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna calls the heartbeat and the journal storage "experimental" on every use; a user cannot act on it."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds, from HEADLAB_SWEEP_HEARTBEAT / HEADLAB_SWEEP_GRACE."""
    values = []
    for name, default in (HEARTBEAT, GRACE):
        raw = os.environ.get(name, "").strip() or str(default)
        if not raw.isdigit() or int(raw) < 1:
            raise HeadlabError(f"{name}={raw!r} is not a whole number of seconds >= 1; set it to one (default "
                               f"{default}) or unset it")
        values.append(int(raw))
    interval, grace = values
    if grace <= interval:
        raise HeadlabError(f"HEADLAB_SWEEP_GRACE={grace} must exceed HEADLAB_SWEEP_HEARTBEAT={interval}, or live "
                           "trials would be failed between two heartbeats; set the grace to at least twice the "
                           "heartbeat")
    return interval, grace


class RetryStale:
    """Optuna's heartbeat callback: say that a trial's worker went silent, then queue one retry of its parameters
    (Optuna's own retry callback; a retried trial that goes silent again is not retried twice)."""

    def __init__(self, grace: int, max_retry: int = 1):
        import optuna

        storages = optuna.storages
        retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
        with quiet_experimental():
            self.retry = retry(max_retry=max_retry)
        self.grace, self.max_retry = grace, max_retry

    def __call__(self, study, trial) -> None:
        retried = len(trial.system_attrs.get("retry_history", [])) < self.max_retry
        print(f"sweep: trial {trial.number} (worker {trial.user_attrs.get('worker', '?')}) sent no heartbeat for "
              f"{self.grace} s; failed it" + ("; retrying its parameters" if retried else
                                              f"; not retried again (retried {self.max_retry} time(s) already)"),
              flush=True)
        with quiet_experimental():
            self.retry(study, trial)


def open_storage(url: str | None, out: Path):
    """The Optuna storage for ``--storage`` (see the module's docstring); bad values are one-line errors."""
    url = (url or "").strip() or f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith("journal:"):
        return _journal(url)
    dialect = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else None
    if dialect not in DIALECTS:
        hint = "; SQLAlchemy spells it postgresql://" if dialect == "postgres" else ""
        raise HeadlabError(f"--storage {shown(url)!r} is not a storage headlab knows{hint}; pass {FORMS}")
    return _database(url)


def _journal(url: str):
    import optuna

    path = url[len("journal:"):].strip()
    if not path:
        raise HeadlabError(f"--storage {url!r} names no file; pass journal:PATH with a file on a filesystem every "
                           "worker mounts, e.g. journal:/shared/sweeps/study.log")
    file = Path(path).expanduser().resolve()
    if not file.parent.is_dir():
        raise HeadlabError(f"--storage {url!r}: the folder {file.parent} does not exist; create it (on a filesystem "
                           "every worker mounts) or fix the path")
    if file.is_dir():
        raise HeadlabError(f"--storage {url!r} is a folder; name a file in it, e.g. journal:{file / 'study.log'}")
    try:  # Optuna >= 4.0; JournalFileStorage before
        from optuna.storages.journal import JournalFileBackend as backend
    except ImportError:
        backend = optuna.storages.JournalFileStorage
    with quiet_experimental():
        return optuna.storages.JournalStorage(backend(str(file)))


def _database(url: str):
    import optuna

    interval, grace = heartbeat_settings()
    storages = optuna.storages
    # the keyword is heartbeat_stale_trial_callback since Optuna 4.9 and failed_trial_callback before
    accepted = inspect.signature(storages.RDBStorage.__init__).parameters
    keyword = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in accepted
               else "failed_trial_callback")
    kwargs: dict[str, Any] = {"heartbeat_interval": interval, "grace_period": grace, keyword: RetryStale(grace)}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    attempts = 5 if url.startswith("sqlite") else 2
    try:
        with quiet_experimental():
            return retrying(lambda: storages.RDBStorage(url, **kwargs), attempts)
    except Exception as error:
        fix = "check the URL, the server and its driver"
        if isinstance(error, ImportError) and url.startswith("postgresql"):
            fix = ("install the PostgreSQL driver with `pip install -e .[postgres]` (psycopg 3) and use a "
                   "postgresql+psycopg:// URL")
        raise HeadlabError(
            f"cannot open sweep storage {url.split('@')[-1]!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160] if str(error) else ''}); {fix}"
        ) from error
