"""What the replication and fan-out benchmarks share: a CA (`certs init`), image servers
(a master and its replicas) as real daemons over mutual TLS with their Prometheus
metrics, the CLI pointed at one of them, and waiting for an image to become visible."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, cli, free_port, imageserver_daemon
from fleetlib.wire import imageserver_pb2
from imageserver.client import ImageServerClient

SYNC_TIMEOUT = 120.0


def log(bench: str, text: str) -> None:
    """A progress line on stderr (stdout carries the table or the JSON)."""
    print(f"[{bench} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class Server:
    """One image server daemon and the port of its /metrics."""

    name: str
    daemon: Daemon
    metrics_port: int

    @property
    def address(self) -> str:
        return self.daemon.address

    def metrics(self) -> dict[str, float]:
        """Every sample of its /metrics by name (counters without their `_total`)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels and not sample.name.endswith("_created"):
                    values[sample.name.removesuffix("_total")] = sample.value
        return values


@dataclass
class Cluster:
    """A CA in WORK/ca and the image servers started under WORK (stopped by `stop`)."""

    work: Path
    servers: list[Server] = field(default_factory=list)

    def __post_init__(self) -> None:
        init_ca(self.work / "ca")
        self.admin = Security.from_options(str(self.work / "ca/admin"), insecure=False)

    def start(self, name: str, *flags: str, seed: Server | None = None) -> Server:
        """Start image server NAME (state in WORK/NAME) with extra FLAGS; with SEED, its
        object store starts as a copy of SEED's (`link_copy`), so a replica of SEED
        replicates what SEED holds without moving objects."""
        if seed is not None:
            (self.work / name).mkdir()
            link_copy(self.work / seed.name / "objects", self.work / name / "objects")
        metrics_port = free_port()
        daemon = imageserver_daemon(self.work / name, self.work / "ca",
                                    self.work / f"{name}.log", "--metrics-port",
                                    str(metrics_port), *flags)
        server = Server(name, daemon.start(), metrics_port)
        self.servers.append(server)
        return server

    def stop(self) -> None:
        """Stop every server (graceful)."""
        for server in self.servers:
            server.daemon.stop()

    def image_add(self, server: Server, name: str, tree: Path) -> None:
        """`dominator image add NAME TREE` against SERVER, as an operator runs it."""
        cli("image", "add", name, str(tree), check=True,
            env={"DOMINATOR_TLS_DIR": str(self.work / "ca/admin"),
                 "DOMINATOR_IMAGESERVER": server.address})

    def watch(self, server: Server, image: str, timeout: float = 1800) -> Watch:
        """Start noting when IMAGE becomes visible on SERVER (follows WatchImages)."""
        return Watch(server.address, self.admin, image, timeout)

    def wait_in_sync(self, master: Server, replicas: int) -> bool:
        """Until MASTER reports REPLICAS replicas connected and "in sync" (ListReplicas);
        False if it never did within SYNC_TIMEOUT."""
        deadline = time.monotonic() + SYNC_TIMEOUT
        with ImageServerClient(master.address, self.admin) as client:
            while time.monotonic() < deadline:
                reply = client.images.ListReplicas(imageserver_pb2.ListReplicasRequest(),
                                                   timeout=10)
                ready = [r for r in reply.replicas if r.connected and r.state == "in sync"]
                if len(ready) >= replicas:
                    return True
                time.sleep(0.2)
        return False


class Watch:
    """A thread waiting for an image on one server; `.seen` is its time.perf_counter()."""

    def __init__(self, address: str, security: Security, image: str, timeout: float) -> None:
        self.seen: float | None = None
        self.error = ""
        self._thread = threading.Thread(target=self._run,
                                        args=(address, security, image, timeout), daemon=True)
        self._thread.start()

    def _run(self, address: str, security: Security, image: str, timeout: float) -> None:
        try:
            with ImageServerClient(address, security) as client:
                if client.wait_for_image(image, timeout):
                    self.seen = time.perf_counter()
                else:
                    self.error = f"{image} not visible on {address} after {timeout:g} s"
        except grpc.RpcError as err:
            self.error = f"{address}: {err}"

    def wait(self) -> float:
        """When the image was seen; RuntimeError if it never was."""
        self._thread.join()
        if self.seen is None:
            raise RuntimeError(self.error)
        return self.seen


def link_copy(source: Path, dest: Path) -> None:
    """A copy at DEST (new) of SOURCE, an image server's state folder or an object store,
    whose object files are hard links and everything else real copies. Objects are never
    changed in place (written under a temporary name, renamed), so the copy behaves as a
    `cp -a` one would, but costs no data to make nor to remove: on this machine's disk
    every freed block is a discard, and removing 10,000 objects takes minutes."""
    if source.name == "objects":
        subprocess.run(["cp", "-al", str(source), str(dest)], check=True)
        return
    dest.mkdir()
    for entry in source.iterdir():
        if entry.name == "objects":
            link_copy(entry, dest / entry.name)
        else:
            subprocess.run(["cp", "-a", str(entry), str(dest / entry.name)], check=True)


def warm(*trees: Path) -> None:
    """Read every file once so the first measured run is not billed for a cold cache."""
    for tree in trees:
        # through a pipe: GNU tar reads no file content when the archive is /dev/null
        subprocess.run(f"tar -cf - -C '{tree}' . | cat >/dev/null", shell=True, check=True)
