"""Every client command of `dominator` starts without the server's heavy libraries:
the integration tests run the CLI as a subprocess over a thousand times, and an
operator's every command paid for SQLAlchemy, pydantic and httpx (about a second)
though it only talks gRPC or HTTP to a dominator. Each module is imported in a fresh
interpreter, so what it loads is what a command of its group loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What only the daemons (and `dominator serve`, `quickstart`, `db`) need.
HEAVY = ("sqlalchemy", "alembic", "pydantic", "fastapi", "starlette", "httpx", "uvicorn")
# Command group modules that talk to a dominator or an image server, and what each may
# load of HEAVY (the deploy commands talk HTTP: httpx).
CLIENT_MODULES = {
    "dominator.client": (),
    "dominator.cli.audit": (),
    "dominator.cli.certs": (),
    "dominator.cli.deploy": ("httpx",),
    "dominator.cli.dominators": (),
    "dominator.cli.fleet": (),
    "dominator.cli.image": (),
    "dominator.cli.keys": (),
    "dominator.cli.main": (),
    "dominator.cli.mdb": (),
    "dominator.cli.replicas": (),
    "dominator.cli.sub": (),
    "dominator.cli.tokens": (),
}


def heavy_loaded(module: str) -> list[str]:
    """The HEAVY libraries a fresh interpreter has loaded after importing `module`."""
    script = (f"import json, sys; import {module}; "
              f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=60)
    loaded: list[str] = json.loads(done.stdout)
    return loaded


@pytest.mark.parametrize("module", sorted(CLIENT_MODULES))
def test_a_client_command_loads_no_server_library(module: str) -> None:
    assert sorted(set(heavy_loaded(module)) - set(CLIENT_MODULES[module])) == []


def test_the_check_sees_a_server_library() -> None:
    """`dominator db` opens databases: it does load SQLAlchemy, and the check says so."""
    assert "sqlalchemy" in heavy_loaded("dominator.cli.db")
