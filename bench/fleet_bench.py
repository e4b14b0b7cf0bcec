"""The fleet figures: one real dominator herding many simulated subs on loopback.

For each fleet size (default 1,000 and 10,000), with a real image server, a real
`dominator serve` (SQLite MDB, `--poll-interval 5`, default slots) and in-memory subs
(`bench/fake_subd.py`, one grpc.aio server per sub on its own address 127.1.x.y):

- steady state, every sub synced: polls/s and the largest interval between two polls
  of one sub (counted by the subs), the dominator's CPU (/proc/PID/stat) and resident
  memory (VmRSS, peak VmHWM) over a window;
- rollout: an image that differs by one 1 MiB file becomes every host's
  RequiredImage in one `dominator mdb import`; time until every sub applied it and
  until `fleet status` shows every host synced. The fake subs do not transfer the
  file: a fetch completes at once (see fake_subd.py), so this is the dominator's own
  pace, not the network's;
- the ceilings, one client process calling every address in a loop with the herd's
  poll concurrency (200): the herd's short Poll through AsyncSubClient against the
  same fake subs with no herd around it, and a plain grpc.aio unary echo on as many
  addresses: calls/s, CPU and memory of that client.

The subs' processes run on the same two cores as the dominator; their CPU is
reported too. `--security mtls|both` runs with mutual TLS (`rpc.certs.init_ca`
identities) instead of, or after, `--insecure`.

`python -m bench.fleet_bench [--subs 1000,10000] [--window 30] [--security both]`
"""

from __future__ import annotations

import argparse
import asyncio
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
from dataclasses import dataclass, field
from pathlib import Path

from bench.fake_subd import ECHO_SERVICE, address
from bench.timing import RESULTS
from dominator.client import DominatorClient
from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Identity, Security, open_channel
from fleetlib.testing.daemons import PROJECT, Daemon, free_port
from fleetlib.wire import dominator_pb2

TICKS = os.sysconf("SC_CLK_TCK")
PER_PROCESS = 5000        # subs per fake_subd process: a listener + a connection each
POLL_INTERVAL = 5.0       # the dominator's --poll-interval
POLL_SLOTS = 200          # the herd's default poll slots: the echo client's concurrency
ECHO_PAYLOAD = 96         # bytes, about a short Poll's reply
BASE = "127.1"
BLOB_BYTES = 1 << 20


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


def cli(setup: Setup, *args: str) -> str:
    """One `dominator` CLI run; its stdout."""
    result = subprocess.run([sys.executable, "-m", "dominator.cli", *args,
                             *setup.tls_args("admin")], cwd=PROJECT, capture_output=True,
                            text=True, env={**os.environ, **setup.env})
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
        merged = {key: sum(part[key] for part in parts) for key in keys}
        merged.update(
            window_s=min(part["window_s"] for part in parts), images=images,
            max_gap_s=max(part["max_gap_s"] for part in parts),
            p50_gap_s=gaps[len(gaps) // 2] if gaps else 0.0,
            p99_gap_s=gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else 0.0,
            min_polls=min(part["min_polls"] for part in parts),
            busiest_second=max(map(sum, zip(*(part["per_second"] for part in parts),
                                            strict=False)), default=0),
            last_update_unix=max(part["last_update_unix"] for part in parts))
        return merged

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


def herd(setup: Setup, count: int, window: float, imageserver: str,
         serve_args: list[str]) -> dict:
    """Steady state and rollout of one dominator over `count` fake subs, then the
    herd's own poll RPC alone (no dominator) against the same subs."""
    work = setup.work / f"herd-{count}"
    work.mkdir()
    reader = ["--client-tls-dir", str(setup.work / "ca/dominator")] if setup.tls else []
    fakes = FakeFleet(count, "subd", setup, ["--image", "base", "--imageserver",
                                             imageserver, *reader]).start()
    dominator = Daemon("dominator.cli",
                       ["serve", "--state-dir", str(work / "state"), "--imageserver",
                        imageserver, "--poll-interval", str(POLL_INTERVAL), "--host",
                        "127.0.0.1", *setup.tls_args("dominator"), *serve_args],
                       "dominator", free_port(), setup.admin, work / "dominator.log")
    result: dict = {"subs": count}
    try:
        dominator.start()
        pid = dominator.process.pid
        setup.env["DOMINATOR_ADDRESS"] = dominator.address
        stub = DominatorClient(dominator.address, setup.admin)
        started = time.perf_counter()
        cli(setup, "mdb", "import", str(mdb_json(work / "mdb.json", fakes.addresses(), "base")))
        _, synced = wait_synced(stub, count, max(120, count * 0.05))
        result["initial_sync_s"] = time.perf_counter() - started
        log(f"{count} subs synced {result['initial_sync_s']:.1f} s after the import")

        time.sleep(POLL_INTERVAL + 2)  # let the first, bunched cycles spread out
        fakes.command("reset")
        cpu0, fake_cpu0, t0 = cpu_seconds(pid), fakes.cpu(), time.perf_counter()
        rss = []
        while time.perf_counter() - t0 < window:
            time.sleep(1)
            rss.append(memory_kib(pid)["VmRSS"])
        elapsed = time.perf_counter() - t0
        stats = fakes.stats()
        status = fleet_status(stub)
        result["steady"] = {
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
            "dominator_cpu_cores": (cpu_seconds(pid) - cpu0) / elapsed,
            "dominator_rss_mib": statistics.median(rss) / 1024,
            "dominator_hwm_mib": memory_kib(pid)["VmHWM"] / 1024,
            "subs_cpu_cores": (fakes.cpu() - fake_cpu0) / elapsed,
            "subs_rss_mib": fakes.rss_kib() / 1024,
            "by_status": dict(status.hosts_by_status),
        }
        log(f"steady: {json.dumps(result['steady'])}")

        before = fleet_status(stub)
        cpu0, wall0, t0 = cpu_seconds(pid), time.time(), time.perf_counter()
        cli(setup, "mdb", "import", str(mdb_json(work / "mdb-1m.json", fakes.addresses(),
                                                 "base-1m")))
        imported = time.perf_counter() - t0
        applied, synced = wait_synced(stub, count, max(180, count * 0.06), fakes, "base-1m")
        synced += imported
        after = fleet_status(stub)
        stats = fakes.stats()
        result["rollout"] = {
            "import_s": imported,
            "all_applied_s": stats["last_update_unix"] - wall0,
            "all_synced_s": synced,
            "dominator_cpu_cores": (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0),
            "dominator_hwm_mib": memory_kib(pid)["VmHWM"] / 1024,
            "plans_computed": after.diff_cache_misses - before.diff_cache_misses,
            "plan_cache_hits": after.diff_cache_hits - before.diff_cache_hits,
            "full_polls": stats["tree_polls"] - result["steady"]["tree_polls"],
            "fetches": stats["fetches"], "updates": stats["updates"],
            "update_errors": stats["update_errors"],
            "bytes_fetched_simulated": stats["bytes_fetched"],
        }
        log(f"rollout: {json.dumps(result['rollout'])}")
        result["fleet_status_cli"] = json.loads(cli(setup, "fleet", "status", "--json"))
        dominator.stop()
        fake_cpu0 = fakes.cpu()
        poll = client_run(setup, "poll", fakes.addresses(), min(window, 20))
        poll["server_cpu_cores"] = (fakes.cpu() - fake_cpu0) / poll["total_s"]
        result["poll_ceiling"] = poll
        log(f"poll alone: {json.dumps(poll)}")
    finally:
        dominator.stop()
        fakes.stop()
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


def rows_for(count: int, herd_result: dict, echo: dict, tls: bool) -> list[dict]:
    """The table rows of one fleet size."""
    steady, rollout = herd_result["steady"], herd_result["rollout"]
    poll = herd_result["poll_ceiling"]
    tag = f"{count} subs{', mTLS' if tls else ''}"
    counted = steady["polls_per_s_counted"]
    cpu_per_poll = steady["dominator_cpu_cores"] / counted * 1e6 if counted else math.inf
    rows = [
        ("steady polls/s (all synced)", counted, "/s", "echo", echo["calls_per_s"], None),
        ("polls in the busiest second (bursts)", steady["busiest_second_polls"], "",
         "mean", steady["polls_per_s_counted"], None),
        ("short Poll alone, calls/s (no herd)", herd_result["poll_ceiling"]["calls_per_s"],
         "/s", "echo", echo["calls_per_s"], None),
        ("largest interval between 2 polls of a sub", steady["max_gap_s"], "s", "goal",
         10.0, 10.0),
        ("p99 interval between 2 polls of a sub", steady["p99_gap_s"], "s", "goal", 10.0,
         10.0),
        ("dominator CPU, steady (cores)", steady["dominator_cpu_cores"], "", "echo client",
         echo["client_cpu_cores"], None),
        ("dominator CPU per poll", cpu_per_poll, "us", "echo client/call",
         echo["client_cpu_us_per_call"], None),
        ("short Poll alone, client CPU per call", poll["client_cpu_us_per_call"], "us",
         "echo client/call", echo["client_cpu_us_per_call"], None),
        ("dominator RSS, steady", steady["dominator_rss_mib"], "MiB", "echo client",
         echo["client_rss_mib"], 1024.0),
        ("dominator peak RSS (VmHWM, whole run)", rollout["dominator_hwm_mib"], "MiB",
         "echo client", echo["client_hwm_mib"], 1024.0),
        ("roll out a 1 MiB change: all applied", rollout["all_applied_s"], "s", "goal",
         10.0, 10.0 if count <= 1000 else None),
        ("roll out a 1 MiB change: fleet status synced", rollout["all_synced_s"], "s",
         "goal", 10.0, 10.0 if count <= 1000 else None),
        ("diff cache misses during the rollout", rollout["plans_computed"], "", "ideal", 2,
         None),
        ("trees sent for the rollout (full polls)", rollout["full_polls"], "", "ideal", 2,
         None),
        ("initial sync after mdb import", herd_result["initial_sync_s"], "s", "-", 0, None),
        ("fake subs' CPU, steady (cores, same host)", steady["subs_cpu_cores"], "",
         "echo servers", echo["server_cpu_cores"], None),
    ]
    return [{"what": f"{what} [{tag}]", "ours": round(ours, 3), "unit": unit, "peer": peer,
             "peer_value": round(peer_value, 3), "goal": goal,
             "met": None if goal is None else ours <= goal}
            for what, ours, unit, peer, peer_value, goal in rows]


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
                  serve_args: list[str]) -> tuple[list, dict]:
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
            herd_result = herd(setup, count, window, imageserver.address, serve_args)
            echo = echo_ceiling(setup, count, min(window, 20))
            raw[str(count)] = {"herd": herd_result, "echo": echo}
            rows += rows_for(count, herd_result, echo, tls)
    finally:
        imageserver.stop()
    return rows, raw


def run(sizes: list[int], window: float, security: str, serve_args: list[str]) -> list[dict]:
    """Every configuration asked for; prints the table, saves bench/results/fleet.json."""
    limit = raise_nofile()
    results: dict = {"nofile_limit": limit, "cores": os.cpu_count(), "serve_args": serve_args}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir="/var/tmp") as tmp:
        for name in ("insecure", "mtls"):
            if security in (name, "both"):
                more, results[name] = configuration(Path(tmp) / name, name == "mtls", sizes,
                                                    window, serve_args)
                rows += more
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    name = "fleet" if security == "insecure" else f"fleet-{security}"
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
    parser.add_argument("--echo-client", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--poll-client", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.window < 3 * POLL_INTERVAL and not (args.echo_client or args.poll_client):
        parser.error(f"--window must be at least {3 * POLL_INTERVAL:g} s: the largest interval "
                     "between two polls is only seen in a window of several intervals")
    if args.echo_client or args.poll_client:
        raise_nofile()
        security = Security(Identity.load(Path(args.tls_dir)) if args.tls_dir else None)
        mode = "echo" if args.echo_client else "poll"
        addresses = (args.echo_client or args.poll_client).read_text().split()
        print(json.dumps(asyncio.run(echo_client(addresses, args.window, security, mode))))
        return
    run([int(n) for n in args.subs.split(",")], args.window, args.security,
        args.serve_args.split())


if __name__ == "__main__":
    main()
