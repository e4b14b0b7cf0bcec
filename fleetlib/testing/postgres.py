"""A private PostgreSQL cluster for one test: a test that stops, kills or restarts
PostgreSQL does it to a cluster of its own, never to the server other tests share.

`PrivateCluster()` runs initdb into a fresh folder under the system's temporary
folder (readable by the `postgres` user, which tmp_path under /root is not), and
`start()` serves it on a free loopback port with a database and a user of its own
(`url`); `stop()`, `kill()` and `start()` again keep the same port and data, so the
services using it see the same server go away and come back. PostgreSQL refuses to
run as root: run as root, the cluster runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy.engine import URL

from fleetlib.errors import FleetError
from fleetlib.testing.daemons import free_port

BINARIES = "/usr/lib/postgresql/*/bin"
DATABASE = USER = "fleet"
SUPERUSER = "postgres"
START_TIMEOUT = 60
# A throwaway cluster: no durability, few resources, quick checkpoints on stop.
SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off",
            "shared_buffers=16MB", "max_connections=200", "listen_addresses=127.0.0.1")


class PostgresUnavailable(FleetError):
    """No PostgreSQL server binaries on this machine (tests skip, saying so)."""


def binaries() -> Path:
    """The bin folder of the newest PostgreSQL installed; PostgresUnavailable if none."""
    found = [Path(folder) for folder in glob.glob(BINARIES)
             if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists()]
    if not found:
        raise PostgresUnavailable(f"no PostgreSQL server binaries (initdb, pg_ctl) under "
                                  f"{BINARIES}: install the postgresql package")
    return max(found, key=lambda folder: _version(folder.parent.name))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


class PrivateCluster:
    """A PostgreSQL cluster of one test (not started: see `start`); a context manager
    that removes everything on exit."""

    def __init__(self) -> None:
        self.bin = binaries()
        self.user = SUPERUSER if os.geteuid() == 0 else None  # who the server runs as
        if self.user is not None:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise PostgresUnavailable(f"running as root needs the {self.user!r} user to "
                                          "run PostgreSQL as") from None
        self.folder = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        self.data = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        self.port = free_port()
        self.password = secrets.token_hex(12)  # a test can check no log shows it
        password_file = self.folder / "password"
        password_file.write_text(f"{self.password}\n")
        if self.user is not None:
            shutil.chown(self.folder, self.user)
            shutil.chown(password_file, self.user)
        self._initialized = False

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the cluster's own database, as its own user."""
        return self._url(USER, DATABASE)

    def _url(self, user: str, database: str) -> str:
        return URL.create("postgresql+psycopg", username=user, password=self.password,
                          host="127.0.0.1", port=self.port, database=database
                          ).render_as_string(hide_password=False)

    def _run(self, program: str, *args: str, timeout: float = START_TIMEOUT) -> None:
        """Run one of the server's programs as the server's user; FleetError with its
        output if it fails."""
        result = subprocess.run([str(self.bin / program), *args], capture_output=True,
                                text=True, timeout=timeout, user=self.user, cwd=self.folder)
        if result.returncode != 0:
            raise FleetError(f"{program} {' '.join(args)} failed ({result.returncode}): "
                             f"{result.stdout}{result.stderr}{self.log()}")

    def start(self) -> PrivateCluster:
        """Start the server (initdb and the database on the first start), on the same
        port and data every time; returns once it accepts connections."""
        if not self._initialized:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth-local=peer",
                      "--auth-host=scram-sha-256", f"--pwfile={self.folder / 'password'}",
                      "-E", "UTF8", "--no-sync")
        options = " ".join([f"-p {self.port}", f"-c unix_socket_directories={self.folder}",
                            *(f"-c {setting}" for setting in SETTINGS)])
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_path), "-w",
                  "-t", str(START_TIMEOUT), "-o", options)
        if not self._initialized:
            self._create_database()
            self._initialized = True
        return self

    def _create_database(self) -> None:
        engine = sa.create_engine(self._url(SUPERUSER, "postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'")
                connection.exec_driver_sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        finally:
            engine.dispose()

    def running(self) -> bool:
        """Whether the server's postmaster runs."""
        pid = self._postmaster()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _postmaster(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the server the way an operator does (fast: sessions are ended, clients
        then find nothing listening)."""
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: the server crashes (the next
        start recovers)."""
        pid = self._postmaster()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        for process in [pid, *map(int, children.stdout.split())]:
            try:
                os.kill(process, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)

    def log(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Stop the server (killing it if it does not stop) and remove its folder."""
        try:
            self.stop()
        except (FleetError, subprocess.TimeoutExpired):
            self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivateCluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.cleanup()
