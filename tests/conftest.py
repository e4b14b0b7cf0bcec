"""Shared fixtures: a certificate authority, and real image server daemons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rpc.certs import init_ca
from rpc.tls import Security
from tests.daemons import Daemon, free_port


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
    daemon = Daemon("imageserver.main",
                    ["--state-dir", str(state), "--tls-dir", str(ca / "imageserver")],
                    "imageserver", free_port(),
                    Security.from_options(str(ca / "admin"), insecure=False),
                    tmp_path / "imageserver.log", state_dir=state)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def cli_env(ca: Path, imageserver: Daemon) -> dict[str, str]:
    """Environment pointing the CLI at the test image server as admin."""
    return {"DOMINATOR_TLS_DIR": str(ca / "admin"), "DOMINATOR_IMAGESERVER": imageserver.address}
