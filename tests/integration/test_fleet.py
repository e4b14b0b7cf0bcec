"""End to end, with real daemons on loopback and mutual TLS everywhere: an image
server, a dominator with a SQLite MDB, and five subd on temporary roots."""

from __future__ import annotations

import json
import time

from fleetlib.testing.daemons import cli
from fleetlib.testing.fleet import HOSTS, FleetUnderTest, add_images, names, wait_for
from subd.client import SubClient


def test_fleet_converges_and_stays_safe(fleet: FleetUnderTest) -> None:
    add_images(fleet)
    for index, sub in enumerate(fleet.subs, 1):
        fleet.run("mdb", "set", f"host-{index}", "--address", sub.address,
                  "--required-image", "v1", "--tag", f"rack=r{index}")
    everyone = names(*range(1, HOSTS + 1))
    fleet.wait_status(everyone, "synced", "v1")
    for index, root in enumerate(fleet.roots, 1):
        assert (root / "etc/hostname").read_text() == f"host-{index} r{index}\n"
        assert (root / "usr/bin/passwd").stat().st_mode & 0o4000

    # Changing the required image of two hosts converges exactly those two.
    for host in names(1, 2):
        fleet.run("mdb", "set", host, "--required-image", "v2")
    fleet.wait_status(names(1, 2), "synced", "v2")
    assert all((root / "usr/bin/new-in-v2").exists() for root in fleet.roots[:2])
    assert not any((root / "usr/bin/new-in-v2").exists() for root in fleet.roots[2:])

    # A computed file follows the host's MDB record.
    fleet.run("mdb", "set", "host-3", "--tag", "rack=moved")
    wait_for(lambda: (fleet.roots[2] / "etc/hostname").read_text() == "host-3 moved\n",
             "host-3's computed hostname follows its new tag")

    # A file edited by hand is restored within a few scan cycles and reported as
    # intrusion. Scans are counted in process, right at the edit and at the restore:
    # a CLI run on each side would count the scans of its own start-up on a busy machine.
    edited = fleet.roots[3] / "etc/hostname"
    with SubClient(fleet.subs[3].address, fleet.dominator.security) as host4_sub:
        scans_before = host4_sub.poll(short=True)[0].scan_count
        edited.write_text("intruder was here\n")
        wait_for(lambda: edited.read_text() == "host-4 r4\n", "host-4 is corrected")
        scans_after = host4_sub.poll(short=True)[0].scan_count
    assert scans_after - scans_before <= 3
    host4 = fleet.wait_status(names(4), "intrusion")["host-4"]
    assert host4["intrusion_paths"] == ["/etc/hostname"]
    fleet.run("fleet", "acknowledge", "host-4")
    fleet.wait_status(names(4), "synced")

    # Disabling updates stops changes, and survives a dominator restart.
    fleet.run("fleet", "disable-updates", "--reason", "change freeze")
    drifted = fleet.roots[4] / "etc/motd"  # not in the image: an extra file
    drifted.write_text("drift during the freeze\n")
    fleet.wait_status(names(5), "updates disabled")
    fleet.dominator.stop()
    fleet.dominator.start()
    status = json.loads(fleet.run("fleet", "status", "--json"))
    assert status["updates_disabled"] and status["disabled_reason"] == "change freeze"
    assert status["disabled_by"] == "admin"
    fleet.wait_status(names(5), "updates disabled")
    assert drifted.read_text() == "drift during the freeze\n"
    fleet.run("fleet", "enable-updates")
    wait_for(lambda: not drifted.exists(), "host-5 is corrected")
    host5 = fleet.wait_status(names(5), "intrusion")["host-5"]  # a file never desired
    assert host5["intrusion_paths"] == ["/etc/motd"]
    fleet.run("fleet", "acknowledge", "host-5")

    # The unsafe-update check stops an image that would wipe a host until cleared.
    before = sorted(p.name for p in (fleet.roots[2] / "etc").iterdir())
    fleet.run("mdb", "set", "host-3", "--required-image", "tiny")
    fleet.wait_status(names(3), "unsafe update")
    assert sorted(p.name for p in (fleet.roots[2] / "etc").iterdir()) == before
    fleet.run("fleet", "clear-safety", "host-3")
    fleet.wait_status(names(3), "synced", "tiny")
    assert (fleet.roots[2] / "etc/issue").read_text() == "tiny\n"
    assert not (fleet.roots[2] / "usr").exists()

    # A host whose subd is down is unreachable, and converges once it is back.
    fleet.subs[1].stop()
    fleet.run("mdb", "set", "host-2", "--required-image", "v1")
    fleet.wait_status(names(2), "unreachable")
    fleet.subs[1].start()
    fleet.wait_status(names(2), "synced", "v1")
    assert not (fleet.roots[1] / "usr/bin/new-in-v2").exists()

    # The dominator killed mid-update loses nothing: the next one completes it.
    fleet.run("mdb", "set", "host-5", "--required-image", "v2")
    with SubClient(fleet.subs[4].address, fleet.dominator.security) as sub:
        def busy() -> bool:
            status, _ = sub.poll(short=True)
            return status.fetch.in_progress or status.last_update.in_progress
        deadline = time.monotonic() + 30
        while not busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert busy(), "host-5 never started fetching v2"
    fleet.dominator.kill()
    fleet.dominator.start()
    fleet.wait_status(names(5), "synced", "v2")
    assert (fleet.roots[4] / "usr/bin/new-in-v2").read_text() == "v2\n"


def test_mdb_import_is_all_or_nothing(fleet: FleetUnderTest) -> None:
    good = [{"Hostname": f"web-{i}", "IpAddress": "127.0.0.1:1", "RequiredImage": "",
             "PlannedImage": "", "DisableUpdates": False, "OwnerGroup": "web",
             "Tags": {"rack": str(i)}, "Location": f"eu/dc1/r{i}"} for i in range(3)]
    (fleet.tmp / "good.json").write_text(json.dumps(good))
    assert "3 added" in fleet.run("mdb", "import", str(fleet.tmp / "good.json"))
    bad = good + [{"Hostname": "not a hostname!"}]
    (fleet.tmp / "bad.json").write_text(json.dumps(bad))
    refused = cli("mdb", "import", str(fleet.tmp / "bad.json"), "--replace", env=fleet.env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    exported = json.loads(fleet.run("mdb", "export"))
    assert [m["Hostname"] for m in exported] == ["web-0", "web-1", "web-2"]
    assert exported == good


def test_planned_image_is_prefetched_then_cache_cleaned(fleet: FleetUnderTest) -> None:
    add_images(fleet)
    sub = fleet.subs[0]
    fleet.run("mdb", "set", "host-1", "--address", sub.address, "--required-image", "v1",
              "--planned-image", "v2", "--tag", "rack=r1")
    fleet.wait_status(names(1), "synced", "v1")

    def cached() -> int:
        return json.loads(fleet.run("sub", "poll", sub.address, "--json"))["cached_objects"]

    wait_for(lambda: cached() >= 2, "v2's new objects are pre-fetched")
    assert not (fleet.roots[0] / "var/lib/big-in-v2").exists()  # fetched, not applied
    fleet.run("mdb", "set", "host-1", "--required-image", "v2", "--planned-image", "")
    fleet.wait_status(names(1), "synced", "v2")
    assert (fleet.roots[0] / "var/lib/big-in-v2").stat().st_size == 80 << 20
    wait_for(lambda: cached() == 0, "the cache is cleaned once nothing is planned")
