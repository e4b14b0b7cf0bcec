"""A herd's view of many hosts without running them, for the dashboard's tests and
benchmark: real Sub, Machine and HostRecord objects (what the views read) in a
stand-in herd and state store, served by the real HTTP application."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import cast

from fastapi import FastAPI

from dominator.herd.fetchslots import ServerSlots
from dominator.herd.herd import DiffCache, Herd, Sub
from dominator.herd.images import ImageCache
from dominator.herd.ranking import ImageServers
from dominator.herd.records import Disabled, HostRecord
from dominator.herd.state import DominatorState
from dominator.herd.status import Status
from dominator.server.http.app import make_app
from dominator.server.http.context import HttpContext
from fleetlib.rpc.tls import Security
from mdb.machine import Machine
from mdb.store import Mdb

IMAGES = ("web/v1", "web/v2", "db/v7", "cache/v3", "batch/v12")
# How often each status turns up (most hosts synced, as in a settled fleet).
WEIGHTS = {Status.SYNCED: 78, Status.UNREACHABLE: 5, Status.UPDATING: 3, Status.FETCHING: 3,
           Status.FAILED: 2, Status.NO_IMAGE: 2, Status.INTRUSION: 3, Status.ELSEWHERE: 4}
HISTORY = 10  # status transitions each host remembers


@dataclass
class StandInState:
    """The state store's in-memory side: host records and the fleet-wide switch."""

    records: dict[str, HostRecord]
    disabled: Disabled | None = None

    def host(self, hostname: str) -> HostRecord:
        """The host's record (empty when unknown)."""
        return self.records.get(hostname) or HostRecord()

    def updates_disabled(self) -> Disabled | None:
        """The fleet-wide switch."""
        return self.disabled


@dataclass
class StandInHerd:
    """What the dashboard reads of a herd: its subs and the image servers' side."""

    subs: dict[str, Sub]
    servers: ImageServers = field(default_factory=lambda: ImageServers(
        "127.0.0.1:1", [], Security.from_options(None, insecure=True)))
    server_slots: ServerSlots = field(default_factory=lambda: ServerSlots(0))
    cache: DiffCache = field(default_factory=lambda: DiffCache(16))
    mdb_error: str = ""


def many_hosts(count: int, seed: int = 11) -> tuple[dict[str, Sub], dict[str, HostRecord]]:
    """`count` hosts named h0..h{count-1} (so hostname order is not number order), with
    statuses, images, poll times, errors, tags and intrusions drawn from `seed`."""
    rng = random.Random(seed)
    now = time.time()
    statuses, weights = list(WEIGHTS), list(WEIGHTS.values())
    subs: dict[str, Sub] = {}
    records: dict[str, HostRecord] = {}
    for index in range(count):
        name = f"h{index}"
        status = rng.choices(statuses, weights)[0]
        required = "" if status == Status.NO_IMAGE else rng.choice(IMAGES)
        current = required if status in (Status.SYNCED, Status.INTRUSION) else rng.choice(IMAGES)
        machine = Machine(hostname=name, address=f"10.{index // 65536}.{index // 256 % 256}."
                                                 f"{index % 256}:6969",
                          required_image=required,
                          planned_image=rng.choice(IMAGES) if rng.random() < 0.1 else "",
                          owner_group=f"team-{index % 7}",
                          tags={"rack": f"r{index % 40}", "role": required.split("/")[0]})
        error = f"{status.value}: host {name} said no" if status in (
            Status.FAILED, Status.UNREACHABLE) else ""
        sub = Sub(machine=machine, last_poll_unix=now - rng.uniform(0, 30),
                  last_scan_unix=now - rng.uniform(0, 300), generation=rng.randrange(1, 1000),
                  owner="dom-b" if status == Status.ELSEWHERE else "")
        for step in range(HISTORY - 1):
            sub.history.append((now - 3600 + step * 60, Status.POLLING.value, ""))
        sub.set_status(status, error)
        subs[name] = sub
        intrusion = ("/etc/passwd", f"/var/lib/{name}") if status == Status.INTRUSION else ()
        records[name] = HostRecord(current_image=current, last_sync_unix=int(now - index % 600),
                                   intrusion_paths=intrusion,
                                   intrusion_unix=int(now) if intrusion else 0)
    return subs, records


def dashboard_app(subs: dict[str, Sub], records: dict[str, HostRecord]) -> FastAPI:
    """The dominator's real HTTP application over these hosts (no image server, MDB or
    deploy engine behind it: the host table and the overview need none)."""
    herd = cast(Herd, StandInHerd(subs))  # the attributes the views read
    state = cast(DominatorState, StandInState(records))
    return make_app(HttpContext(herd=herd, state=state, mdb=cast(Mdb, None),
                                images=cast(ImageCache, None), token=""))
