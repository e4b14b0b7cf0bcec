"""Several `dominator serve` on one MDB for tests, each with its HTTP side for cheap
views (its /hosts.json) and the CLI pointed at it."""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, cli, free_port

TOKEN = "test-token"
ELSEWHERE = "managed elsewhere"  # the status of a host another dominator manages


class Dominators:
    """`dominator serve` NAMES on the MDB at URL (not yet started), with lease LEASE
    seconds, a 0.3 s poll interval and EXTRA flags per name."""

    def __init__(self, tmp: Path, ca: Path, url: str, imageserver: Daemon,
                 names: Sequence[str], lease: str,
                 extra: Mapping[str, Sequence[str]] | None = None) -> None:
        self.daemons: dict[str, Daemon] = {}
        self.http: dict[str, str] = {}
        for name in names:
            http_port = free_port()
            self.daemons[name] = Daemon(
                "dominator.cli", ["serve", "--state-dir", str(tmp / name), "--mdb-url", url,
                                  "--imageserver", imageserver.address, "--poll-interval",
                                  "0.3", "--http-port", str(http_port), "--token", TOKEN,
                                  "--tls-dir", str(ca / "dominator"), "--name", name,
                                  "--lease", lease, *(extra or {}).get(name, ())],
                "dominator", free_port(), Security.from_options(str(ca / "admin"), False),
                tmp / f"{name}.log")
            self.http[name] = f"http://127.0.0.1:{http_port}"
        self.env = {"DOMINATOR_TLS_DIR": str(ca / "admin"),
                    "DOMINATOR_IMAGESERVER": imageserver.address}

    def start(self) -> None:
        """Start every dominator, waiting until each serves."""
        for daemon in self.daemons.values():
            daemon.start()

    def stop(self) -> None:
        """Stop every dominator (a SIGSTOPped one is continued first: it ignores SIGTERM)."""
        for daemon in self.daemons.values():
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
            daemon.stop()

    def run(self, name: str, *args: str) -> str:
        """`dominator ARGS...` against dominator `name` (it must succeed)."""
        return cli(*args, env={**self.env, "DOMINATOR_ADDRESS": self.daemons[name].address},
                   check=True).stdout

    def json(self, name: str, *args: str) -> dict[str, Any]:
        """`dominator ARGS... --json` against dominator `name`, decoded."""
        return dict(json.loads(self.run(name, *args, "--json", "--dominator",
                                        self.daemons[name].address)))

    def view(self, name: str) -> dict[str, dict[str, Any]]:
        """Dominator `name`'s hosts by hostname ({} while it does not answer)."""
        try:
            reply = httpx.get(f"{self.http[name]}/hosts.json", timeout=10)
            reply.raise_for_status()
        except httpx.HTTPError:
            return {}
        return {host["hostname"]: host for host in reply.json()["hosts"]}

    def managers(self, among: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """The views of the dominators `among`, by name."""
        return {name: self.view(name) for name in among}

    def managed(self) -> dict[str, dict[str, Any]]:
        """host -> its row in the view of the dominator managing it."""
        rows: dict[str, dict[str, Any]] = {}
        for name in self.daemons:
            rows.update({host: row for host, row in self.view(name).items()
                         if row["owner"] == name})
        return rows
