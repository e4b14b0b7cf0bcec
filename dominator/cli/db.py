"""`dominator db ...`: the schemas of the dominator's databases (fleetlib.sql.schema).

The MDB (--mdb-url, or mdb.sqlite of --state-dir as `serve` defaults to) and, with
--state-dir, its state file (dominator.sqlite: the state store, deploys and audit log, one
history each). On SQLite a dominator upgrades its databases itself as it opens them; a
PostgreSQL MDB, shared by several dominators, is upgraded only here, once, by an
operator, and every dominator refuses to start on a schema other than its own."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from sqlalchemy import Engine

from dominator.cli.options import json_option
from dominator.deploy.store import HISTORY as DEPLOYS
from dominator.herd.state import HISTORY as STATE
from dominator.herd.state import STATE_FILE, shared_url
from fleetlib.auditlog import HISTORY as AUDIT
from fleetlib.cli.display import echo_json, echo_table
from fleetlib.cli.run import EXIT_NEGATIVE
from fleetlib.sql.engine import describe_url, open_engine, parse_url
from fleetlib.sql.schema import History, Status, status, upgrade
from mdb.store import HISTORY as MDB

Target = tuple[str, tuple[History, ...]]  # a database URL and the histories it holds
# What dominators on one PostgreSQL MDB share, in the MDB's database.
SHARED = (STATE, DEPLOYS, AUDIT)


def targets(mdb_url: str | None, state_dir: Path | None) -> list[Target]:
    """The databases --mdb-url and --state-dir name, as `serve` finds them."""
    if mdb_url is None and state_dir is None:
        raise click.UsageError("give --mdb-url, --state-dir or both")
    found: list[Target] = []
    if mdb_url is not None:
        found.append((mdb_url, (MDB, *SHARED) if shared_url(mdb_url) else (MDB,)))
    if state_dir is not None:
        if mdb_url is None:
            found.append((str(state_dir / "mdb.sqlite"), (MDB,)))
        found.append((str(state_dir / STATE_FILE), (STATE, DEPLOYS, AUDIT)))
    return found


def _missing_file(url: str) -> bool:
    """A SQLite file not made yet (status reads it as empty without making it)."""
    parsed = parse_url(url)
    return parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists()


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    engine = open_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def statuses(url: str, histories: tuple[History, ...]) -> list[Status]:
    """Where the database at URL stands on each of its histories."""
    if _missing_file(url):
        return [Status(describe_url(parse_url(url)), history.name, None, history.head(), False)
                for history in histories]
    with _engine(url) as engine:
        return [status(engine, history) for history in histories]


@click.group(name="db")
def db() -> None:
    """Database schemas: where each database stands, and upgrading them."""


state_dir_option = click.option(
    "--state-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The dominator's state directory: its state file (and mdb.sqlite there, "
         "unless --mdb-url is given).")
mdb_url_option = click.option(
    "--mdb-url", envvar="DOMINATOR_MDB_URL", show_envvar=True,
    help="SQLAlchemy URL of the machine database (as given to `dominator serve`).")


@db.command(name="upgrade")
@mdb_url_option
@state_dir_option
@json_option
def upgrade_command(mdb_url: str | None, state_dir: Path | None, as_json: bool) -> None:
    """Upgrade each database to this dominator's schema (databases of the hand-written
    runner are taken over first). Prints FROM -> TO per database and history; --json: a
    list of {"database", "history", "from", "to", "taken_over"}. Safe to run at any
    time, and from several machines at once: upgraders take turns, and one at head
    changes nothing."""
    done: list[Status] = []  # where each stood before (all are at head now)
    for url, histories in targets(mdb_url, state_dir):
        with _engine(url) as engine:
            done.extend(upgrade(engine, history) for history in histories)
    if as_json:
        echo_json([{"database": found.database, "history": found.history,
                    "from": found.current, "to": found.head, "taken_over": found.old_runner}
                   for found in done])
        return
    for found in done:
        before = found.current or "empty"
        if found.old_runner:
            before += " (taken over from the old runner)"
        change = "already at head" if found.state == "current" and not found.old_runner \
            else f"{before} -> {found.head}"
        click.echo(f"{found.history} {found.database}: {change}")


@db.command(name="status")
@mdb_url_option
@state_dir_option
@json_option
def status_command(mdb_url: str | None, state_dir: Path | None, as_json: bool) -> None:
    """Each database's current schema revision and this dominator's (head); --json: a
    list of {"database", "history", "current", "head", "state", "old_runner"}. Exits 1 when
    one is not at head (empty, behind: run `dominator db upgrade`; newer: upgrade this
    dominator)."""
    found = [entry for url, histories in targets(mdb_url, state_dir)
             for entry in statuses(url, histories)]
    if as_json:
        echo_json([entry.to_json() for entry in found])
    else:
        echo_table(["HISTORY", "DATABASE", "CURRENT", "HEAD", "STATE"],
                   [[entry.history, entry.database, entry.current or "-", entry.head,
                     entry.state] for entry in found])
    if any(entry.state != "current" for entry in found):
        sys.exit(EXIT_NEGATIVE)
