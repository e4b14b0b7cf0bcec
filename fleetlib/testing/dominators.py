"""Several `dominator serve` on one MDB for tests, each with its HTTP side for cheap
views (its /hosts.json) and the CLI pointed at it. On PostgreSQL each one's database
sessions carry its name as application_name (so a test can end them), and a lease
sampler watches the shard lease table from the first start to the last stop."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fleetlib.rpc.tls import Security
from fleetlib.sql.engine import open_engine, parse_url
from fleetlib.testing.daemons import Daemon, cli, free_port
from fleetlib.testing.fleet import hosts_view
from fleetlib.testing.leases import LeaseSampler

TOKEN = "test-token"
# On its image: an intrusion report is tolerated too (these tests are about who manages
# a host and whether it converges, not about the intrusion signal across a failover).
CONVERGED = ("synced", "intrusion")
# Seconds a dominator may take to serve: three start at once, on a machine that may be
# running other tests too.
START_TIMEOUT = 60.0
# Scheduling slack on a loaded two-core machine, added to the bounds the design gives.
SLACK = 2.0


def manages(name: str, row: Mapping[str, Any]) -> bool:
    """Whether dominator `name`, whose view holds host `row`, manages the host: it names
    itself the owner (the others show the host managed elsewhere, or mirror the
    owner's status)."""
    return bool(row["owner"] == name)


def named_url(url: str, name: str) -> str:
    """`url` with its PostgreSQL sessions named `name` (application_name)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    return parsed.update_query_dict({"application_name": name}).render_as_string(
        hide_password=False)


def end_sessions(url: str, name: str) -> int:
    """pg_terminate_backend every session of the database at `url` named `name`; how
    many were ended."""
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            return sum(1 for (done,) in connection.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :name AND datname = current_database()"),
                {"name": name}) if done)
    finally:
        engine.dispose()


class Dominators:
    """`dominator serve` NAMES on the MDB at URL (not yet started), with lease LEASE
    seconds, a 0.3 s poll interval and EXTRA flags per name. On PostgreSQL `sampler`
    reads the lease table every 100 ms from `start` to `stop`, which checks it."""

    def __init__(self, tmp: Path, ca: Path, url: str, imageserver: Daemon,
                 names: Sequence[str], lease: str,
                 extra: Mapping[str, Sequence[str]] | None = None) -> None:
        self.url = url
        self.lease = float(lease)
        self.sampler: LeaseSampler | None = None
        self.started = 0.0  # time.monotonic() when the first dominator served
        self.daemons: dict[str, Daemon] = {}
        self.http: dict[str, str] = {}
        for name in names:
            http_port = free_port()
            self.daemons[name] = Daemon(
                "dominator.cli", ["serve", "--state-dir", str(tmp / name), "--mdb-url",
                                  named_url(url, name),
                                  "--imageserver", imageserver.address, "--poll-interval",
                                  "0.3", "--http-port", str(http_port), "--token", TOKEN,
                                  "--tls-dir", str(ca / "dominator"), "--name", name,
                                  "--lease", lease, *(extra or {}).get(name, ())],
                "dominator", free_port(), Security.from_options(str(ca / "admin"), False),
                tmp / f"{name}.log", start_timeout=START_TIMEOUT)
            self.http[name] = f"http://127.0.0.1:{http_port}"
        self.env = {"DOMINATOR_TLS_DIR": str(ca / "admin"),
                    "DOMINATOR_IMAGESERVER": imageserver.address}

    def start(self) -> None:
        """Start every dominator, waiting until each serves; on PostgreSQL the sampler
        first (the MDB must be at head: opened once before several dominators race)."""
        if self.sampler is None and parse_url(self.url).get_backend_name() == "postgresql":
            self.sampler = LeaseSampler(self.url).start()
        for daemon in self.daemons.values():
            daemon.start()
            self.started = self.started or time.monotonic()

    def owned_in_time(self, since: float | None = None) -> float:
        """Seconds from `since` (the first start) until the sampler first saw every
        shard owned, asserted within two lease periods (and some slack)."""
        assert self.sampler is not None, "the lease sampler runs on PostgreSQL only"
        since = self.started if since is None else since
        took = self.sampler.all_owned_at(since, 2 * self.lease + SLACK) - since
        assert took <= 2 * self.lease + SLACK, f"every shard owned only after {took:.1f} s"
        return took

    def stop(self) -> None:
        """Stop every dominator (a SIGSTOPped one is continued first: it ignores SIGTERM),
        then the sampler, which asserts that no shard ever had two owners."""
        try:
            for daemon in self.daemons.values():
                if daemon.process is not None and daemon.process.poll() is None:
                    daemon.process.send_signal(signal.SIGCONT)
                daemon.stop()
        finally:
            if self.sampler is not None:
                sampler, self.sampler = self.sampler, None
                sampler.stop()

    def run(self, name: str, *args: str) -> str:
        """`dominator ARGS...` against dominator `name` (it must succeed)."""
        return self.attempt(name, *args, check=True).stdout

    def attempt(self, name: str, *args: str, check: bool = False
                ) -> subprocess.CompletedProcess[str]:
        """`dominator ARGS...` against dominator `name`, as it ended."""
        return cli(*args, env={**self.env, "DOMINATOR_ADDRESS": self.daemons[name].address},
                   check=check)

    def json(self, name: str, *args: str) -> dict[str, Any]:
        """`dominator ARGS... --json` against dominator `name`, decoded."""
        return dict(json.loads(self.run(name, *args, "--json", "--dominator",
                                        self.daemons[name].address)))

    def view(self, name: str) -> dict[str, dict[str, Any]]:
        """Dominator `name`'s hosts by hostname ({} while it does not answer)."""
        return hosts_view(self.http[name], timeout=10)

    def managers(self, among: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """The views of the dominators `among`, by name."""
        return {name: self.view(name) for name in among}

    def managed(self) -> dict[str, dict[str, Any]]:
        """host -> its row in the view of the dominator managing it."""
        rows: dict[str, dict[str, Any]] = {}
        for name in self.daemons:
            rows.update({host: row for host, row in self.view(name).items()
                         if manages(name, row)})
        return rows

    def converged(self, hosts: Sequence[str], image: str, among: Sequence[str]
                  ) -> dict[str, str] | None:
        """host -> its manager when every host of `hosts` is managed by exactly one of
        `among` (the one every view names as owner), synced on `image` there; else None."""
        views = self.managers(among)
        managed: dict[str, str] = {}
        for host in hosts:
            if not all(host in view for view in views.values()):
                return None
            owners = {view[host]["owner"] for view in views.values()}
            managing = [name for name, view in views.items() if manages(name, view[host])]
            if len(owners) != 1 or managing != list(owners):
                return None
            shown = views[managing[0]][host]
            if shown["status"] not in CONVERGED or shown["current_image"] != image:
                return None
            managed[host] = managing[0]
        return managed

    def add_image(self, name: str, base: Path) -> None:
        """Image `name`: the tree at `base` with a file of its own (etc/release), added
        through the first dominator."""
        (base / "etc/release").write_text(f"{name}\n")
        self.run(next(iter(self.daemons)), "image", "add", name, str(base))
