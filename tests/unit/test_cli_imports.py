"""Every client command of `dominator` starts without the server's heavy libraries:
the integration tests run the CLI as a subprocess over a thousand times, and an
operator's every command paid for SQLAlchemy, pydantic and httpx (about a second)
though it only talks gRPC or HTTP to a dominator. Each module is imported in a fresh
interpreter, so what it loads is what a command of its group loads.

`dominator --help` and `dominator image list` are pinned closer (issue 13, start-up
under 150 ms): --help loads no command group, no gRPC, protobuf or cryptography; `image
list` loads gRPC and the image server's messages but no cryptography, tree library or
sibling command. Both run as an operator runs them, in a fresh interpreter. The groups
that list their subcommands without importing them are checked to list what the
imported commands would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from dominator.cli.image import image
from dominator.cli.main import cli
from fleetlib.cli.lazy import LazyGroup
from fleetlib.rpc.certs import init_ca
from fleetlib.testing.daemons import PROJECT, free_port

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
    "dominator.cli.image_content": (),
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


# Runs the CLI with ARGV (after the output file) and writes the modules it loaded there.
RUN_AND_LIST = """
import atexit, json, sys
out, sys.argv = sys.argv[1], ["dominator", *sys.argv[2:]]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from dominator.cli.main import main
main()
"""
# What no command that only talks to a server needs at start.
NEVER_AT_START = ("cryptography", "importlib.metadata", *HEAVY)


def loaded_by(tmp_path: Path, *argv: str, env: dict[str, str] | None = None,
              code: int = 0) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """The modules `dominator ARGV` loads, run in a fresh interpreter, and the run."""
    out = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST, str(out), *argv],
                          capture_output=True, text=True, timeout=60, cwd=PROJECT,
                          env={**{k: v for k, v in os.environ.items()
                                  if not k.startswith("DOMINATOR_")}, **(env or {})})
    assert done.returncode == code, done.stderr
    modules: list[str] = json.loads(out.read_text())
    return modules, done


def under(modules: list[str], *packages: str) -> list[str]:
    """The MODULES that are one of PACKAGES or inside one."""
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)]


def test_help_loads_no_command_group_and_no_rpc_library(tmp_path: Path) -> None:
    modules, done = loaded_by(tmp_path, "--help")
    assert "image" in done.stdout and "Exit codes" in done.stdout
    assert under(modules, "grpc", "google", *NEVER_AT_START) == []
    assert under(modules, "dominator", "fleetlib", "imageserver", "subd", "mdb") == [
        "dominator", "dominator.cli", "dominator.cli.main", "fleetlib", "fleetlib.cli",
        "fleetlib.cli.lazy", "fleetlib.cli.run", "fleetlib.errors"]


def test_image_list_loads_no_tree_library_nor_cryptography(tmp_path: Path) -> None:
    """Over mutual TLS to an address nobody listens on: the command loads all it needs
    to call, then fails (exit 3) the way a refused call does."""
    init_ca(tmp_path / "ca")
    env = {"DOMINATOR_TLS_DIR": str(tmp_path / "ca/admin"),
           "DOMINATOR_IMAGESERVER": f"127.0.0.1:{free_port()}"}
    modules, done = loaded_by(tmp_path, "image", "list", env=env, code=3)
    assert "connection refused" in done.stderr
    assert {"grpc", "fleetlib.wire.imageserver_pb2", "imageserver.client"} <= set(modules)
    assert under(modules, *NEVER_AT_START, "fleetlib.signing", "fleetlib.rpc.objects",
                 "fleetlib.wire.codec", "dominator.cli.image_content",
                 "dominator.cli.replicas", "dominator.client", "dominator.herd") == []
    assert under(modules, "fleetlib.fstree") == ["fleetlib.fstree", "fleetlib.fstree.imagename"]


@pytest.mark.parametrize("group", [cli, image], ids=lambda group: group.name)
@pytest.mark.parametrize("width", [50, 80, 120])
def test_a_lazy_group_lists_what_its_commands_would(group: LazyGroup, width: int) -> None:
    """The summaries a LazyGroup holds give the listing click makes from the imported
    commands' own help, at any terminal width (click shortens to fit)."""
    def listing(format_commands: object) -> str:
        ctx = click.Context(group, info_name=group.name, terminal_width=width)
        formatter = ctx.make_formatter()
        assert callable(format_commands)
        format_commands(group, ctx, formatter)
        return formatter.getvalue()

    assert listing(LazyGroup.format_commands) == listing(click.Group.format_commands)
