"""The audit log (issue 9 A) on real daemons: image adds through the image server,
MDB changes and the fleet-wide switch through the dominator, all in `dominator
audit` with the admin certificate's CN, merged by time; on the dashboard; kept
across a restart; and append-only."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from fleetlib.auditlog import AuditLog
from fleetlib.rpc.certs import CERT, common_name
from fleetlib.testing.daemons import Daemon, cli
from fleetlib.testing.fleet import FleetUnderTest, wait_for


def test_changes_are_audited_merged_and_kept(tmp_path: Path, ca: Path, imageserver: Daemon,
                                             start_subd: Callable[..., Daemon]) -> None:
    fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=1)
    try:
        tree = tmp_path / "small"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/motd").write_text("small\n")
        fleet.run("image", "add", "small", str(tree), "--expires-in", "7d")
        fleet.run("mdb", "set", "host-1", "--address", fleet.sub("host-1").address,
                  "--required-image", "small")
        fleet.run("fleet", "disable-updates", "--reason", "change freeze")
        fleet.run("fleet", "enable-updates")
        admin = common_name((ca / "admin" / CERT).read_bytes())

        entries = json.loads(fleet.run("audit", "--json"))
        assert [(e["server"], e["who"], e["action"]) for e in entries] == [
            ("imageserver", admin, "image.add"), ("dominator", admin, "mdb.set"),
            ("dominator", admin, "updates.disable"), ("dominator", admin, "updates.enable")]
        assert [e["unix"] for e in entries] == sorted(e["unix"] for e in entries)
        added, mdb_set, disabled, _ = entries
        assert added["details"]["image"] == "small" and added["details"]["expires_unix"] > 0
        assert mdb_set["details"] == {"host": "host-1", "new": True, "fields": {
            "IpAddress": fleet.sub("host-1").address, "RequiredImage": "small"}}
        assert disabled["summary"] == "disabled updates fleet-wide: change freeze"
        assert [e["action"] for e in json.loads(fleet.run("audit", "--json", "--limit", "2"))] \
            == ["updates.disable", "updates.enable"]
        assert len(json.loads(fleet.run("audit", "--json", "--since", "1h"))) == 4
        lines = fleet.run("audit").splitlines()
        assert len(lines) == 4 and "imageserver" in lines[0] and "added image small" in lines[0]
        assert lines[3].endswith("enabled updates fleet-wide") and admin in lines[3]

        page = httpx.get(f"{fleet.base}/audit", timeout=30)
        assert page.status_code == 200 and "disabled updates fleet-wide: change freeze" in page.text
        twin = httpx.get(f"{fleet.base}/audit.json", timeout=30).json()
        assert twin["server"] == "dominator"
        assert [e["action"] for e in twin["entries"]] == [
            "updates.enable", "updates.disable", "mdb.set"]  # newest first, like the page

        fleet.dominator.stop()
        fleet.dominator.start()
        assert json.loads(fleet.run("audit", "--json")) == entries  # kept, same ids

        fleet.run("fleet", "clear-safety", "host-1")
        fleet.run("fleet", "acknowledge", "host-1")
        fleet.run("image", "add", "brief", str(tree), "--expires-in", "1")
        fleet.run("image", "delete", "small", "--force")  # host-1 still requires it

        def expired() -> list[dict] | None:
            later = json.loads(fleet.run("audit", "--json"))[len(entries):]
            return later if any(e["action"] == "image.expire" for e in later) else None
        later = wait_for(expired, "the image server records the expiry")
        assert {(e["who"], e["action"], e["details"].get("image") or e["details"]["host"])
                for e in later} == {
            (admin, "safety.clear", "host-1"), (admin, "intrusion.acknowledge", "host-1"),
            (admin, "image.add", "brief"), (admin, "image.delete", "small"),
            ("imageserver (expiry)", "image.expire", "brief")}

        imageserver.stop()
        partial = cli("audit", "--json", env=fleet.env)
        assert partial.returncode == 3
        assert [e["server"] for e in json.loads(partial.stdout)] == ["dominator"] * 5
        warning, = partial.stderr.splitlines()
        assert warning.startswith("warning: cannot read the audit log of the image server at")
    finally:
        fleet.stop()


def test_the_log_is_append_only(tmp_path: Path) -> None:
    """The API offers no update or delete, and the table refuses both outright."""
    public = {name for name in dir(AuditLog) if not name.startswith("_")}
    assert public == {"record", "entries", "list_response"}
    path = tmp_path / "audit.sqlite"
    log = AuditLog(sa.create_engine(f"sqlite:///{path}"), "test")
    first = log.record("alice", "mdb.set", "MDB: added web-1", host="web-1")
    second = log.record("bob", "updates.disable", "disabled updates fleet-wide: x")
    assert second.id > first.id
    with pytest.raises(ValueError, match="secrets"):
        log.record("carol", "token.create", "created", token="fdt_secret")
    with sqlite3.connect(path) as db:
        for statement in ("UPDATE audit_log SET who = 'mallory'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
    reopened = AuditLog(sa.create_engine(f"sqlite:///{path}"), "test")
    assert [(e.id, e.who) for e in reopened.entries()] == [(first.id, "alice"),
                                                          (second.id, "bob")]
    assert [e.who for e in reopened.entries(limit=1)] == ["bob"]
    assert reopened.entries(since_unix_ns=second.unix_ns + 1) == []
