"""Issue 10's fan-out figure: one master, three replicas in three locations, 300 simulated
hosts in those locations fetching a ~50 MB change (image B = the debootstrap minbase
tree A plus random, incompressible files), against the same hosts fetching it from the
master alone.

Real daemons over mutual TLS (`certs init` identities) on loopback: the master
(`--location r0/dc0`) holds A, each replica (`--replicate-from` the master, `--location
rN/dc1`) has replicated A before B is added (seeded with hard links to the master's
objects: A's objects do not move, its manifest does). A simulated host is subd's own Fetcher
(subd/fetcher.py: CheckObjects then compressed GetObjects, server by server in the
order given, each object verified against its SHA-256) with the host identity, asking
for the change's objects from the list `rank_servers` (dominator/herd/ranking.py) makes
for it: its own location's replica first, the others, the master last. Its cache keeps
nothing (every object is verified and counted, then dropped: 300 copies do not go to the
shared disk). The hosts run as asyncio tasks in `--processes` processes (one location
each by default), at most `--slots` fetches in flight in all, as the dominator's fetch
slots allow (50 in all, 40 per first-ranked image server by default).

The replicas run starts the hosts as soon as `image add b` returned on the master, as
a rollout would: a replica either already replicated B's objects or pulls them through
(`--after-replication`: once every replica shows B).
Figures: the master's egress (`imageserver_served_wire_bytes`, goal under 1.2x one copy
of the change per replica), each replica's share of the bytes the hosts got
(`served_bytes`; goal: the largest within 1.2x of the smallest), and the wall time of the
300 fetches against the master-alone run (which follows it, B already in place), and the
CPU of the busiest image server in each run. Every process shares this machine's cores:
the wall time measures the CPU it all takes here, not three machines' egress.

`nice -n 10 python -m bench.fanout [--hosts 300] [--change-mb 50] [--json]`
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import click

from bench.imageservers import Cluster, Server, log, warm
from bench.replication import delta, save
from bench.timing import Report
from dominator.herd.ranking import ImageServerInfo, rank_servers
from fleetlib.fstree.objectstore import Batch, ObjectStore, ObjectWriter
from fleetlib.rpc.tls import Identity, Security
from fleetlib.testing.daemons import PROJECT
from fleetlib.testing.debootstrap import debootstrap_tree
from subd.fetcher import Fetcher

NAME = "fanout"
REPLICAS = 3
MASTER_LOCATION = "r0/dc0"
SMALLEST, LARGEST = 64 << 10, 4 << 20  # sizes of the change's files (log-uniform)
TICKS = os.sysconf("SC_CLK_TCK")


def note(text: str) -> None:
    log(NAME, text)


# --- a simulated host -----------------------------------------------------------------


class _CountingWriter(ObjectWriter):
    """Hashes and counts an object's bytes; writes nothing."""

    def __init__(self, batch: Batch, digest: bytes, size: int) -> None:  # no file: no super
        self.digest, self.size, self.received = digest, size, 0
        self._batch = batch
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self._hash.update(data)

    def finish(self) -> None:
        if self.received != self.size or self._hash.digest() != self.digest:
            raise RuntimeError(f"object {self.digest.hex()[:12]} arrived wrong")
        self._batch.pending.append(self)

    def abort(self) -> None:
        pass


class _CountingBatch(Batch):
    def begin(self, digest: bytes, size: int) -> ObjectWriter:
        return _CountingWriter(self, digest, size)

    def commit_later(self) -> Future[int]:
        pending, self.pending = self.pending, []
        assert isinstance(self.store, VerifiedCache)
        self.store.held.update(writer.digest for writer in pending)
        done: Future[int] = Future()
        done.set_result(len(pending))
        return done


class VerifiedCache(ObjectStore):
    """A host's object cache that keeps only the hashes of the objects it verified."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, scratch=True)
        self.held: set[bytes] = set()

    def has(self, digest: bytes) -> bool:
        return digest in self.held

    def batch(self) -> Batch:
        return _CountingBatch(self)


async def fetch_hosts(spec: dict[str, Any], servers: list[ImageServerInfo]
                      ) -> list[dict[str, Any]]:
    """Every host of SPEC fetches the change from its ranking of SERVERS, at most
    spec["slots"] at once; what each got, from whom, and how long it took."""
    root = Path(spec["root"])
    security = Security(Identity.load(Path(spec["tls_dir"])))
    hashes = [bytes.fromhex(h) for h in spec["hashes"]]
    slots = asyncio.Semaphore(spec["slots"])

    async def host(name: str, location: str) -> dict[str, Any]:
        async with slots:
            fetcher = Fetcher(root, VerifiedCache(root), security, 100, lambda: None,
                              lambda: None)
            started = time.perf_counter()
            fetcher.start(rank_servers(name, location, servers), hashes)
            await fetcher.wait()
            progress = fetcher.progress
            return {"host": name, "seconds": time.perf_counter() - started,
                    "bytes": progress.bytes_done, "error": progress.error,
                    "by_server": progress.bytes_by_server}

    return await asyncio.gather(*(host(name, location) for name, location in spec["hosts"]))


def worker(spec_path: Path) -> None:
    """A process of simulated hosts: for each line on stdin (a JSON list of servers) the
    hosts fetch once and one JSON line of results goes to stdout."""
    spec = json.loads(spec_path.read_text())
    print("ready", flush=True)
    for line in sys.stdin:
        servers = [ImageServerInfo(**server) for server in json.loads(line)]
        cpu = time.process_time()
        results = asyncio.run(fetch_hosts(spec, servers))
        print(json.dumps({"hosts": results, "cpu_seconds": time.process_time() - cpu}),
              flush=True)


# --- the run ----------------------------------------------------------------------------


def make_change(tree_a: Path, tree_b: Path, total: int) -> tuple[list[str], int]:
    """TREE_B = TREE_A (hard links) plus random files of TOTAL bytes in all under
    /opt/change; their hashes (hex) and the bytes."""
    subprocess.run(["cp", "-al", str(tree_a), str(tree_b)], check=True)
    folder = tree_b / "opt/change"
    folder.mkdir(parents=True)
    rng = random.Random(10)
    hashes: list[str] = []
    written = 0
    while written < total:
        size = min(int(SMALLEST * (LARGEST / SMALLEST) ** rng.random()), total - written)
        data = os.urandom(size)
        (folder / f"{len(hashes):04d}.bin").write_bytes(data)
        hashes.append(hashlib.sha256(data).hexdigest())
        written += size
    return hashes, written


class Hosts:
    """The worker processes holding the simulated hosts."""

    def __init__(self, work: Path, cluster: Cluster, count: int, processes: int, slots: int,
                 hashes: list[str]) -> None:
        hosts = [(f"host{n:03d}", f"r{n * REPLICAS // count + 1}/dc1/rack{n % 4}")
                 for n in range(count)]
        (work / "hosts").mkdir()
        self.processes = []
        for index in range(processes):
            spec = work / f"hosts-{index}.json"
            spec.write_text(json.dumps({
                "hosts": hosts[index * count // processes:(index + 1) * count // processes],
                "slots": slots // processes + (index < slots % processes),
                "hashes": hashes, "root": str(work / "hosts"),
                "tls_dir": str(cluster.work / "ca/subd")}))
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "bench.fanout", "--worker", str(spec)], cwd=PROJECT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for process in self.processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a host process did not start")

    def fetch(self, servers: list[ImageServerInfo]
              ) -> tuple[float, list[dict[str, Any]], float]:
        """Every host fetches once from its ranking of SERVERS: wall seconds, results, CPU
        seconds of the host processes."""
        started = time.perf_counter()
        line = json.dumps([dataclasses.asdict(server) for server in servers]) + "\n"
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(line)
            process.stdin.flush()
        results, cpu = [], 0.0
        for process in self.processes:
            assert process.stdout is not None
            reply = process.stdout.readline()
            if not reply:
                raise RuntimeError("a host process died (its traceback is above)")
            figures = json.loads(reply)
            results.extend(figures["hosts"])
            cpu += figures["cpu_seconds"]
        return time.perf_counter() - started, results, cpu

    def close(self) -> None:
        """End the processes (they exit at the end of their input)."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # stuck mid-fetch after a failure elsewhere
                process.kill()
                process.wait()


def counters(servers: list[Server]) -> dict[str, dict[str, float]]:
    """Each server's metrics, and its CPU seconds as `cpu_seconds`, by server name."""
    figures = {}
    for server in servers:
        assert server.daemon.process is not None
        fields = Path(f"/proc/{server.daemon.process.pid}/stat").read_text().rsplit(")", 1)[1]
        user, system = fields.split()[11:13]
        figures[server.name] = {**server.metrics(),
                                "cpu_seconds": (int(user) + int(system)) / TICKS}
    return figures


def summary(seconds: float, results: list[dict[str, Any]], hosts_cpu: float,
            servers: list[Server], before: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One run's figures: wall time, host times, errors, bytes by server (as the hosts
    counted them and as each server's /metrics moved), each server's CPU."""
    by_server: Counter[str] = Counter()
    for result in results:
        by_server.update(result["by_server"])
    names = {server.address: server.name for server in servers}
    after = counters(servers)
    moved = {server.name: delta(after[server.name], before[server.name]) for server in servers}
    times = sorted(result["seconds"] for result in results)
    errors = [f"{r['host']}: {r['error']}" for r in results if r["error"]]
    return {"seconds": seconds, "host_seconds_median": statistics.median(times),
            "host_seconds_max": times[-1], "errors": len(errors), "first_errors": errors[:3],
            "hosts_bytes_by_server": {names.get(a, a): n for a, n in by_server.items()},
            "served_wire_bytes": {name: m.get("imageserver_served_wire_bytes", 0.0)
                                  for name, m in moved.items()},
            "served_bytes": {name: m.get("imageserver_served_bytes", 0.0)
                             for name, m in moved.items()},
            "cpu_seconds": {"hosts": round(hosts_cpu, 2),
                            **{name: round(m.get("cpu_seconds", 0.0), 2)
                               for name, m in moved.items()}},
            "replicas_moved": {name: {key: value for key, value in m.items()
                                      if "replicat" in key or "pulled" in key}
                               for name, m in moved.items() if name != "master"}}


def run(work: Path, tree_a: Path, hosts_count: int, change: int, processes: int, slots: int,
        wait: bool) -> tuple[Report, dict[str, Any]]:
    """Measure (the hosts start once B is on every replica when WAIT, else at once); the
    report and the raw figures."""
    warm(tree_a)
    hashes, change = make_change(tree_a, work / "tree-b", change)
    cluster = Cluster(work)
    hosts: Hosts | None = None
    try:
        note("master: image add a")
        master = cluster.start("master", "--location", MASTER_LOCATION)
        cluster.image_add(master, "a", tree_a)
        replicas = [cluster.start(f"replica{n}", "--replicate-from", master.address,
                                  "--location", f"r{n}/dc1", seed=master)
                    for n in range(1, REPLICAS + 1)]
        note("replicas: replicating a")
        for watch in [cluster.watch(replica, "a") for replica in replicas]:
            watch.wait()
        if not cluster.wait_in_sync(master, REPLICAS):
            raise RuntimeError("the replicas never all reported 'in sync' to the master")
        hosts = Hosts(work, cluster, hosts_count, processes, slots, hashes)
        everyone = [master, *replicas]
        ranked = [ImageServerInfo(master.address, MASTER_LOCATION, True),
                  *(ImageServerInfo(r.address, f"r{n}/dc1") for n, r in enumerate(replicas, 1))]
        note(f"replicas: image add b, then {hosts_count} hosts fetch {change / 1e6:.1f} MB")
        watches = [cluster.watch(replica, "b") for replica in replicas]
        before = counters(everyone)
        cluster.image_add(master, "b", work / "tree-b")
        added = time.perf_counter()

        def seen() -> list[float]:  # seconds from the add's return to B on each replica
            return [round(watch.wait() - added, 3) for watch in watches]

        visible = seen() if wait else None
        runs = {"replicas": summary(*hosts.fetch(ranked), everyone, before)}
        runs["replicas"]["b_visible_on_replicas_after"] = seen() if visible is None else visible
        note(f"replicas: {json.dumps(runs['replicas'])}")
        note(f"master alone: {hosts_count} hosts fetch the change")
        before = counters(everyone)
        runs["master alone"] = summary(*hosts.fetch(ranked[:1]), everyone, before)
        note(f"master alone: {json.dumps(runs['master alone'])}")
    finally:
        if hosts is not None:
            hosts.close()
        cluster.stop()
    return table(runs, change, hosts_count), {"change_bytes": change, "objects": len(hashes),
                                                "hosts": hosts_count, "slots": slots,
                                                "after_replication": wait, "runs": runs}


def table(runs: dict[str, Any], change: int, hosts: int) -> Report:
    """The table: master egress, replica shares, time against the master alone."""
    spread, alone = runs["replicas"], runs["master alone"]
    shares = [spread["served_bytes"][f"replica{n}"] for n in range(1, REPLICAS + 1)]
    result = Report(NAME)
    result.add(f"master egress, {hosts} hosts via {REPLICAS} replicas",
               spread["served_wire_bytes"]["master"] / 1e6, f"{REPLICAS} copies of the change",
               REPLICAS * change / 1e6, 1.2, "MB")
    result.add("largest replica share / smallest", max(shares) / 1e6, "smallest share",
               min(shares) / 1e6, 1.2, "MB")
    result.add(f"{hosts} hosts fetch the change (wall)", spread["seconds"], "from master alone",
               alone["seconds"], 1.0)
    busiest = max(seconds for name, seconds in spread["cpu_seconds"].items() if name != "hosts")
    result.add("busiest image server's CPU, via replicas", busiest, "master alone's",
               alone["cpu_seconds"]["master"], 1.0)
    result.add("master egress, master alone", alone["served_wire_bytes"]["master"] / 1e6,
               f"{hosts} copies of the change", hosts * change / 1e6, 1.0, "MB")
    return result


@click.command()
@click.option("--hosts", "hosts_count", default=300, show_default=True,
              type=click.IntRange(REPLICAS), help="Simulated hosts (a third per location).")
@click.option("--change-mb", default=50.0, show_default=True, type=click.FloatRange(0.1),
              help="Size of the change B adds over A, MB of random files.")
@click.option("--processes", default=REPLICAS, show_default=True, type=click.IntRange(1, 16),
              help="Processes the hosts run in (asyncio tasks in each).")
@click.option("--slots", default=40, show_default=True, type=click.IntRange(1),
              help="Fetches in flight at once, over all processes.")
@click.option("--tree-a", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Tree of image A instead of debootstrap minbase (for a quick try).")
@click.option("--after-replication", is_flag=True,
              help="Start the hosts once every replica shows B, not as soon as it is added.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--work-dir", default="/var/tmp", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the scratch folder (servers' state, tree B) goes.")
@click.option("--worker", "worker_spec", type=click.Path(dir_okay=False, path_type=Path),
              hidden=True)
def main(hosts_count: int, change_mb: float, processes: int, slots: int, tree_a: Path | None,
         after_replication: bool, as_json: bool, work_dir: Path, worker_spec: Path | None
         ) -> None:
    """Hosts in three locations fetching a change via three replicas, against the master
    alone."""
    if worker_spec is not None:
        worker(worker_spec)
        return
    tree_a = tree_a or debootstrap_tree("minbase")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-", dir=work_dir) as work:
        report, raw = run(Path(work), tree_a, hosts_count, int(change_mb * 1e6),
                          min(processes, hosts_count), max(slots, processes), after_replication)
    save(report, raw, as_json)


if __name__ == "__main__":
    main()
