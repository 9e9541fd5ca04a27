"""A real PostgreSQL server for tests: ``postgres_server`` (one per session, started only when a test asks for it)
and ``postgres_url`` (a fresh database on it per test, as a SQLAlchemy URL for psycopg 3).

The server runs from Debian's binaries (``/usr/lib/postgresql/*/bin``, or ``initdb`` on PATH) in a temporary folder:
listening on 127.0.0.1 only, on a free port, its socket in that folder, trust authentication. initdb refuses to run
as root, so under root the server runs as the unprivileged user ``nobody``. Teardown stops it (``pg_ctl stop -m
immediate``) and removes the folder, also when the test failed. Without the binaries a test that needs the server
fails (CI installs them): it never silently skips.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL = "install the PostgreSQL server: `apt-get install postgresql` (Debian/Ubuntu; .ci/run does it)"
SERVER_USER = "nobody"  # initdb and postgres refuse to run as root
_databases = itertools.count()


def postgres_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl (the newest Debian version first), or None."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    binaries: Path
    folder: Path
    port: int
    user: str = "headlab"  # the database superuser initdb creates (any OS user may connect as it: trust)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        """Run one of the server's tools as the server's OS user; its output becomes the failure message."""
        done = subprocess.run([str(self.binaries / tool), *args], capture_output=True, text=True, timeout=120,
                              check=False, cwd=self.folder, env=_server_env(), **_as_server_user())
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def create_database(self, name: str) -> str:
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"


def _server_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.fail(f"no user {SERVER_USER!r} to run PostgreSQL as (initdb refuses root): create one with "
                    f"`useradd --system {SERVER_USER}`", pytrace=False)


def _as_server_user() -> dict:
    if os.geteuid() != 0:
        return {}
    entry = _server_user()
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a server in a new temporary folder; stop it and remove the folder on exit, however the body ended."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.fail(f"no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH: "
                    f"{INSTALL}", pytrace=False)
    owner = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="headlab-pg-"))  # in /tmp, which the server's user can reach
    if owner:
        os.chown(folder, owner["user"], owner["group"])
    server = PostgresServer(binaries, folder, port=0)
    started = False
    try:
        server.run("initdb", "-D", str(server.data), "-U", server.user, "-A", "trust", "--no-locale", "-E", "UTF8",
                   "--no-sync")
        for attempt in range(5):  # another process may take the free port between the probe and the start
            server.port = _free_port()
            settings = {"port": server.port, "listen_addresses": "'127.0.0.1'",
                        "unix_socket_directories": f"'{folder}'", "fsync": "off", "synchronous_commit": "off",
                        "full_page_writes": "off", "max_connections": 100}
            with (server.data / "postgresql.auto.conf").open("a") as conf:
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
            started = True  # from here on, stop whatever may have started, whatever happens
            try:
                server.run("pg_ctl", "start", "-w", "-t", "60", "-D", str(server.data), "-l", str(folder / "log"))
            except RuntimeError:
                if attempt == 4:
                    raise
                continue
            break
        yield server
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                server.run("pg_ctl", "stop", "-m", "immediate", "-D", str(server.data))
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database on the session's server: ``postgresql+psycopg://headlab@127.0.0.1:PORT/testN``."""
    return postgres_server.create_database(f"test{next(_databases)}")
