"""`dominator fleet ...` as an operator runs it, against a real dominator and real subd:
the once-only disruption allowance, list filters and tables, readable `show`, human
times in `status`, and the exit codes of an unknown host and an unreachable dominator."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetlib.testing.daemons import Daemon, assert_one_line_error, cli, free_port
from fleetlib.testing.fleet import FleetUnderTest, names

MTIME = 1_700_000_000
REPR_RE = re.compile(r"[\[{]'|\(\)|\bNone\b|\bTrue\b|\bFalse\b|Tags\(")


@pytest.fixture
def small_fleet(tmp_path: Path, ca: Path, imageserver: Daemon,
                start_subd: Callable[..., Daemon]) -> Iterator[FleetUnderTest]:
    """The image server, a dominator and two subd (host-1, host-2)."""
    under_test = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=2)
    yield under_test
    under_test.stop()


def add_image(fleet: FleetUnderTest, name: str, files: dict[str, str],
              triggers: str | None = None) -> None:
    """An image of these files (path -> text, one fixed mtime: a file two images share
    is no change), with Dominator trigger JSON when given."""
    root = fleet.tmp / f"image-{name}"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    for path in [root, *root.rglob("*")]:
        os.utime(path, (MTIME, MTIME))
    extra: list[str] = []
    if triggers is not None:
        (fleet.tmp / f"{name}.triggers.json").write_text(triggers)
        extra = ["--triggers", str(fleet.tmp / f"{name}.triggers.json")]
    fleet.run("image", "add", name, str(root), *extra)


def show(fleet: FleetUnderTest, host: str) -> dict[str, object]:
    """`fleet show HOST --json`."""
    data: dict[str, object] = json.loads(fleet.run("fleet", "show", host, "--json"))
    return data


KERNEL = '[{"MatchLines": ["/boot/.*"], "Service": "kernel", "HighImpact": true}]'


def test_allow_disruption_lets_exactly_one_update_through(
        small_fleet: FleetUnderTest, trigger_log: Path) -> None:
    fleet = small_fleet
    add_image(fleet, "k1", {"boot/vmlinuz": "kernel 1\n", "etc/motd": "one\n"}, KERNEL)
    add_image(fleet, "k1b", {"boot/vmlinuz": "kernel 1\n", "etc/motd": "one b\n"}, KERNEL)
    add_image(fleet, "k2", {"boot/vmlinuz": "kernel 2\n", "etc/motd": "one b\n"}, KERNEL)
    fleet.run("mdb", "set", "host-1", "--address", fleet.sub("host-1").address,
              "--required-image", "k1")

    # The first update would fire the HighImpact trigger: refused, saying what allows it.
    host = fleet.wait_status(names(1), "disruption denied")["host-1"]
    assert "kernel" in host["last_error"]
    assert "`dominator fleet allow-disruption host-1`" in host["last_error"]
    assert "`dominator deploy start --allow-disruption`" in host["last_error"]
    assert not (fleet.root("host-1") / "boot/vmlinuz").exists()
    listing = fleet.run("fleet", "list")
    assert "dominator fleet allow-disruption host-1" in listing
    assert "refused" in fleet.run("fleet", "show", "host-1")

    # Allowed once: that update runs (and its trigger), and spends the allowance.
    out = fleet.run("fleet", "allow-disruption", "host-1")
    assert out.strip() == "host-1: its next update may run HighImpact triggers (once)"
    fleet.wait_status(names(1), "synced", "k1")
    assert (fleet.root("host-1") / "boot/vmlinuz").read_text() == "kernel 1\n"
    assert "start kernel" in trigger_log.read_text()
    assert show(fleet, "host-1")["disruption_allowed"] is False

    # A change that fires no HighImpact trigger needs no allowance.
    fleet.run("mdb", "set", "host-1", "--required-image", "k1b")
    fleet.wait_status(names(1), "synced", "k1b")

    # The next disruptive change is refused again; a new allowance lets it through.
    fleet.run("mdb", "set", "host-1", "--required-image", "k2")
    fleet.wait_status(names(1), "disruption denied")
    assert (fleet.root("host-1") / "boot/vmlinuz").read_text() == "kernel 1\n"
    pushed = cli("fleet", "fast-update", "host-1", env=fleet.env)
    assert pushed.returncode == 4, (pushed.stdout, pushed.stderr)  # refused by a safety rule
    assert "host-1: disruption denied (HighImpact trigger(s) kernel" in pushed.stdout
    assert json.loads(fleet.run("fleet", "allow-disruption", "host-1", "--json"))[
        "disruption_allowed"] is True
    fleet.wait_status(names(1), "synced", "k2")
    assert (fleet.root("host-1") / "boot/vmlinuz").read_text() == "kernel 2\n"

    # An unknown host is a negative answer (exit 1), on every per-host command.
    for command in ("allow-disruption", "clear-safety", "show", "acknowledge"):
        assert_one_line_error(cli("fleet", command, "hsot-1", env=fleet.env),
                              "unknown host hsot-1", code=1)


def test_list_show_and_status_for_people_and_scripts(small_fleet: FleetUnderTest) -> None:
    fleet = small_fleet
    add_image(fleet, "web", {"etc/motd": "web\n", "srv/index.html": "hello\n"})
    fleet.run("mdb", "set", "host-1", "--address", fleet.sub("host-1").address,
              "--required-image", "web", "--tag", "role=web", "--tag", "rack=r1")
    fleet.run("mdb", "set", "host-2", "--address", fleet.sub("host-2").address,
              "--tag", "role=db", "--tag", "rack=r1")
    fleet.wait_status(names(1), "synced", "web")
    fleet.wait_status(names(2), "no image")

    # A table with headers, 'N ago' times; the error column says what is wrong.
    lines = fleet.run("fleet", "list").splitlines()
    assert lines[0].split() == ["HOST", "STATUS", "IMAGE", "LAST", "SYNC", "ERROR/INTRUSION"]
    assert re.match(r"host-1\s+synced\s+web\s+(just now|\d+ s ago)\s+-$", lines[1]), lines
    assert re.match(r"host-2\s+no image\s+-\s+-\s+-$", lines[2]), lines

    def listed(*args: str) -> list[str]:
        return [h["hostname"] for h in json.loads(fleet.run("fleet", "list", "--json", *args))]

    assert listed("--status", "synced") == ["host-1"]
    assert listed("--status", "no-image") == ["host-2"]
    assert listed("--status", "synced,no image") == ["host-1", "host-2"]
    assert listed("--select", "tags:role=db") == ["host-2"]
    assert listed("--select", "tags:rack=r1,role=web") == ["host-1"]
    assert listed("--select", "host-2,host-1") == ["host-1", "host-2"]
    assert listed("--select", "all", "--status", "synced") == ["host-1"]
    assert listed("--select", "tags:role=web", "--status", "no_image") == []
    table = fleet.run("fleet", "list", "--select", "tags:role=db").splitlines()
    assert len(table) == 2 and table[1].startswith("host-2 ")
    assert_one_line_error(cli("fleet", "list", "--status", "bogus", env=fleet.env),
                          "unknown status 'bogus'", "synced", "disruption denied", code=2)
    assert_one_line_error(cli("fleet", "list", "--select", "tags:role", env=fleet.env),
                          "KEY=VALUE", code=2)
    assert_one_line_error(cli("fleet", "list", "--select", "host-1,hsot-2", env=fleet.env),
                          "unknown host hsot-2", code=1)

    # --json keeps its keys and adds structured ones.
    host = json.loads(fleet.run("fleet", "list", "--json"))[0]
    for key in ("hostname", "address", "status", "required_image", "planned_image",
                "current_image", "last_poll_unix", "last_sync_unix", "last_scan_unix",
                "last_error", "intrusion_paths", "intrusion_unix", "change_window_ms",
                "updates_disabled", "safety_cleared", "history", "kept_paths"):
        assert key in host, key
    assert host["tags"] == {"rack": "r1", "role": "web"}

    # `fleet show`: sections, human times, no Python reprs; --json history as objects.
    text = fleet.run("fleet", "show", "host-1")
    assert text.startswith("host-1: synced\n")
    assert re.search(r"last sync:\s+(just now|\d+ s ago) \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)",
                     text), text
    assert re.search(r"tags:\s+rack=r1, role=web", text), text
    assert "History (oldest first):" in text and "WHEN" in text
    assert "safety check:" in text and "disruption:" in text and "updates:" in text
    assert not REPR_RE.search(text), text
    data = show(fleet, "host-1")
    assert isinstance(data["history"], list) and all(isinstance(h, str)
                                                     for h in data["history"])
    entries = data["history_entries"]
    assert isinstance(entries, list) and entries
    assert all(set(entry) == {"time_unix", "status", "message"} for entry in entries)
    assert entries[-1]["status"] == "synced" and entries[-1]["time_unix"] > 0
    assert data["pause"] is None and data["disruption_allowed"] is False

    # An intrusion shows in the list's last column and in `show`.
    (fleet.root("host-1") / "srv/index.html").write_text("defaced\n")
    fleet.wait_status(names(1), "intrusion")
    assert "intrusion: 1 path (/srv/index.html)" in fleet.run("fleet", "list")
    assert "Intrusion report" in fleet.run("fleet", "show", "host-1")

    # `fleet status`: counts, and the switch with a human time; --json keeps its keys.
    fleet.run("fleet", "disable-updates", "--reason", "change freeze")
    text = fleet.run("fleet", "status")
    assert text.startswith("2 hosts: ")
    assert re.search(r"UPDATES DISABLED fleet-wide by \S+ (just now|\d+ s ago) "
                     r"\(\d{4}-.* UTC\): change freeze", text), text
    status = json.loads(fleet.run("fleet", "status", "--json"))
    assert status["hosts"] == 2 and status["disabled_reason"] == "change freeze"
    assert status["disabled_unix"] > 0 and "by_status" in status


def test_unreachable_dominator_exits_3(ca: Path) -> None:
    env = {"DOMINATOR_TLS_DIR": str(ca / "admin"),
           "DOMINATOR_ADDRESS": f"127.0.0.1:{free_port()}"}
    for args in (("fleet", "list"), ("fleet", "status"), ("fleet", "allow-disruption", "h")):
        result = cli(*args, env=env)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr

