"""Issue 10's replication figure, on the debootstrap trees (A: minbase, B: minbase +
nginx-light, curl, python3-minimal, openssh-server; B shares most of its content with A):
a master holding A and a replica that replicated A; B is added on the master. Measured:

- wall time from B visible on the master to B visible on the replica (both followed
  through WatchImages from this process, so the two clocks are one), and the bytes the
  master sent for it: its `imageserver_served_wire_bytes` (objects as sent, compressed)
  plus B's manifest as GetImage sends it (what rsync's file list is to rsync);
  `served_bytes` (before compression) against the bytes of B's objects A lacks, and the
  replica's own counters (`replicated_bytes`, `pulled_bytes`) in the JSON;
- the operator's alternative in the same run: rsync of the master's object store
  (`<master state>/objects/`) into a copy (untimed; hard links, see `link_copy`) of the
  replica's object store as it was before B, pulled from an rsync daemon on loopback
  (TCP, as the replica's own path is; no ssh on this machine), with `-a
  --ignore-existing --stats`: plain, with `-z`, and with `--fsync` (durable, as the
  replica's objects are: it syncs them before they are visible); bytes are rsync's
  "Total bytes received" (file list included).

Fair to rsync, deliberately: `--ignore-existing` is the best an operator can do with a
content-addressed store (a name that exists holds the same bytes) and skips rsync's
quick check, which would otherwise resend every object whose mtime differs (the
replica wrote its own copies); rsync gets no TLS, and our time is compared with the
faster of its plain and -z runs (neither syncs what it wrote), our bytes with the
smallest; the durable --fsync run is a row of its own. rsync also leaves the replica's image
list untouched, so its "replica" could not serve B yet: the comparison flatters rsync.

The replica starts with a copy of the master's objects (hard links) and replicates A
without moving them; each run restores both servers' state from a snapshot taken with A
replicated (untimed), starts them, waits until the master reports the replica "in sync", then
adds B. Medians of `--runs`.

`nice -n 10 python -m bench.replication [--runs 3] [--json]`
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import click

from bench.imageservers import Cluster, Server, link_copy, log, warm
from bench.timing import RESULTS, Report, timed
from fleetlib.testing.daemons import free_port
from fleetlib.testing.debootstrap import debootstrap_tree
from fleetlib.wire import imageserver_pb2
from imageserver.client import ImageServerClient

NAME = "replication"
RSYNC_MODES = {"plain": [], "z": ["-z"], "fsync": ["--fsync"]}


def note(text: str) -> None:
    log(NAME, text)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Counters that moved, by name."""
    return {name: after[name] - before.get(name, 0.0) for name in after
            if after[name] != before.get(name, 0.0)}


def change_bytes(cluster: Cluster, master: Server) -> tuple[int, int, int]:
    """(bytes of B's objects that A lacks, how many objects, bytes of B's manifest as
    GetImage sends it): what must move at least."""
    with ImageServerClient(master.address, cluster.admin) as client:
        held = client.get_image("a").tree.object_sizes()
        wanted = client.get_image("b").tree.object_sizes()
        manifest = sum(len(chunk.data) for chunk in client.images.GetImage(
            imageserver_pb2.GetImageRequest(name="b")))
    new = {digest: size for digest, size in wanted.items() if digest not in held}
    return sum(new.values()), len(new), manifest


def replicate_once(cluster: Cluster, master: Server, replica: Server,
                   tree_b: Path) -> dict[str, float]:
    """Add B on the master; seconds until the replica shows it and the counters moved."""
    if not cluster.wait_in_sync(master, 1):
        raise RuntimeError("the replica never reported 'in sync' to the master")
    on_master = cluster.watch(master, "b")
    on_replica = cluster.watch(replica, "b")
    master_before, replica_before = master.metrics(), replica.metrics()
    subprocess.run(["sync"], check=True)
    cluster.image_add(master, "b", tree_b)
    added, seen = on_master.wait(), on_replica.wait()
    moved = delta(master.metrics(), master_before)
    replicated = delta(replica.metrics(), replica_before)
    result = {"seconds": seen - added,
              "master_served_wire_bytes": moved.get("imageserver_served_wire_bytes", 0.0),
              "master_served_bytes": moved.get("imageserver_served_bytes", 0.0)}
    result.update({f"replica_{name}": value for name, value in replicated.items()
                   if "replicat" in name or "pulled" in name})
    note(f"replicated B in {result['seconds']:.2f} s: {json.dumps(result)}")
    return result


def rsync_pull(objects: Path, base: Path, dest: Path, flags: list[str]) -> tuple[float, int]:
    """Median seconds and bytes received of rsync pulling OBJECTS from a loopback daemon
    into a fresh copy of BASE (DEST-1, DEST-2...: nothing is removed while measuring)."""
    port = free_port()
    config = dest.parent / "rsyncd.conf"
    config.write_text(f"port = {port}\nuse chroot = no\n[objects]\npath = {objects}\n"
                      "read only = yes\nuid = root\ngid = root\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={config}"])
    received: list[int] = []
    copies: list[Path] = []

    def reset() -> None:
        copies.append(dest.with_name(f"{dest.name}-{len(copies) + 1}"))
        link_copy(base, copies[-1])  # --ignore-existing never writes over an existing file

    def pull() -> None:
        stats = subprocess.run(
            ["rsync", "-a", "--ignore-existing", "--stats", *flags,
             f"rsync://127.0.0.1:{port}/objects/", f"{copies[-1]}/"],
            check=True, capture_output=True, text=True).stdout
        match = re.search(r"Total bytes received: ([\d,.]+)", stats)
        if match is None:
            raise RuntimeError(f"no byte count in rsync's --stats:\n{stats}")
        received.append(int(re.sub(r"[,.]", "", match.group(1))))

    try:
        time.sleep(0.5)  # the daemon binds its port
        seconds = timed(pull, reset=reset)
    finally:
        daemon.terminate()
        daemon.wait()
    return seconds, int(statistics.median(received))


def run(work: Path, runs: int, tree_a: Path, tree_b: Path) -> tuple[Report, dict[str, object]]:
    """Measure; the report and the raw figures."""
    warm(tree_a, tree_b)
    cluster = Cluster(work)
    snapshot = work / "snapshot"
    try:
        note("master: image add a")
        master = cluster.start("master")
        cluster.image_add(master, "a", tree_a)
        note("replica: replicating a")
        replica = cluster.start("replica", "--replicate-from", master.address, seed=master)
        cluster.watch(replica, "a").wait()
        if not cluster.wait_in_sync(master, 1):
            raise RuntimeError("the replica never reported 'in sync' to the master")
        cluster.stop()
        snapshot.mkdir()
        for server in (master, replica):
            (work / server.name).rename(snapshot / server.name)
        results = []
        needed = objects = manifest = 0
        for number in range(runs):
            for server in (master, replica):
                if number:
                    (work / server.name).rename(work / f"{server.name}-run{number}")
                link_copy(snapshot / server.name, work / server.name)
                server.daemon.start()
            note(f"run {number + 1}/{runs}: image add b on the master")
            results.append(replicate_once(cluster, master, replica, tree_b))
            if number == 0:
                needed, objects, manifest = change_bytes(cluster, master)
            cluster.stop()
    finally:
        cluster.stop()
    note("rsync from a loopback daemon: plain, -z, --fsync")
    base = snapshot / "replica/objects"
    rsync = {mode: rsync_pull(work / "master/objects", base, work / f"rsync-{mode}", flags)
             for mode, flags in RSYNC_MODES.items()}
    ours = {key: statistics.median(r.get(key, 0.0) for r in results) for key in results[0]}
    report = Report(NAME)
    fastest = min(("plain", "z"), key=lambda mode: rsync[mode][0])
    smallest = min(rsync, key=lambda mode: rsync[mode][1])
    label = {mode: " ".join(["rsync", *flags, "daemon"]) for mode, flags in RSYNC_MODES.items()}
    report.add("replicate B to a replica holding A (wall)", ours["seconds"], label[fastest],
               rsync[fastest][0], 1.0)
    report.add("the same, against a durable rsync", ours["seconds"], label["fsync"],
               rsync["fsync"][0], 1.0)
    sent = ours["master_served_wire_bytes"] + manifest
    report.add("replicate B, bytes sent (objects+manifest)", sent / 1e6, label[smallest],
               rsync[smallest][1] / 1e6, 1.0, "MB")
    report.add("replicate B, object bytes (uncompressed)", ours["master_served_bytes"] / 1e6,
               "B's objects A lacks", needed / 1e6, 1.0, "MB")
    raw = {"runs": results, "median": ours, "change_bytes": needed, "change_objects": objects,
           "manifest_bytes": manifest,
           "rsync": {mode: {"seconds": s, "bytes_received": b} for mode, (s, b) in rsync.items()}}
    return report, raw


@click.command()
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 9),
              help="Replications of B (each from the same snapshot); the median is shown.")
@click.option("--tree-a", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Tree of image A instead of debootstrap minbase (for a quick try).")
@click.option("--tree-b", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Tree of image B instead of debootstrap minbase-nginx.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--work-dir", default="/var/tmp", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the scratch folder (servers' state, rsync copies) goes.")
def main(runs: int, tree_a: Path | None, tree_b: Path | None, as_json: bool,
         work_dir: Path) -> None:
    """Replicating B to a replica holding A, against rsync of the object store."""
    tree_a = tree_a or debootstrap_tree("minbase")
    tree_b = tree_b or debootstrap_tree("minbase-nginx")
    with tempfile.TemporaryDirectory(prefix="bench-replication-", dir=work_dir) as work:
        report, raw = run(Path(work), runs, tree_a, tree_b)
    save(report, raw, as_json)


def save(report: Report, raw: dict[str, object], as_json: bool) -> None:
    """The table (or, with `as_json`, the JSON) on stdout; both in bench/results/."""
    if not as_json:
        report.print()
    figures = json.dumps({"rows": report.rows, "raw": raw}, indent=2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{report.name}.json").write_text(figures)
    if as_json:
        click.echo(figures)


if __name__ == "__main__":
    main()
