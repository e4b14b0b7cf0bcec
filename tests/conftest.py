"""Shared fixtures: a certificate authority, real image server and subd daemons, a
whole fleet and a fresh PostgreSQL database (with FLEET_TEST_POSTGRES_URL)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, free_port, imageserver_daemon
from fleetlib.testing.fleet import FleetUnderTest

POSTGRES_URL = os.environ.get("FLEET_TEST_POSTGRES_URL", "")


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with the standard identities (admin, imageserver, subd, dominator)."""
    directory = tmp_path_factory.mktemp("ca")
    init_ca(directory)
    return directory


@pytest.fixture(scope="session")
def admin(ca: Path) -> Security:
    """The admin identity, permitted every method."""
    return Security.from_options(str(ca / "admin"), insecure=False)


@pytest.fixture
def imageserver(tmp_path: Path, ca: Path) -> Iterator[Daemon]:
    """A real image server over mutual TLS on a loopback port."""
    state = tmp_path / "imageserver-state"
    daemon = imageserver_daemon(state, ca, tmp_path / "imageserver.log")
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def cli_env(ca: Path, imageserver: Daemon) -> dict[str, str]:
    """Environment pointing the CLI at the test image server as admin."""
    return {"DOMINATOR_TLS_DIR": str(ca / "admin"), "DOMINATOR_IMAGESERVER": imageserver.address}


@pytest.fixture
def trigger_log(tmp_path: Path) -> Path:
    """Where the recording trigger command writes `ACTION SERVICE` lines."""
    return tmp_path / "triggers.log"


@pytest.fixture
def start_subd(tmp_path: Path, ca: Path, trigger_log: Path) -> Iterator:
    """Start real subd daemons on folders: `start_subd(root, *extra_args)`."""
    recorder = tmp_path / "record-trigger"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {trigger_log}\n')
    recorder.chmod(0o755)
    started: list[Daemon] = []

    def start(root: Path, *extra: str, port: int | None = None, user: int | None = None
              ) -> Daemon:
        daemon = Daemon("subd.main",
                        ["--root", str(root), "--tls-dir", str(ca / "subd"),
                         "--trigger-command", f"{recorder} {{action}} {{service}}",
                         "--scan-speed-percent", "0", "--background-cpu-percent", "50", *extra],
                        "subd", port or free_port(),
                        Security.from_options(str(ca / "admin"), insecure=False),
                        tmp_path / f"subd-{len(started)}.log", state_dir=root / ".subd",
                        user=user)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def fleet(tmp_path: Path, ca: Path, imageserver: Daemon,
          start_subd: Callable[..., Daemon]) -> Iterator[FleetUnderTest]:
    """A real fleet: the image server, a dominator and five subd."""
    under_test = FleetUnderTest(tmp_path, ca, imageserver, start_subd)
    yield under_test
    under_test.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped after it."""
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL tests need FLEET_TEST_POSTGRES_URL (set by .ci/run)")
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        drop_database(admin, name)
        admin.dispose()


def drop_database(admin: sa.Engine, name: str, attempts: int = 20) -> None:
    """Drop a test's database and its sessions. A backend of another role (an autovacuum
    worker) cannot be ended by the test user and makes FORCE fail: it goes within a
    moment, so try again."""
    for attempt in range(attempts):
        try:
            with admin.connect() as connection:
                connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
            return
        except sa.exc.ProgrammingError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A test asking for `url` runs on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "mdb.sqlite")
    return str(request.getfixturevalue("postgres_url"))
