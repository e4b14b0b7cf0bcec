"""Issue 12's MDB guard rails, through the real CLI against a real dominator, image
server and subd: an unknown host needs --address, an unknown image needs --force (in
`mdb set` and `mdb import`), `mdb delete`, `mdb set --untag`, per-host pauses that
live in the dominator's state (an `mdb import` never lifts them) and `mdb list`'s
table. Every refused write leaves the MDB as it was (`mdb export` before and after)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetlib.rpc.certs import CERT, common_name
from fleetlib.testing.daemons import Daemon, assert_one_line_error, cli
from fleetlib.testing.fleet import FleetUnderTest, wait_for


@pytest.fixture
def start_fleet(tmp_path: Path, ca: Path, imageserver: Daemon, start_subd: Callable[..., Daemon]
                ) -> Iterator[Callable[[int], FleetUnderTest]]:
    """`start_fleet(subds)`: a dominator with host-1 and host-2 in the MDB on web/v1 (the
    image server also holds web/v2), on real subd when `subds` is 2, else at dead
    addresses (enough for what needs no convergence, and cheaper)."""
    started: list[FleetUnderTest] = []

    def start(subds: int) -> FleetUnderTest:
        fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=subds)
        started.append(fleet)
        tree = tmp_path / "tree"
        (tree / "etc").mkdir(parents=True)
        for version in ("v1", "v2"):
            (tree / "etc/motd").write_text(f"{version}\n")
            fleet.run("image", "add", f"web/{version}", str(tree))
        for index in (1, 2):
            name = f"host-{index}"
            address = fleet.sub(name).address if subds else f"127.0.0.1:{index}"
            fleet.run("mdb", "set", name, "--address", address, "--required-image", "web/v1",
                      "--tag", "rack=r1")
        return fleet

    yield start
    for fleet in started:
        fleet.stop()


@pytest.fixture
def fleet(start_fleet: Callable[[int], FleetUnderTest]) -> FleetUnderTest:
    """Both hosts on real subd."""
    return start_fleet(2)


@pytest.fixture
def mdb_only(start_fleet: Callable[[int], FleetUnderTest]) -> FleetUnderTest:
    """Both hosts at addresses where no subd listens."""
    return start_fleet(0)


def refused(fleet: FleetUnderTest, code: int, args: list[str], *fragments: str) -> str:
    """`dominator ARGS` is refused (exit `code`, one line holding `fragments`) and the
    MDB is exactly as it was; its stderr."""
    before = fleet.run("mdb", "export")
    result = cli(*args, env=fleet.env)
    assert_one_line_error(result, *fragments, code=code)
    assert fleet.run("mdb", "export") == before
    return result.stderr


def record(fleet: FleetUnderTest, host: str) -> dict[str, Any]:
    """`mdb get HOST`: the record and its "pause"."""
    got: dict[str, Any] = json.loads(fleet.run("mdb", "get", host))
    return got


def audited(fleet: FleetUnderTest, action: str) -> list[dict[str, Any]]:
    """The dominator's audit entries of that action."""
    return [entry for entry in json.loads(fleet.run("audit", "--json"))
            if entry["server"] == "dominator" and entry["action"] == action]


def test_unknown_hosts_need_an_address_and_delete_names_close_ones(
        mdb_only: FleetUnderTest) -> None:
    fleet = mdb_only
    for args in (["mdb", "set", "hsot-1", "--required-image", "web/v2"],
                 ["mdb", "set", "hsot-1", "--tag", "rack=r2"],
                 ["mdb", "set", "hsot-1", "--disable-updates", "--reason", "typo"]):
        refused(fleet, 2, args, "unknown host hsot-1", "did you mean host-1, host-2",
                "--address")
    assert_one_line_error(cli("mdb", "get", "hsot-1", env=fleet.env), "did you mean host-1",
                          code=1)
    assert record(fleet, "host-1")["pause"] is None  # the refused pause made none
    refused(fleet, 2, ["mdb", "set", "host-1"], "nothing to change")
    refused(fleet, 2, ["mdb", "set", "newbie", "--address", "not an address"],
            "invalid address")

    added = json.loads(fleet.run("mdb", "set", "newbie", "--address", "127.0.0.1:1"))
    assert added["Hostname"] == "newbie" and added["IpAddress"] == "127.0.0.1:1"
    assert added["pause"] is None

    refused(fleet, 1, ["mdb", "delete", "newbi"], "unknown host newbi", "did you mean newbie")
    assert fleet.run("mdb", "delete", "newbie").strip() == "deleted newbie from the MDB"
    assert "newbie" not in fleet.run("mdb", "export")
    assert_one_line_error(cli("mdb", "delete", "newbie", env=fleet.env),
                          "unknown host newbie", code=1)
    [deleted] = audited(fleet, "mdb.delete")
    assert deleted["summary"] == "MDB: deleted newbie"
    assert deleted["details"]["record"]["IpAddress"] == "127.0.0.1:1"
    admin = common_name((fleet.ca / "admin" / CERT).read_bytes())
    assert deleted["who"] == admin


def test_tags_untags_and_the_list_table(mdb_only: FleetUnderTest) -> None:
    fleet = mdb_only
    tagged = json.loads(fleet.run("mdb", "set", "host-1", "--tag", "role=web", "--tag",
                                  "empty="))
    assert tagged["Tags"] == {"rack": "r1", "role": "web", "empty": ""}  # K= is a value
    result = cli("mdb", "set", "host-1", "--untag", "role", "--untag", "absent", env=fleet.env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Tags"] == {"rack": "r1", "empty": ""}
    assert result.stderr.strip() == "warning: host-1 has no tag absent: nothing to remove"
    refused(fleet, 2, ["mdb", "set", "host-1", "--tag", "a=1", "--untag", "a"],
            "--untag a", "set it or remove it")
    refused(fleet, 2, ["mdb", "set", "host-1", "--untag", "rack=r1"], "KEY alone")
    refused(fleet, 2, ["mdb", "set", "host-1", "--tag", "rack"], "KEY=VALUE")

    fleet.run("mdb", "set", "host-2", "--disable-updates", "--reason", "disk swap")
    located = json.loads(fleet.run("mdb", "set", "host-1", "--location", "us-east/dc1/rack4"))
    assert located["Location"] == "us-east/dc1/rack4"
    assert json.loads(fleet.run("mdb", "get", "host-1"))["Location"] == "us-east/dc1/rack4"
    refused(fleet, 2, ["mdb", "set", "host-1", "--location", "us east"], "invalid location")
    lines = fleet.run("mdb", "list").splitlines()
    assert re.fullmatch(r"HOST +REQUIRED +PLANNED +ADDRESS +LOCATION +UPDATES +TAGS", lines[0])
    assert len(lines) == 3
    assert re.match(r"host-1 +web/v1 +- +127\.0\.0\.1:1 +us-east/dc1/rack4 +- +"
                    r"empty=,rack=r1$", lines[1]), lines[1]
    assert re.search(r" paused by \S+: disk swap +rack=r1$", lines[2]), lines[2]
    listed = json.loads(fleet.run("mdb", "list", "--json"))
    mdb_keys = {"Hostname", "IpAddress", "RequiredImage", "PlannedImage", "DisableUpdates",
                "OwnerGroup", "Tags", "Location"}
    assert [set(item) for item in listed] == [mdb_keys | {"pause"}] * 2
    assert listed[0]["pause"] is None
    assert listed[1]["pause"]["reason"] == "disk swap"
    assert listed[1]["pause"]["until_unix"] == 0
    assert abs(listed[1]["pause"]["since_unix"] - time.time()) < 60
    # What `mdb list --json` adds is not MDB data: an import says what to use instead.
    (fleet.tmp / "listed.json").write_text(json.dumps(listed))
    refused(fleet, 2, ["mdb", "import", str(fleet.tmp / "listed.json")],
            "unknown field 'pause'", "mdb export")


def test_unknown_images_need_force(mdb_only: FleetUnderTest, imageserver: Daemon) -> None:
    fleet = mdb_only
    refused(fleet, 2, ["mdb", "set", "host-1", "--required-image", "web/v3"],
            "unknown image: web/v3 (RequiredImage of host-1; did you mean web/v", "web/v1",
            "web/v2", "--force")
    refused(fleet, 2, ["mdb", "set", "host-1", "--required-image", "web/v3", "--disable-updates"],
            "unknown image: web/v3")
    assert record(fleet, "host-1")["pause"] is None  # a refused write pauses nothing either
    refused(fleet, 2, ["mdb", "set", "host-1", "--planned-image", "wbe/v2"],
            "PlannedImage of host-1; did you mean web/v2")
    refused(fleet, 2, ["mdb", "set", "brand-new", "--address", "127.0.0.1:1",
                       "--required-image", "nothing-like-it"], "unknown image: nothing-like-it")
    forced = json.loads(fleet.run("mdb", "set", "host-1", "--planned-image", "web/v3",
                                  "--force"))
    assert forced["PlannedImage"] == "web/v3"
    [entry] = [e for e in audited(fleet, "mdb.set") if e["details"].get("force")]
    assert "images unchecked" in entry["summary"]
    # A name the host already has is not checked again: other changes go through.
    assert json.loads(fleet.run("mdb", "set", "host-1", "--owner-group", "web"))[
        "PlannedImage"] == "web/v3"

    # mdb import: all or nothing.
    machines = json.loads(fleet.run("mdb", "export"))
    machines[0]["RequiredImage"] = "web/v2"
    machines[1]["RequiredImage"] = "web/v2.1"
    machines.append({"Hostname": "host-3", "RequiredImage": "typo/v1"})
    (fleet.tmp / "typos.json").write_text(json.dumps(machines))
    refused(fleet, 2, ["mdb", "import", str(fleet.tmp / "typos.json"), "--replace"],
            "2 unknown images: typo/v1 (RequiredImage of host-3",
            "web/v2.1 (RequiredImage of host-2; did you mean web/v2", "nothing changed",
            "--force")
    assert fleet.run("mdb", "import", str(fleet.tmp / "typos.json"), "--force").strip() == \
        "imported: 1 added, 2 changed, 0 removed"
    assert [m["RequiredImage"] for m in json.loads(fleet.run("mdb", "export"))] == [
        "web/v2", "web/v2.1", "typo/v1"]

    # The image server down: the dominator cannot check, which is worth retrying.
    imageserver.stop()
    stderr = refused(fleet, 3, ["mdb", "set", "host-1", "--required-image", "web/v1"],
                     "cannot ask the image server", "retry", "--force")
    assert "the dominator at" not in stderr  # the dominator answered: it is not the one down
    machines[2]["RequiredImage"] = "web/v1"
    (fleet.tmp / "later.json").write_text(json.dumps(machines))
    refused(fleet, 3, ["mdb", "import", str(fleet.tmp / "later.json")],
            "cannot ask the image server")
    fleet.run("mdb", "set", "host-2", "--owner-group", "db")  # nothing to check: goes on
    fleet.run("mdb", "set", "host-1", "--required-image", "web/v1", "--force")
    assert record(fleet, "host-1")["RequiredImage"] == "web/v1"


def test_a_pause_outlives_an_import_and_is_lifted_by_enable_updates(
        fleet: FleetUnderTest) -> None:
    fleet.wait_status(fleet.names, "synced", "web/v1")
    shown = json.loads(fleet.run("mdb", "set", "host-1", "--disable-updates", "--reason",
                                 "kernel  bisect\n(ticket 7)", "--expires-in", "1h"))
    admin = common_name((fleet.ca / "admin" / CERT).read_bytes())
    pause = shown["pause"]
    assert (pause["by"], pause["reason"]) == (admin, "kernel bisect (ticket 7)")
    assert abs(pause["until_unix"] - (time.time() + 3600)) < 60
    assert shown["DisableUpdates"] is False  # the pause is not the MDB's field
    for name in fleet.names:
        fleet.run("mdb", "set", name, "--required-image", "web/v2")
    fleet.wait_status(["host-2"], "synced", "web/v2")
    held = fleet.wait_status(["host-1"], "updates disabled")["host-1"]
    assert re.fullmatch(rf"paused for this host by {admin}: kernel bisect \(ticket 7\) "
                        r"\(until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\); `dominator mdb set host-1 "
                        r"--enable-updates` resumes it", held["last_error"]), held["last_error"]

    # The bug of issue 12: an import of a file without DisableUpdates lifted the pause.
    machines = [{key: value for key, value in machine.items() if key != "DisableUpdates"}
                for machine in json.loads(fleet.run("mdb", "export"))]
    (fleet.tmp / "mdb.json").write_text(json.dumps(machines))
    fleet.run("mdb", "import", str(fleet.tmp / "mdb.json"))
    assert record(fleet, "host-1")["pause"] == pause
    time.sleep(1.5)  # several poll cycles (0.3 s) of host-1
    host = fleet.hosts()["host-1"]
    assert host["status"] == "updates disabled" and host["current_image"] == "web/v1"
    assert (fleet.root("host-1") / "etc/motd").read_text() == "v1\n"

    resumed = json.loads(fleet.run("mdb", "set", "host-1", "--enable-updates"))
    assert resumed["pause"] is None
    fleet.wait_status(["host-1"], "synced", "web/v2")
    assert (fleet.root("host-1") / "etc/motd").read_text() == "v2\n"
    [paused] = audited(fleet, "host.pause")
    assert paused["details"]["reason"] == "kernel bisect (ticket 7)"
    assert paused["summary"].startswith("paused updates of host-1 until 20")
    [lifted] = audited(fleet, "host.resume")
    assert lifted["details"] == {"host": "host-1", "was_paused": True, "cleared_mdb": False}

    # --enable-updates also clears the MDB's own DisableUpdates.
    machines[1]["DisableUpdates"] = True
    (fleet.tmp / "mdb.json").write_text(json.dumps(machines))
    fleet.run("mdb", "import", str(fleet.tmp / "mdb.json"))
    assert "disabled in the MDB" in fleet.run("mdb", "list").splitlines()[2]
    assert json.loads(fleet.run("mdb", "set", "host-2", "--enable-updates"))[
        "DisableUpdates"] is False

    # A pause with an expiry lifts itself; --reason needs --disable-updates.
    fleet.run("mdb", "set", "host-2", "--disable-updates", "--expires-in", "1")
    wait_for(lambda: record(fleet, "host-2")["pause"] is None, "the pause ran out", 10)
    refused(fleet, 2, ["mdb", "set", "host-2", "--reason", "why"], "--disable-updates")
    refused(fleet, 2, ["mdb", "set", "host-2", "--disable-updates", "--expires-in", "soon"],
            "invalid duration")


def test_fleet_disable_updates_expires(mdb_only: FleetUnderTest) -> None:
    fleet = mdb_only
    out = fleet.run("fleet", "disable-updates", "--reason", "freeze", "--expires-in", "2h")
    assert re.match(r"updates disabled by \S+ until 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC "
                    r"\(in [12] h\): freeze$", out), out
    status = json.loads(fleet.run("fleet", "status", "--json"))
    assert status["updates_disabled"] is True
    assert abs(status["disabled_until_unix"] - (time.time() + 7200)) < 60
    [entry] = audited(fleet, "updates.disable")
    assert entry["summary"].startswith("disabled updates fleet-wide until 20")
    assert entry["summary"].endswith(": freeze")
    fleet.run("fleet", "disable-updates", "--reason", "blip", "--expires-in", "1")
    wait_for(lambda: not json.loads(fleet.run("fleet", "status", "--json"))["updates_disabled"],
             "the fleet-wide switch ran out", 10)
