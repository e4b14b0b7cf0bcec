"""The fleet figures: real dominators herding many simulated subs on loopback.

For each fleet size (default 1,000 and 10,000), with a real image server, N real
`dominator serve` (`--poll-interval 5`, default slots; one on a SQLite MDB, or
`--dominators N --mdb-url postgresql+psycopg://...`: N on a fresh PostgreSQL database,
`--lease 15`) and in-memory subs (`bench/fake_subd.py`, one grpc.aio server per sub on
its own address 127.1.x.y, serving Watch and checking fences as subd does):

- steady state, every sub synced: polls/s and the largest interval between two polls
  of one sub (counted by the subs), the Watch streams open, and the most hosts
  neither watched nor polled within 10 s in any second; each dominator's CPU
  (/proc/PID/stat), per poll and per host it manages, and resident memory (VmRSS,
  peak VmHWM) over a window;
- changes seen: a tenth of the subs each find a change (their generation moves, as a
  scan finding one moves it) at random times over 10 s; seconds from each change to
  the sub's next poll;
- rollout: an image that differs by one 1 MiB file becomes every host's
  RequiredImage in one `dominator mdb import`; time until every sub applied it and
  until `fleet status` through d1 shows every host synced (with several dominators
  d1 shows the others' hosts through their status rows). The fake subs do not
  transfer the file: a fetch completes at once (see fake_subd.py), so this is the
  dominators' own pace, not the network's;
- failover (several dominators): SIGKILL of the last one; seconds until every host
  it managed had a Watch stream opened and a poll from another, until the shard
  leases settled among the others, and until d1's fleet status said every host
  synced again with none left to the dead one;
- the ceilings (one dominator only), one client process calling every address in a
  loop with the herd's poll concurrency (200): the herd's short Poll through
  AsyncSubClient against the same fake subs with no herd around it, and a plain
  grpc.aio unary echo on as many addresses: calls/s, CPU and memory of that client.

"Every host within 10 s" with watch streams: a settled host is polled only at the
300 s backstop, so the largest poll gap is no goal any more; what is, is that at
every second each host has a live Watch stream to its dominator (which hears a change
at once) or was polled within 10 s, and that a change is seen within 10 s.
`--no-watch` makes the fake subs answer Watch UNIMPLEMENTED (an older subd): every
host is polled at the poll interval, as before watches, and the gap is the goal.

The subs' processes run on the same two cores as the dominators; their CPU is
reported too. `--security mtls|both` runs with mutual TLS (`rpc.certs.init_ca`
identities) instead of, or after, `--insecure`.

`python -m bench.fleet_bench [--subs 1000,10000] [--window 30] [--security both]
[--dominators N --mdb-url URL] [--no-watch]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.fake_subd import ECHO_SERVICE, address
from bench.timing import RESULTS
from dominator.client import DominatorClient
from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Identity, Security, open_channel
from fleetlib.sql.engine import describe_url
from fleetlib.testing.daemons import PROJECT, Daemon, free_port
from fleetlib.testing.dominators import named_url
from fleetlib.wire import dominator_pb2

TICKS = os.sysconf("SC_CLK_TCK")
PER_PROCESS = 5000        # subs per fake_subd process: a listener + a connection each
POLL_INTERVAL = 5.0       # the dominator's --poll-interval
POLL_SLOTS = 200          # the herd's default poll slots: the echo client's concurrency
ECHO_PAYLOAD = 96         # bytes, about a short Poll's reply
BASE = "127.1"
BLOB_BYTES = 1 << 20
LEASE = "15"              # --lease of each dominator on PostgreSQL
TOUCH_SHARE = 0.1         # of the subs find a change in the changes-seen phase ...
TOUCH_SECONDS = 10.0      # ... each at a random time within this long
COVERED_SECONDS = 10.0    # the goal: every host watched or polled within this long


def log(text: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def raise_nofile() -> int:
    """Soft file descriptor limit up to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Setup:
    """Where things are for one configuration (TLS or not)."""

    work: Path
    tls: bool
    admin: Security
    env: dict[str, str]

    def tls_args(self, role: str) -> list[str]:
        return ["--tls-dir", str(self.work / "ca" / role)] if self.tls else ["--insecure"]

    def security(self, role: str) -> Security:
        return Security(Identity.load(self.work / "ca" / role)) if self.tls else Security(None)


def cli(setup: Setup, *args: str, admin: bool = True) -> str:
    """One `dominator` CLI run (a client of the dominator with the admin identity, unless
    not `admin`); its stdout."""
    result = subprocess.run([sys.executable, "-m", "dominator.cli", *args,
                             *(setup.tls_args("admin") if admin else [])], cwd=PROJECT,
                            capture_output=True, text=True, env={**os.environ, **setup.env})
    if result.returncode:
        raise RuntimeError(f"dominator {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


@dataclass
class FakeFleet:
    """The processes of bench.fake_subd serving `count` subs (or echo addresses)."""

    count: int
    mode: str
    setup: Setup
    extra: list[str] = field(default_factory=list)
    port: int = 0
    processes: list[tuple[subprocess.Popen, int]] = field(default_factory=list)

    def start(self) -> FakeFleet:
        self.port = free_port()
        started = time.perf_counter()
        for first in range(0, self.count, PER_PROCESS):
            control = free_port()
            count = min(PER_PROCESS, self.count - first)
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.fake_subd", "--count", str(count), "--first",
                 str(first), "--port", str(self.port), "--base", BASE, "--control-port",
                 str(control), "--mode", self.mode, *self.setup.tls_args("subd"),
                 *self.extra], cwd=PROJECT, stdout=subprocess.PIPE,
                stderr=open(self.setup.work / f"fake-{self.mode}-{first}.log", "ab"))
            self.processes.append((process, control))
        for process, _ in self.processes:
            ready, _, _ = select.select([process.stdout], [], [], 120)
            line = process.stdout.readline().decode() if ready else ""
            if not line.startswith("ready"):
                self.stop()
                raise RuntimeError(f"fake subs did not start ({line!r}); see "
                                   f"{self.setup.work}/fake-*.log")
        log(f"{self.count} {self.mode} addresses up in {time.perf_counter() - started:.1f} s "
            f"({len(self.processes)} process(es))")
        return self

    def addresses(self) -> list[str]:
        return [f"{address(BASE, i)}:{self.port}" for i in range(self.count)]

    def command(self, command: str) -> list[dict]:
        replies = []
        for _, control in self.processes:
            with socket.create_connection(("127.0.0.1", control), timeout=30) as sock:
                sock.sendall(command.encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    piece = sock.recv(1 << 20)
                    if not piece:
                        break
                    data += piece
            replies.append(json.loads(data))
        return replies

    def stats(self) -> dict:
        """Merged counters of every process."""
        parts = self.command("stats")
        images: dict[str, int] = {}
        for part in parts:
            for name, count in part["images"].items():
                images[name] = images.get(name, 0) + count
        gaps = sorted(g for part in parts for g in part["gaps_s"])
        keys = ("polls", "tree_polls", "interval_sum", "intervals", "never_polled", "fetches",
                "updates", "cleanups", "update_errors", "bytes_fetched")
        keys += ("watching", "watch_opens", "watch_refused", "uncovered_now", "touch_pending",
                 "fenced_refusals")
        merged = {key: sum(part[key] for part in parts) for key in keys}
        owners: dict[str, int] = {}
        for part in parts:
            for owner, count in part["fence_owners"].items():
                owners[owner] = owners.get(owner, 0) + count
        merged.update(
            window_s=min(part["window_s"] for part in parts), images=images,
            max_gap_s=max(part["max_gap_s"] for part in parts),
            p50_gap_s=gaps[len(gaps) // 2] if gaps else 0.0,
            p99_gap_s=gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else 0.0,
            min_polls=min(part["min_polls"] for part in parts),
            busiest_second=max(map(sum, zip(*(part["per_second"] for part in parts),
                                            strict=False)), default=0),
            last_update_unix=max(part["last_update_unix"] for part in parts),
            # a sum of each process's worst second: at most this many at once
            max_uncovered=sum(part["max_uncovered"] for part in parts),
            polls_per_sub=[n for part in parts for n in part["polls_per_sub"]],
            touch_latencies=sorted(t for part in parts for t in part["touch_latencies"]),
            fence_owners=owners)
        return merged

    def seen(self) -> dict[str, list[float | None]]:
        """Each sub's first poll and first Watch stream since the last `mark` (unix)."""
        parts = self.command("seen")
        return {key: [t for part in parts for t in part[key]]
                for key in ("first_poll", "first_watch", "fetched", "updated")}

    def images(self) -> dict[str, int]:
        """How many subs hold each image."""
        images: dict[str, int] = {}
        for part in self.command("images"):
            for name, count in part["images"].items():
                images[name] = images.get(name, 0) + count
        return images

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p, _ in self.processes)

    def rss_kib(self) -> int:
        return sum(memory_kib(p.pid)["VmRSS"] for p, _ in self.processes)

    def stop(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.terminate()
        for process, _ in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


def make_images(setup: Setup) -> None:
    """Image `base` (a few small files) and `base-1m` (the same plus one 1 MiB file)."""
    source = setup.work / "image"
    for path, text in [("etc/hostname", "fleet\n"), ("etc/motd", "welcome\n"),
                       ("etc/app/app.conf", "workers = 4\n" * 20),
                       ("usr/bin/app", "#!/bin/sh\necho app\n"),
                       ("usr/share/doc/app/README", "the app\n" * 100)]:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(text)
    cli(setup, "image", "add", "base", str(source))
    blob = source / "opt/blob.bin"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(random.randbytes(BLOB_BYTES))
    cli(setup, "image", "add", "base-1m", str(source))


def mdb_json(path: Path, addresses: list[str], image: str) -> Path:
    path.write_text(json.dumps([
        {"Hostname": f"sub-{i:05d}", "IpAddress": where, "RequiredImage": image,
         "PlannedImage": "", "DisableUpdates": False, "OwnerGroup": "bench", "Tags": {}}
        for i, where in enumerate(addresses)]))
    return path


def fleet_status(client: DominatorClient) -> dominator_pb2.FleetStatus:
    return client.fleet_status(timeout=60)


def wait_synced(stub, count: int, timeout: float, fakes: FakeFleet | None = None,
                image: str = "") -> tuple[float, float]:
    """Block until `fakes` all hold `image` (if given), then every host is synced:
    (seconds until the subs held it, seconds until fleet status said synced)."""
    started = time.perf_counter()
    deadline = started + timeout
    applied = 0.0
    last_report = 0.0
    while time.perf_counter() < deadline:
        if fakes is not None and not applied:
            if fakes.images().get(image, 0) == count:
                applied = time.perf_counter() - started
        if fakes is None or applied:
            reply = fleet_status(stub)
            if reply.hosts == count and reply.hosts_by_status.get("synced", 0) == count:
                return applied, time.perf_counter() - started
        if time.perf_counter() - last_report > 10:
            reply = fleet_status(stub)
            log(f"  {time.perf_counter() - started:.0f} s: {dict(reply.hosts_by_status)}")
            last_report = time.perf_counter()
        time.sleep(0.2)
    reply = fleet_status(stub)
    raise TimeoutError(f"not all {count} hosts synced after {timeout:.0f} s: "
                       f"{dict(reply.hosts_by_status)}")


def client_run(setup: Setup, mode: str, addresses: list[str], window: float) -> dict:
    """The ceiling client (`echo_client`) in its own process; its figures."""
    path = setup.work / f"{mode}-{len(addresses)}.txt"
    path.write_text("\n".join(addresses))
    tls = ["--tls-dir", str(setup.work / "ca/dominator")] if setup.tls else []
    client = subprocess.run(
        [sys.executable, "-m", "bench.fleet_bench", f"--{mode}-client", str(path),
         "--window", str(window), *tls], cwd=PROJECT, capture_output=True, text=True)
    if client.returncode:
        raise RuntimeError(f"{mode} client failed:\n{client.stderr}")
    return json.loads(client.stdout)


@dataclass
class Plan:
    """What every herd run of one benchmark asks for."""

    dominators: int = 1
    mdb_url: str = ""  # a PostgreSQL URL: each herd run gets a fresh database there
    serve_args: list[str] = field(default_factory=list)
    watch: bool = True  # the fake subs serve Watch (else UNIMPLEMENTED: polled)

    @property
    def names(self) -> list[str]:
        return [f"d{i + 1}" for i in range(self.dominators)]

    def tag(self, count: int, tls: bool) -> str:
        """The figures' label: the same as before several dominators for one on SQLite."""
        parts = [f"{count} subs"]
        if self.mdb_url:
            parts.append(f"{self.dominators} dominator{'s' if self.dominators > 1 else ''} "
                         "on PostgreSQL")
        if tls:
            parts.append("mTLS")
        if not self.watch:
            parts.append("no watch")
        return ", ".join(parts)


def fresh_database(url: str, label: str) -> tuple[str, Callable[[], None]]:
    """A new database on the PostgreSQL server of `url`: its URL and how to drop it. When
    none may be created there, the database of `url` itself if it is empty."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    given = sa.make_url(url)
    name = f"fleet_bench_{label}_{os.getpid()}"
    admin = sa.create_engine(given, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as err:
        admin.dispose()
        engine = sa.create_engine(given)
        try:
            tables = sa.inspect(engine).get_table_names()
        finally:
            engine.dispose()
        if tables:
            raise RuntimeError(f"cannot create a database on {describe_url(given)} "
                               f"({str(err).splitlines()[0]}) and its own is not empty: "
                               "give an empty one") from None
        log(f"using the empty database {describe_url(given)} (cannot create one)")
        return url, lambda: None

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    log(f"fresh database {name}")
    return given.set(database=name).render_as_string(hide_password=False), drop


def pg_counters(url: str) -> dict[str, int]:
    """Transactions and rows of the PostgreSQL database at `url` so far (pg_stat_database,
    every session's; a backend reports within a second or so)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(sa.text(
                "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, "
                "tup_updated FROM pg_stat_database WHERE datname = current_database()")).one()
    finally:
        engine.dispose()
    return dict(row._mapping)


def last_grant_unix(url: str) -> float:
    """When the newest shard lease in the database at `url` was granted (Unix time, by
    the database's clock: the same machine's)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return float(connection.execute(sa.text(
                "SELECT extract(epoch FROM max(granted)) FROM shard_leases")).scalar_one())
    finally:
        engine.dispose()


def dominator_daemons(setup: Setup, work: Path, imageserver: str, plan: Plan,
                      url: str) -> dict[str, Daemon]:
    """`dominator serve` d1 .. dN (not started): the SQLite MDB of its state dir when
    `url` is empty, else the PostgreSQL MDB at `url` with shard leases."""
    daemons = {}
    for name in plan.names:
        shared = ["--mdb-url", named_url(url, name), "--lease", LEASE] if url else []
        daemons[name] = Daemon(
            "dominator.cli", ["serve", "--state-dir", str(work / name), "--imageserver",
                              imageserver, "--poll-interval", str(POLL_INTERVAL), "--host",
                              "127.0.0.1", "--http-port", str(free_port()), "--name", name,
                              *shared, *setup.tls_args("dominator"), *plan.serve_args],
            "dominator", free_port(), setup.admin, work / f"{name}.log")
    return daemons


def leases_settled(client: DominatorClient, names: list[str]) -> dict[str, int] | None:
    """Shards held by each of `names` once every shard is held by one of them, no other
    dominator is live and none holds more than its fair share; else None."""
    reply = client.dominators()
    held = {info.name: info.shards for info in reply.dominators}
    fair = math.ceil(reply.shards / len(names))
    if set(held) != set(names) or sum(held.values()) != reply.shards \
            or max(held.values()) > fair:
        return None
    return held


def wait_leases(client: DominatorClient, names: list[str], timeout: float) -> dict[str, int]:
    """Block until the leases settle among `names` (see leases_settled)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if (held := leases_settled(client, names)) is not None:
            return held
        time.sleep(0.5)
    reply = client.dominators()
    raise TimeoutError(f"shard leases not settled among {names} after {timeout:.0f} s: "
                       f"{ {info.name: info.shards for info in reply.dominators} }")


def owners(client: DominatorClient) -> dict[int, str]:
    """Sub index -> the dominator managing it, as `client`'s dominator sees it."""
    return {int(report.hostname.removeprefix("sub-")): report.owner
            for report in client.list_subs()}


def steady(fakes: FakeFleet, daemons: dict[str, Daemon], owned: dict[int, str],
           window: float) -> dict:
    """Every host synced, over `window` s: polls and poll gaps counted by the subs, watch
    coverage, and each dominator's CPU, memory and polls (those of the hosts it owns)."""
    pids = {name: daemon.process.pid for name, daemon in daemons.items()}
    fakes.command("reset")
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    fake_cpu0, t0 = fakes.cpu(), time.perf_counter()
    rss: dict[str, list[int]] = {name: [] for name in pids}
    while time.perf_counter() - t0 < window:
        time.sleep(1)
        for name, pid in pids.items():
            rss[name].append(memory_kib(pid)["VmRSS"])
    elapsed = time.perf_counter() - t0
    stats = fakes.stats()
    per: dict[str, dict] = {}
    for name, pid in pids.items():
        mine = [i for i, owner in owned.items() if owner == name]
        polls = sum(stats["polls_per_sub"][i] for i in mine)
        cores = (cpu_seconds(pid) - cpu0[name]) / elapsed
        per[name] = {"hosts": len(mine), "polls_per_s": polls / elapsed, "cpu_cores": cores,
                     "cpu_us_per_poll": cores * elapsed / polls * 1e6 if polls else math.inf,
                     # with watches hardly any polls: CPU per host managed tells more
                     "cpu_us_per_host_s": cores / len(mine) * 1e6 if mine else math.inf,
                     "rss_mib": statistics.median(rss[name]) / 1024,
                     "hwm_mib": memory_kib(pid)["VmHWM"] / 1024}
    first = per[next(iter(per))]
    count = len(owned)
    return {
        "window_s": elapsed, "polls_per_s_counted": stats["polls"] / elapsed,
        # subs / mean of the intervals seen whole in the window (biased low when
        # intervals approach the window)
        "polls_per_s_from_intervals": count * stats["intervals"] / stats["interval_sum"]
        if stats["intervals"] else 0.0,
        "busiest_second_polls": stats["busiest_second"],
        "max_gap_s": stats["max_gap_s"], "p50_gap_s": stats["p50_gap_s"],
        "p99_gap_s": stats["p99_gap_s"], "min_polls_per_sub": stats["min_polls"],
        "never_polled": stats["never_polled"], "tree_polls": stats["tree_polls"],
        "cleanups": stats["cleanups"],
        "watching": stats["watching"], "watch_opens": stats["watch_opens"],
        "max_uncovered": stats["max_uncovered"],
        "dominator_cpu_cores": first["cpu_cores"],
        "dominator_rss_mib": first["rss_mib"], "dominator_hwm_mib": first["hwm_mib"],
        "dominators": per,
        "subs_cpu_cores": (fakes.cpu() - fake_cpu0) / elapsed,
        "subs_rss_mib": fakes.rss_kib() / 1024,
    }


def changes_seen(fakes: FakeFleet, count: int) -> dict:
    """TOUCH_SHARE of the subs each find a change at a random time over TOUCH_SECONDS:
    seconds from each change to the sub's next poll (what a watch or a poll sees)."""
    fakes.command("reset")
    share = max(1, math.ceil(TOUCH_SHARE * min(count, PER_PROCESS)))
    fakes.command(f"touch {share} {TOUCH_SECONDS}")
    time.sleep(TOUCH_SECONDS)
    deadline = time.perf_counter() + 3 * POLL_INTERVAL + 20
    while (stats := fakes.stats())["touch_pending"] and time.perf_counter() < deadline:
        time.sleep(1)
    seen = stats["touch_latencies"]
    return {"changes": len(seen) + stats["touch_pending"], "unseen": stats["touch_pending"],
            "p50_s": seen[len(seen) // 2] if seen else math.inf,
            "p99_s": seen[min(len(seen) - 1, int(len(seen) * 0.99))] if seen else math.inf,
            "max_s": seen[-1] if seen else math.inf, "tree_polls": stats["tree_polls"]}


def rollout(setup: Setup, fakes: FakeFleet, client: DominatorClient, pid: int, work: Path,
            owned: dict[int, str], url: str) -> dict:
    """Every host's RequiredImage becomes base-1m in one import (through `client`'s
    dominator, whose fleet status must then say every host synced); per dominator, when
    its hosts' first fetch came and their last update."""
    count = len(owned)
    fakes.command("reset")
    counters = pg_counters(url) if url else {}
    before = fleet_status(client)
    cpu0, wall0, t0 = cpu_seconds(pid), time.time(), time.perf_counter()
    cli(setup, "mdb", "import", str(mdb_json(work / "mdb-1m.json", fakes.addresses(),
                                             "base-1m")))
    imported = time.perf_counter() - t0
    _, synced = wait_synced(client, count, max(180, count * 0.06), fakes, "base-1m")
    synced += imported
    after = fleet_status(client)
    stats = fakes.stats()
    seen = fakes.seen()
    by_owner = {}
    for name in sorted(set(owned.values())):
        mine = [i for i, owner in owned.items() if owner == name]
        by_owner[name] = {"first_fetch_s": min(seen["fetched"][i] for i in mine) - wall0,
                          "last_update_s": max(seen["updated"][i] for i in mine) - wall0}
    if url:
        time.sleep(1.5)  # backends report their counts within about a second
        counters = {key: value - counters[key] for key, value in pg_counters(url).items()}
    return {
        "by_dominator": by_owner, "postgresql": counters,
        "import_s": imported,
        "all_applied_s": stats["last_update_unix"] - wall0,
        "all_synced_s": synced,
        "dominator_cpu_cores": (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0),
        "dominator_hwm_mib": memory_kib(pid)["VmHWM"] / 1024,
        "plans_computed": after.diff_cache_misses - before.diff_cache_misses,
        "plan_cache_hits": after.diff_cache_hits - before.diff_cache_hits,
        "full_polls": stats["tree_polls"],
        "fetches": stats["fetches"], "updates": stats["updates"],
        "update_errors": stats["update_errors"], "fenced_refusals": stats["fenced_refusals"],
        "fence_owners": stats["fence_owners"],
        "bytes_fetched_simulated": stats["bytes_fetched"],
    }


def cores_between(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Cores used from `start` to `end`, from (time, CPU seconds) samples: between the
    last sample at or before `start` and the first at or after `end`."""
    before = max((s for s in samples if s[0] <= start), default=samples[0])
    after = min((s for s in samples if s[0] >= end), default=samples[-1])
    return (after[1] - before[1]) / max(after[0] - before[0], 1e-9)


def failover(fakes: FakeFleet, daemons: dict[str, Daemon], client: DominatorClient,
             owned: dict[int, str], count: int, watch: bool, url: str) -> dict:
    """SIGKILL the last dominator: seconds until every host it managed was polled (and
    had a Watch stream opened) by another, until the leases settled among the others
    (when the last was granted, read from the database at `url` once they are), and
    until the first dominator's fleet status said every host synced again, owned by a
    survivor; and the fake subs' CPU while the others polled them (on this one machine
    they, not the dominators, may be what paces the takeover)."""
    names = list(daemons)
    victim, survivors = names[-1], names[:-1]
    hosts = [i for i, owner in owned.items() if owner == victim]
    killed = time.time()
    daemons[victim].kill()
    cpu = [(killed, fakes.cpu())]  # the fake subs' CPU seconds, sampled each round
    fakes.command("mark")  # after its death: no later call can be the victim's
    result: dict = {"victim": victim, "victim_hosts": len(hosts)}
    deadline = time.perf_counter() + 10 * float(LEASE) + 60
    while time.perf_counter() < deadline and not {"polled_s", "leases_s", "synced_s"} <= set(
            result):
        if "polled_s" not in result:
            cpu.append((time.time(), fakes.cpu()))
            seen = fakes.seen()
            polls = [seen["first_poll"][i] for i in hosts]
            watches = [seen["first_watch"][i] for i in hosts] if watch else polls
            if None not in polls and None not in watches:
                result["polled_s"] = max(polls, default=killed) - killed
                result["watched_s"] = max(watches, default=killed) - killed if watch else None
                result["covered_s"] = max((min(p, w) for p, w in zip(polls, watches,
                                                                     strict=True)),
                                          default=killed) - killed
                if len(polls) >= 2:  # the shape of the takeover, not only its last host
                    cuts = statistics.quantiles([p - killed for p in polls], n=10)
                    result["polled_p10_p50_p90_s"] = [round(cuts[i], 2) for i in (0, 4, 8)]
                    result["subs_cpu_cores_while_polled"] = cores_between(
                        cpu, min(polls), max(polls))
        if "leases_s" not in result and (held := leases_settled(client, survivors)):
            result["leases_s"] = last_grant_unix(url) - killed
            result["leases_seen_s"], result["shards_after"] = time.time() - killed, held
        if "leases_s" in result and "synced_s" not in result:
            status = fleet_status(client)
            if status.hosts_by_status.get("synced", 0) == count:
                now = owners(client)
                if victim not in now.values():
                    result["synced_s"] = time.time() - killed
                    result["taken_by"] = {name: sum(1 for i in hosts if now[i] == name)
                                          for name in survivors}
        time.sleep(0.5)
    missing = {"polled_s", "leases_s", "synced_s"} - set(result)
    if missing:
        raise TimeoutError(f"failover not done after {time.time() - killed:.0f} s "
                           f"({sorted(missing)}): "
                           f"{result}; {dict(fleet_status(client).hosts_by_status)}")
    log(f"failover: {json.dumps(result)}")
    return result


def herd(setup: Setup, count: int, window: float, imageserver: str, plan: Plan) -> dict:
    """Steady state, changes seen, rollout (and with several dominators a failover) of
    the dominators over `count` fake subs; with one, the herd's own poll RPC alone (no
    dominator) against the same subs after."""
    work = setup.work / f"herd-{count}"
    work.mkdir()
    reader = ["--client-tls-dir", str(setup.work / "ca/dominator")] if setup.tls else []
    url, drop = (fresh_database(plan.mdb_url, f"{plan.dominators}d_{count}")
                 if plan.mdb_url else ("", lambda: None))
    fakes = FakeFleet(count, "subd", setup, ["--image", "base", "--imageserver", imageserver,
                                             *reader, *([] if plan.watch else ["--no-watch"])])
    daemons: dict[str, Daemon] = {}
    result: dict = {"subs": count, "dominators": plan.dominators}
    try:
        if url:
            cli(setup, "db", "upgrade", "--mdb-url", url, admin=False)
        daemons = dominator_daemons(setup, work, imageserver, plan, url)
        fakes.start()
        for daemon in daemons.values():
            daemon.start()
        started = time.perf_counter()  # every dominator serves
        first = daemons[plan.names[0]]
        setup.env["DOMINATOR_ADDRESS"] = first.address
        client = DominatorClient(first.address, setup.admin)
        if url:
            result["shards"] = wait_leases(client, plan.names, 4 * float(LEASE) + 30)
            result["leases_settled_s"] = time.perf_counter() - started
            log(f"leases settled {result['leases_settled_s']:.1f} s after the last dominator "
                f"served: {result['shards']}")
        started = time.perf_counter()
        cli(setup, "mdb", "import", str(mdb_json(work / "mdb.json", fakes.addresses(), "base")))
        wait_synced(client, count, max(120, count * 0.05))
        result["initial_sync_s"] = time.perf_counter() - started
        log(f"{count} subs synced {result['initial_sync_s']:.1f} s after the import")
        owned = owners(client) if url else dict.fromkeys(range(count), plan.names[0])

        time.sleep(POLL_INTERVAL + 2)  # let the first, bunched cycles spread out
        result["steady"] = steady(fakes, daemons, owned, window)
        result["steady"]["by_status"] = dict(fleet_status(client).hosts_by_status)
        log(f"steady: {json.dumps(result['steady'])}")
        result["changes"] = changes_seen(fakes, count)
        log(f"changes seen: {json.dumps(result['changes'])}")
        result["rollout"] = rollout(setup, fakes, client, first.process.pid, work, owned,
                                    url)
        log(f"rollout: {json.dumps(result['rollout'])}")
        result["fleet_status_cli"] = json.loads(cli(setup, "fleet", "status", "--json"))
        if plan.dominators > 1:
            result["failover"] = failover(fakes, daemons, client, owners(client), count,
                                          plan.watch, url)
        client.close()
        for daemon in daemons.values():
            daemon.stop()
        if plan.dominators == 1:
            fake_cpu0 = fakes.cpu()
            poll = client_run(setup, "poll", fakes.addresses(), min(window, 20))
            poll["server_cpu_cores"] = (fakes.cpu() - fake_cpu0) / poll["total_s"]
            result["poll_ceiling"] = poll
            log(f"poll alone: {json.dumps(poll)}")
    finally:
        for daemon in daemons.values():
            daemon.stop()
        fakes.stop()
        drop()
    return result


def echo_ceiling(setup: Setup, count: int, window: float) -> dict:
    """The plain gRPC echo with the same addresses and concurrency."""
    servers = FakeFleet(count, "echo", setup).start()
    try:
        server_cpu0 = servers.cpu()
        result = client_run(setup, "echo", servers.addresses(), window)
        result["server_cpu_cores"] = (servers.cpu() - server_cpu0) / result["total_s"]
        result["server_rss_mib"] = servers.rss_kib() / 1024
    finally:
        servers.stop()
    log(f"echo: {json.dumps(result)}")
    return result


async def echo_client(addresses: list[str], window: float, security: Security,
                      mode: str) -> dict:
    """Call every address in a loop, POLL_SLOTS calls in flight, for `window` s: a
    plain unary echo (mode "echo"), or the herd's short Poll through AsyncSubClient
    (mode "poll": the herd's RPC without the herd)."""
    import grpc

    from subd.client import AsyncSubClient
    started = time.perf_counter()
    payload = os.urandom(ECHO_PAYLOAD)
    if mode == "echo":
        channels = [open_channel(a, security, "subd", aio=True) for a in addresses]
        echoes = [ch.unary_unary(f"/{ECHO_SERVICE}/Echo") for ch in channels]
        calls = [functools.partial(echo, payload, timeout=30) for echo in echoes]
    else:
        clients = [AsyncSubClient(a, security) for a in addresses]
        channels = [c.channel for c in clients]
        calls = [functools.partial(c.poll, short=True, timeout=30) for c in clients]
    count = 0
    errors = 0
    stop = False

    async def worker(mine: list) -> None:
        nonlocal count, errors
        while not stop:
            for call in mine:
                try:
                    await call()
                    count += 1
                except grpc.RpcError:
                    errors += 1
                if stop:
                    return

    slots = [calls[i::POLL_SLOTS] for i in range(POLL_SLOTS)]
    await asyncio.gather(*(call() for call in calls))  # connect all
    connected = time.perf_counter() - started
    usage0, t0, count = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    tasks = [asyncio.create_task(worker(mine)) for mine in slots if mine]
    await asyncio.sleep(window)
    stop = True
    done, elapsed = count, time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*tasks)
    memory = memory_kib(os.getpid())
    for channel in channels:
        await channel.close()
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    return {"addresses": len(addresses), "connect_s": connected, "window_s": elapsed,
            "total_s": time.perf_counter() - started, "calls_per_s": done / elapsed,
            "errors": errors, "client_cpu_cores": cpu / elapsed,
            "client_cpu_us_per_call": cpu / done * 1e6 if done else math.inf,
            "client_rss_mib": memory["VmRSS"] / 1024, "client_hwm_mib": memory["VmHWM"] / 1024,
            "every_address_every_s": len(addresses) / (done / elapsed) if done else math.inf}


def rows_for(count: int, herd_result: dict, echo: dict | None, tls: bool,
             plan: Plan) -> list[dict]:
    """The table rows of one fleet size: with one dominator the rows of before (and its
    ceilings), then coverage, changes seen, and per dominator and failover figures."""
    steady, rollout, changes = herd_result["steady"], herd_result["rollout"], \
        herd_result["changes"]
    first = steady["dominators"][plan.names[0]]
    counted = steady["polls_per_s_counted"]
    # With watches a settled host is polled at the backstop only: its gap is no goal.
    gap_goal = None if plan.watch else COVERED_SECONDS

    def peer(name: str, key: str) -> tuple[str, float]:
        return (name, echo[key]) if echo else ("-", 0.0)

    rows = [
        ("steady polls/s (all synced)", counted, "/s", *peer("echo", "calls_per_s"), None),
        ("polls in the busiest second (bursts)", steady["busiest_second_polls"], "",
         "mean", counted, None)]
    if echo:
        rows.append(("short Poll alone, calls/s (no herd)",
                     herd_result["poll_ceiling"]["calls_per_s"], "/s", "echo",
                     echo["calls_per_s"], None))
    rows += [
        ("largest interval between 2 polls of a sub", steady["max_gap_s"], "s", "goal",
         COVERED_SECONDS, gap_goal),
        ("p99 interval between 2 polls of a sub", steady["p99_gap_s"], "s", "goal",
         COVERED_SECONDS, gap_goal)]
    if echo:
        poll = herd_result["poll_ceiling"]
        rows += [
            ("dominator CPU, steady (cores)", first["cpu_cores"], "", "echo client",
             echo["client_cpu_cores"], None),
            ("dominator CPU per poll", first["cpu_us_per_poll"], "us", "echo client/call",
             echo["client_cpu_us_per_call"], None),
            ("dominator CPU per host managed, each second", first["cpu_us_per_host_s"], "us",
             "-", 0, None),
            ("short Poll alone, client CPU per call", poll["client_cpu_us_per_call"], "us",
             "echo client/call", echo["client_cpu_us_per_call"], None),
            ("dominator RSS, steady", first["rss_mib"], "MiB", "echo client",
             echo["client_rss_mib"], 1024.0),
            ("dominator peak RSS (VmHWM, whole run)", rollout["dominator_hwm_mib"], "MiB",
             "echo client", echo["client_hwm_mib"], 1024.0)]
    rows += [
        ("roll out a 1 MiB change: all applied", rollout["all_applied_s"], "s", "goal",
         10.0, 10.0 if count <= 1000 else None),
        ("roll out a 1 MiB change: fleet status synced", rollout["all_synced_s"], "s",
         "goal", 10.0, 10.0 if count <= 1000 else None),
        ("diff cache misses during the rollout", rollout["plans_computed"], "",
         "ideal", 2, None),
        ("trees sent for the rollout (full polls)", rollout["full_polls"], "", "ideal",
         2 * plan.dominators, None),
        ("initial sync after mdb import", herd_result["initial_sync_s"], "s", "-", 0, None),
        ("fake subs' CPU, steady (cores, same host)", steady["subs_cpu_cores"], "",
         *peer("echo servers", "server_cpu_cores"), None),
        # the goal "every host within 10 s" with watch streams: at every second, each host
        # has a live stream to its dominator or was polled within the last 10 s
        ("hosts neither watched nor polled within 10 s (worst second)",
         steady["max_uncovered"], "", "goal", 0, 0),
        ("hosts with a Watch stream open (end of steady window)", steady["watching"], "",
         "hosts", count, None),
        ("a change seen: p99 s from a sub's change to its poll", changes["p99_s"], "s",
         "goal", COVERED_SECONDS, COVERED_SECONDS),
        ("a change seen: largest s from a sub's change to its poll", changes["max_s"], "s",
         "goal", COVERED_SECONDS, COVERED_SECONDS),
    ]
    if plan.mdb_url:
        database = rollout["postgresql"]
        rows += [("PostgreSQL commits during the rollout (all dominators)",
                  database["xact_commit"], "", "hosts", count, None),
                 ("PostgreSQL rows read during the rollout",
                  database["tup_returned"] + database["tup_fetched"], "", "hosts", count,
                  None)]
        rows.append(("shard leases settled after the last dominator served",
                     herd_result["leases_settled_s"], "s", "lease", float(LEASE), None))
        for name, figures in steady["dominators"].items():
            rows += [
                (f"{name}: hosts managed", figures["hosts"], "", "fair share",
                 count / plan.dominators, None),
                (f"{name}: polls/s, steady", figures["polls_per_s"], "/s", "-", 0, None),
                (f"{name}: CPU, steady (cores)", figures["cpu_cores"], "", "-", 0, None),
                (f"{name}: CPU per poll", figures["cpu_us_per_poll"], "us", "-", 0, None),
                (f"{name}: CPU per host managed, each second", figures["cpu_us_per_host_s"],
                 "us", "-", 0, None),
                (f"{name}: RSS, steady", figures["rss_mib"], "MiB", "goal", 1024.0, 1024.0),
                (f"{name}: peak RSS (VmHWM)", figures["hwm_mib"], "MiB", "goal", 1024.0,
                 1024.0),
                (f"{name}: rollout, its hosts' first fetch", rollout["by_dominator"][name][
                    "first_fetch_s"], "s", "-", 0, None),
                (f"{name}: rollout, its hosts' last update", rollout["by_dominator"][name][
                    "last_update_s"], "s", "goal", 10.0, None)]
    if "failover" in herd_result:
        failed = herd_result["failover"]
        lease = float(LEASE)
        victim = f"SIGKILL {failed['victim']} ({failed['victim_hosts']} hosts):"
        rows += [
            (f"{victim} all its hosts polled by another", failed["polled_s"], "s", "lease",
             lease, None),
            (f"{victim} leases settled among the others", failed["leases_s"], "s", "lease",
             lease, None),
            (f"{victim} d1's fleet status synced, owners moved", failed["synced_s"], "s",
             "lease", lease, None)]
        if failed["watched_s"] is not None:
            rows.append((f"{victim} all its hosts watched by another", failed["watched_s"],
                         "s", "lease", lease, None))
        if "subs_cpu_cores_while_polled" in failed:
            rows.append((f"{victim} fake subs' CPU while polled (cores, of 2)",
                         failed["subs_cpu_cores_while_polled"], "", "-", 0, None))
    return [{"what": f"{what} [{plan.tag(count, tls)}]", "ours": round(ours, 3),
             "unit": unit, "peer": peer_name, "peer_value": round(peer_value, 3),
             "goal": goal, "met": None if goal is None else ours <= goal}
            for what, ours, unit, peer_name, peer_value, goal in rows]


def print_table(rows: list[dict]) -> None:
    print("\nfleet")
    print(f"{'what':62} {'ours':>12} {'peer':>28} {'goal':>8}")
    for row in rows:
        peer = f"{row['peer']} {row['peer_value']:.3f}{row['unit']}"
        goal = "-" if row["goal"] is None else f"{row['goal']:g}"
        mark = "" if row["met"] is None else ("ok" if row["met"] else "MISSED")
        print(f"{row['what']:62} {row['ours']:10.3f}{row['unit']:<3} {peer:>28} {goal:>8} "
              f"{mark}")


def configuration(work: Path, tls: bool, sizes: list[int], window: float,
                  plan: Plan) -> tuple[list, dict]:
    """Every size with one security setting: rows and raw figures."""
    work.mkdir()
    if tls:
        init_ca(work / "ca")
    setup = Setup(work, tls, Security(None), {})
    setup.admin = setup.security("admin")
    imageserver = Daemon("imageserver.main", ["--state-dir", str(work / "images"),
                                              *setup.tls_args("imageserver")],
                         "imageserver", free_port(), setup.admin, work / "imageserver.log")
    rows, raw = [], {}
    try:
        imageserver.start()
        setup.env["DOMINATOR_IMAGESERVER"] = imageserver.address
        make_images(setup)
        for count in sizes:
            log(f"--- {count} subs ({'mutual TLS' if tls else 'insecure'}) ---")
            herd_result = herd(setup, count, window, imageserver.address, plan)
            # the ceilings do not depend on the dominators: measured with one only
            echo = echo_ceiling(setup, count, min(window, 20)) if plan.dominators == 1 \
                else None
            raw[str(count)] = {"herd": herd_result, "echo": echo}
            rows += rows_for(count, herd_result, echo, tls, plan)
    finally:
        imageserver.stop()
    return rows, raw


def run(sizes: list[int], window: float, security: str, plan: Plan,
        keep_work: bool = False) -> list[dict]:
    """Every configuration asked for; prints the table, saves bench/results/fleet.json
    (one dominator on SQLite; else e.g. fleet-mtls-3dom.json)."""
    limit = raise_nofile()
    results: dict = {"nofile_limit": limit, "cores": os.cpu_count(),
                     "serve_args": plan.serve_args, "dominators": plan.dominators,
                     "postgresql": bool(plan.mdb_url), "watch": plan.watch}
    rows: list[dict] = []
    folder = dict(prefix="bench-fleet-", dir="/var/tmp")
    with (contextlib.nullcontext(tempfile.mkdtemp(**folder)) if keep_work
          else tempfile.TemporaryDirectory(**folder)) as tmp:
        if keep_work:
            log(f"working in {tmp} (kept: the daemons' logs are there)")
        for name in ("insecure", "mtls"):
            if security in (name, "both"):
                more, results[name] = configuration(Path(tmp) / name, name == "mtls", sizes,
                                                    window, plan)
                rows += more
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    name = "fleet" if security == "insecure" else f"fleet-{security}"
    if plan.mdb_url:
        name += f"-{plan.dominators}dom"
    if not plan.watch:
        name += "-nowatch"
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "raw": results}, indent=2))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.fleet_bench`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subs", default="1000,10000", help="Fleet sizes, comma-separated.")
    parser.add_argument("--window", type=float, default=30.0, help="Steady-state seconds.")
    parser.add_argument("--security", choices=["insecure", "mtls", "both"], default="insecure",
                        help="--insecure everywhere (default), mutual TLS, or both in turn.")
    parser.add_argument("--serve-args", default="",
                        help="Extra `dominator serve` flags, e.g. '--fetch-slots 200'.")
    parser.add_argument("--dominators", type=int, default=1,
                        help="Dominators on one PostgreSQL MDB (more than 1 needs --mdb-url).")
    parser.add_argument("--mdb-url",
                        help="A PostgreSQL URL: each fleet size gets a fresh database on its "
                             "server (or, if none may be created, its own, when empty).")
    parser.add_argument("--no-watch", action="store_true",
                        help="The fake subs answer Watch UNIMPLEMENTED (as an older subd): "
                             "every host is polled at the poll interval, as before watches.")
    parser.add_argument("--keep-work", action="store_true",
                        help="Keep the working folder (the daemons' logs) in /var/tmp.")
    parser.add_argument("--echo-client", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--poll-client", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.window < 3 * POLL_INTERVAL and not (args.echo_client or args.poll_client):
        parser.error(f"--window must be at least {3 * POLL_INTERVAL:g} s: the largest interval "
                     "between two polls is only seen in a window of several intervals")
    if args.dominators < 1:
        parser.error("--dominators must be at least 1")
    if args.dominators > 1 and not args.mdb_url:
        parser.error("several dominators share a PostgreSQL MDB: give --mdb-url")
    if args.mdb_url and not args.mdb_url.startswith("postgresql"):
        parser.error("--mdb-url must be a PostgreSQL URL (postgresql+psycopg://...)")
    if args.echo_client or args.poll_client:
        raise_nofile()
        security = Security(Identity.load(Path(args.tls_dir)) if args.tls_dir else None)
        mode = "echo" if args.echo_client else "poll"
        addresses = (args.echo_client or args.poll_client).read_text().split()
        print(json.dumps(asyncio.run(echo_client(addresses, args.window, security, mode))))
        return
    run([int(n) for n in args.subs.split(",")], args.window, args.security,
        Plan(args.dominators, args.mdb_url or "", args.serve_args.split(), not args.no_watch),
        args.keep_work)


if __name__ == "__main__":
    main()
