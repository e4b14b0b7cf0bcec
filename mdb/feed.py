"""The MDB change feed: on PostgreSQL a dedicated connection LISTENs on the channel the
MDB's triggers notify at every committed change (mdb/revisions/mdb_0005), in a thread of
its own, and wakes the follower at once; a lost connection is reopened with a backoff
(0.5 s doubling to 10 s), and the follower then makes one backstop read, as notifications
sent meanwhile are lost. The follower still reads on a (long) backstop interval, for
anything missed.
SQLite has no feed: its follower polls the revision as before (`open_feed` is None)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Literal

import psycopg
from sqlalchemy.engine import URL

from fleetlib.sql.engine import CONNECT_TIMEOUT_SECONDS, LIBPQ_LIVENESS, describe_url, error_line

log = logging.getLogger(__name__)

CHANNEL = "fleet_mdb"
# "notified": the MDB changed; "reconnected": the feed was (re)opened and may have missed
# changes; "timeout": nothing within the wait (time for a backstop read).
Wake = Literal["notified", "reconnected", "timeout"]


def conninfo(url: URL) -> str:
    """libpq connection string of a SQLAlchemy postgresql URL (password kept), with the
    connect timeout and the liveness settings of fleetlib.sql.engine unless it sets them."""
    query = {"connect_timeout": str(CONNECT_TIMEOUT_SECONDS), **LIBPQ_LIVENESS,
             **{name: str(value) for name, value in url.query.items()}}
    plain = url.set(drivername="postgresql", query=query)
    return plain.render_as_string(hide_password=False)


class MdbFeed:
    """Notifications of MDB changes for one asyncio follower, from a LISTEN connection
    kept open by a daemon thread. `on_notify` and `on_reconnect` are counted (metrics)
    in that thread (`on_reconnect` at each reopening, not at the first opening)."""

    def __init__(self, url: URL, retry_first: float = 0.5, retry_max: float = 10.0,
                 on_notify: Callable[[], None] = lambda: None,
                 on_reconnect: Callable[[], None] = lambda: None) -> None:
        self.url = url
        self.retry_first, self.retry_max = retry_first, retry_max
        self.on_notify, self.on_reconnect = on_notify, on_reconnect
        self.up = False  # whether the LISTEN connection is open now
        self.revision = -1  # the last revision notified (-1: none yet)
        self._pending: Wake | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the feed (from the event loop that will wait on it)."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="mdb feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the feed; its thread ends within a second."""
        self._stop.set()

    async def wait(self, timeout: float) -> Wake:
        """Until the MDB changed or the feed reopened (whatever came since the last
        call counts, so a burst of changes wakes the follower once), or `timeout`."""
        assert self._event is not None, "start() the feed first"
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return "timeout"
        with self._lock:
            self._event.clear()
            wake, self._pending = self._pending or "notified", None
        return wake

    def _signal(self, wake: Wake) -> None:
        """Wake the follower from the feed's thread ("reconnected" wins over "notified")."""
        with self._lock:
            if self._pending != "reconnected":
                self._pending = wake
        assert self._loop is not None and self._event is not None
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the loop is closed: the follower is gone
            self._stop.set()

    def _run(self) -> None:
        failures, opened = 0, False
        where = describe_url(self.url)
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo(self.url), autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    failures = 0
                    log.info("MDB change feed of %s up (LISTEN %s)", where, CHANNEL)
                    if opened:
                        self.on_reconnect()
                    self.up = opened = True
                    self._signal("reconnected")
                    while not self._stop.is_set():
                        for notify in connection.notifies(timeout=1.0):
                            self.revision = int(notify.payload or -1)
                            self.on_notify()
                            self._signal("notified")
            except (psycopg.Error, OSError, ValueError) as err:
                failures += 1
                text = error_line(err)
                if self.up or failures == 1:
                    log.warning("MDB change feed of %s down (reconnecting; the follower "
                                "falls back to its backstop reads): %s", where, text)
                self.up = False
                self._stop.wait(min(self.retry_max, self.retry_first * 2 ** (failures - 1)))


def open_feed(url: URL, on_notify: Callable[[], None] = lambda: None,
              on_reconnect: Callable[[], None] = lambda: None) -> MdbFeed | None:
    """The change feed of the MDB at `url`: an MdbFeed on PostgreSQL, None elsewhere."""
    if url.get_backend_name() != "postgresql":
        return None
    return MdbFeed(url, on_notify=on_notify, on_reconnect=on_reconnect)
