"""A whole fleet under test, with real daemons on loopback and mutual TLS
everywhere: the caller's image server, a dominator (HTTP API on, with a token)
and N subd on temporary roots, plus the CLI environment that reaches them."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, cli, free_port
from fleetlib.testing.trees import make_tree

HOSTS = 5
POLL = "0.3"
TOKEN = "test-token"

def hosts_view(base: str, timeout: float = 30) -> dict[str, dict[str, Any]]:
    """The hosts the dominator whose HTTP side is at `base` shows on /hosts.json, by
    hostname; {} while it does not answer."""
    try:
        reply = httpx.get(f"{base}/hosts.json", timeout=timeout)
        reply.raise_for_status()
    except httpx.HTTPError:
        return {}
    return {host["hostname"]: host for host in reply.json()["hosts"]}

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    """Poll `condition` until it returns something true; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting until {what}")


def names(*indexes: int) -> list[str]:
    """Hostnames of the fleet's hosts by number: host-1, host-2, ..."""
    return [f"host-{i}" for i in indexes]


class FleetUnderTest:
    """The daemons and the CLI environment of one fleet of `hosts` subd."""

    def __init__(self, tmp_path: Path, ca: Path, imageserver: Daemon,
                 start_subd: Callable[[Path], Daemon], hosts: int = HOSTS,
                 serve_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp_path
        self.ca = ca
        self.http_port = free_port()
        self.generators = tmp_path / "generators"
        self.generators.mkdir()
        (self.generators / "hostname.j2").write_text("{{ hostname }} {{ tags['rack'] }}\n")
        self.dominator = Daemon(
            "dominator.cli", ["serve", "--state-dir", str(tmp_path / "dominator"),
                              "--imageserver", imageserver.address, "--generators",
                              str(self.generators), "--poll-interval", POLL,
                              "--http-port", str(self.http_port), "--token", TOKEN,
                              "--tls-dir", str(ca / "dominator"), *serve_args],
            "dominator", free_port(), Security.from_options(str(ca / "admin"), False),
            tmp_path / "dominator.log")
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.env = {"DOMINATOR_TLS_DIR": str(ca / "admin"),
                    "DOMINATOR_IMAGESERVER": imageserver.address,
                    "DOMINATOR_ADDRESS": self.dominator.address,
                    "DOMINATOR_URL": self.base, "DOMINATOR_TOKEN": TOKEN}
        self.names = names(*range(1, hosts + 1))
        self.roots = [tmp_path / name for name in self.names]
        self.subs: list[Daemon] = []
        for root in self.roots:
            root.mkdir()
            self.subs.append(start_subd(root))
        self.dominator.start()

    def root(self, name: str) -> Path:
        """The root folder of host `name`."""
        return self.roots[self.names.index(name)]

    def sub(self, name: str) -> Daemon:
        """The subd of host `name`."""
        return self.subs[self.names.index(name)]

    def run(self, *args: str) -> str:
        """Run `dominator ARGS...` against this fleet; its output (it must succeed)."""
        return cli(*args, env=self.env, check=True).stdout

    def hosts(self) -> dict[str, dict[str, Any]]:
        """`dominator fleet list --json`, by hostname."""
        return {h["hostname"]: h for h in json.loads(self.run("fleet", "list", "--json"))}

    def shown(self) -> dict[str, dict[str, Any]]:
        """Every host as the dashboard's /hosts.json shows it (`fleet list --json`'s
        fields and more), by hostname; {} while the dominator does not answer. Waits poll
        this: a request, where each CLI run costs seconds of CPU."""
        return hosts_view(self.base)

    def wait_status(self, names: list[str], status: str, image: str | None = None,
                    timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Wait until every host of `names` has `status` (and holds `image`) in
        `fleet list --json`, polled through shown() and confirmed by the CLI; returns the
        CLI's hosts."""
        def holds(hosts: dict[str, dict[str, Any]]) -> bool:
            return all(name in hosts and hosts[name]["status"] == status
                       and (image is None or hosts[name]["current_image"] == image)
                       for name in names)

        def reached() -> dict[str, dict[str, Any]] | None:
            if not holds(self.shown()):
                return None
            hosts = self.hosts()
            return hosts if holds(hosts) else None
        return wait_for(reached, f"{names} are {status}", timeout)

    def stop(self) -> None:
        """Stop the dominator (the caller owns the image server and the subd)."""
        self.dominator.stop()


def add_images(fleet: FleetUnderTest) -> None:
    """v1 (every inode kind, a computed /etc/hostname, a `certs` trigger), v2 (a new
    file, a new certificate and 80 MiB more: long enough a fetch to interrupt) and
    `tiny` (which would wipe a host: the safety check stops it)."""
    v1 = make_tree(fleet.tmp / "v1")
    (fleet.tmp / "computed.json").write_text(
        '[{"Filename": "/etc/hostname", "Source": "hostname.j2"}]')
    (fleet.tmp / "triggers.json").write_text(
        '[{"MatchLines": ["/etc/ssl/.*"], "Service": "certs"}]')
    fleet.run("image", "add", "v1", str(v1), "--computed-files",
              str(fleet.tmp / "computed.json"), "--triggers", str(fleet.tmp / "triggers.json"))
    (v1 / "etc/ssl/cert.pem").write_bytes(os.urandom(4000))
    (v1 / "usr/bin/new-in-v2").write_text("v2\n")
    with open(v1 / "var/lib/big-in-v2", "wb") as f:  # long enough a fetch to interrupt
        for _ in range(80):
            f.write(os.urandom(1 << 20))
    fleet.run("image", "add", "v2", str(v1), "--computed-files",
              str(fleet.tmp / "computed.json"), "--triggers", str(fleet.tmp / "triggers.json"))
    tiny = fleet.tmp / "tiny"
    (tiny / "etc").mkdir(parents=True)
    (tiny / "etc/issue").write_text("tiny\n")
    fleet.run("image", "add", "tiny", str(tiny))
