"""The dominator's own durable state, in a SQLite file of its state directory:
the fleet-wide disable switch (who and why), per-host safety clearances,
intrusion reports until acknowledged, last syncs, and every state the dominator
ever asked each host to hold (the memory behind the intrusion signal)."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleetlib.sql.migrate import Migration, migrate

log = logging.getLogger(__name__)


def _create(conn: Connection) -> None:
    conn.execute(sa.text("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"))
    conn.execute(sa.text(
        "CREATE TABLE hosts (hostname TEXT PRIMARY KEY, safety_cleared INTEGER NOT NULL "
        "DEFAULT 0, intrusion_paths TEXT, intrusion_unix INTEGER, last_sync_unix INTEGER, "
        "current_image TEXT)"))
    conn.execute(sa.text(
        "CREATE TABLE desired_images (hostname TEXT NOT NULL, image TEXT NOT NULL, "
        "last_unix INTEGER NOT NULL, PRIMARY KEY (hostname, image))"))
    conn.execute(sa.text(
        "CREATE TABLE desired_computed (hostname TEXT NOT NULL, path TEXT NOT NULL, "
        "hash TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (hostname, path, hash))"))


MIGRATIONS = [Migration(1, "settings, hosts and desired states", _create)]
DISABLED_KEY = "updates_disabled"


@dataclass(frozen=True)
class Disabled:
    """Who switched updates off fleet-wide, why, and when."""

    by: str
    reason: str
    unix: int


@dataclass(frozen=True)
class HostRecord:
    """What the dominator remembers of a host across restarts."""

    safety_cleared: bool = False
    intrusion_paths: tuple[str, ...] = ()
    intrusion_unix: int = 0
    last_sync_unix: int = 0
    current_image: str = ""


SYNC_PERSIST_SECONDS = 60  # how stale the stored last-sync time of a host may get


class DominatorState:
    """Thread-safe access to the state file. This process is its only writer, so
    host records and the switch are also kept in memory: reads never touch the
    disk (they are cheap enough for every poll cycle of every sub), writes go to
    both."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(f"sqlite:///{path}")
        with self.engine.connect() as conn:
            conn.execute(sa.text("PRAGMA journal_mode=WAL"))
        migrate(self.engine, MIGRATIONS)
        self._lock = threading.Lock()
        self._hosts = {row[0]: self._record(row[1:]) for row in self._run(
            "SELECT hostname, safety_cleared, intrusion_paths, intrusion_unix, last_sync_unix, "
            "current_image FROM hosts")}
        rows = self._run("SELECT value FROM settings WHERE key = :k", k=DISABLED_KEY)
        self._disabled = Disabled(**json.loads(rows[0][0])) if rows else None
        self._desired_seen: set[tuple[str, str, frozenset]] = set()
        self._sync_stored: dict[str, int] = {}  # when each host's last sync was stored

    @staticmethod
    def _record(row: tuple) -> HostRecord:
        cleared, paths, intrusion_unix, sync_unix, image = row
        return HostRecord(bool(cleared), tuple(json.loads(paths)) if paths else (),
                          intrusion_unix or 0, sync_unix or 0, image or "")

    def _remember(self, hostname: str, **changes: object) -> None:
        self._hosts[hostname] = replace(self.host(hostname), **changes)

    def _run(self, sql: str, **params: object) -> list[sa.Row]:
        with self._lock, self.engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return list(result) if result.returns_rows else []

    def _ensure_host(self, hostname: str) -> None:
        self._run("INSERT OR IGNORE INTO hosts (hostname) VALUES (:h)", h=hostname)

    # Fleet-wide switch.

    def updates_disabled(self) -> Disabled | None:
        """The switch, when updates are off (from memory)."""
        return self._disabled

    def disable_updates(self, by: str, reason: str) -> Disabled:
        """Stop every update (persists across restarts)."""
        disabled = Disabled(by, reason, int(time.time()))
        self._run("INSERT OR REPLACE INTO settings (key, value) VALUES (:k, :v)",
                  k=DISABLED_KEY, v=json.dumps(disabled.__dict__))
        self._disabled = disabled
        return disabled

    def enable_updates(self) -> None:
        """Allow updates again."""
        self._run("DELETE FROM settings WHERE key = :k", k=DISABLED_KEY)
        self._disabled = None

    # Per host.

    def host(self, hostname: str) -> HostRecord:
        """The host's record (empty when unknown; from memory)."""
        return self._hosts.get(hostname) or HostRecord()

    def safety_cleared(self, hostname: str) -> bool:
        """Whether the next update of the host may delete more than half of it."""
        return self.host(hostname).safety_cleared

    def clear_safety(self, hostname: str) -> None:
        """Let the host's next update through the unsafe-update check, once."""
        self._ensure_host(hostname)
        self._run("UPDATE hosts SET safety_cleared = 1 WHERE hostname = :h", h=hostname)
        self._remember(hostname, safety_cleared=True)

    def consume_safety(self, hostname: str) -> None:
        """The cleared update happened: the check applies again."""
        self._run("UPDATE hosts SET safety_cleared = 0 WHERE hostname = :h", h=hostname)
        self._remember(hostname, safety_cleared=False)

    def intrusion(self, hostname: str) -> tuple[str, ...]:
        """Paths of the unacknowledged intrusion report (empty: none)."""
        return self.host(hostname).intrusion_paths

    def report_intrusion(self, hostname: str, paths: list[str]) -> None:
        """Add paths to the host's intrusion report."""
        known = set(self.intrusion(hostname))
        merged = sorted(known | set(paths))
        if merged == sorted(known):
            return
        self._ensure_host(hostname)
        now = int(time.time())
        self._run("UPDATE hosts SET intrusion_paths = :p, intrusion_unix = :t "
                  "WHERE hostname = :h", p=json.dumps(merged), t=now, h=hostname)
        self._remember(hostname, intrusion_paths=tuple(merged), intrusion_unix=now)
        log.warning("%s: intrusion: %d path(s) in a state never desired, e.g. %s",
                    hostname, len(merged), merged[0])

    def acknowledge_intrusion(self, hostname: str) -> None:
        """An operator saw the report: drop it."""
        self._run("UPDATE hosts SET intrusion_paths = NULL, intrusion_unix = NULL "
                  "WHERE hostname = :h", h=hostname)
        self._remember(hostname, intrusion_paths=(), intrusion_unix=0)

    # Desired states.

    def record_desired(self, hostname: str, image: str,
                       computed: dict[str, tuple[bytes, int]]) -> None:
        """Remember that the host was asked to hold `image` with these computed files."""
        seen = (hostname, image, frozenset(computed.items()))
        if seen in self._desired_seen:
            return
        now = int(time.time())
        with self._lock, self.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT OR REPLACE INTO desired_images (hostname, image, last_unix) "
                "VALUES (:h, :i, :t)"), {"h": hostname, "i": image, "t": now})
            for path, (digest, size) in computed.items():
                conn.execute(sa.text(
                    "INSERT OR IGNORE INTO desired_computed (hostname, path, hash, size) "
                    "VALUES (:h, :p, :d, :s)"),
                    {"h": hostname, "p": path, "d": digest.hex(), "s": size})
        self._desired_seen.add(seen)

    def record_sync(self, hostname: str, image: str,
                    computed: dict[str, tuple[bytes, int]]) -> None:
        """The host holds `image`: a desired state, and its last sync (stored when the
        image changes or the stored time is a minute old; memory is always exact)."""
        self.record_desired(hostname, image, computed)
        now = int(time.time())
        stored = self._sync_stored.get(hostname, 0)
        if self.host(hostname).current_image != image or now - stored >= SYNC_PERSIST_SECONDS:
            self._ensure_host(hostname)
            self._run("UPDATE hosts SET last_sync_unix = :t, current_image = :i "
                      "WHERE hostname = :h", t=now, i=image, h=hostname)
            self._sync_stored[hostname] = now
        self._remember(hostname, last_sync_unix=now, current_image=image)

    def desired_images(self, hostname: str) -> list[str]:
        """Images the host was ever asked to hold, most recent first."""
        rows = self._run("SELECT image FROM desired_images WHERE hostname = :h "
                         "ORDER BY last_unix DESC, image", h=hostname)
        return [row[0] for row in rows]

    def desired_computed(self, hostname: str) -> dict[str, dict[bytes, int]]:
        """Every computed file version the host was asked to hold: path -> {hash: size}."""
        rows = self._run("SELECT path, hash, size FROM desired_computed WHERE hostname = :h",
                         h=hostname)
        versions: dict[str, dict[bytes, int]] = {}
        for path, digest, size in rows:
            versions.setdefault(path, {})[bytes.fromhex(digest)] = size
        return versions
