"""subd's Watch stream (docs/DESIGN.md "Steady state"): what the dominator decides on
(the generation, the scan error, a fetch's or update's progress) pushed as it changes,
with heartbeats in between, so an idle host costs its dominator no polls.

Changes come from the scanner's thread and from the event loop; `Watchers.changed`
may be called from either and wakes every stream through an asyncio event (no timer
polls). A stream sends only when its snapshot differs from the last one it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from fleetlib.wire import subd_pb2

log = logging.getLogger(__name__)

MAX_WATCHERS = 16  # a dominator needs one (a few while shards move between dominators)
DEFAULT_HEARTBEAT_SECONDS = 30
MAX_HEARTBEAT_SECONDS = 600


def heartbeat_seconds(requested: int) -> int:
    """The heartbeat interval a request gets: 0 means the default, others are bounded
    to 1 .. MAX_HEARTBEAT_SECONDS."""
    if not requested:
        return DEFAULT_HEARTBEAT_SECONDS
    return max(1, min(MAX_HEARTBEAT_SECONDS, requested))


def changed_since(sent: subd_pb2.WatchEvent, now: subd_pb2.WatchEvent) -> bool:
    """Whether `now` tells a watcher something `sent` did not (scan counts and times
    rise on every pass: they travel with the next event, not on their own)."""
    return (sent.generation, sent.scan_error, sent.fetch_in_progress,
            sent.update_in_progress, sent.last_update_finished_unix) != (
        now.generation, now.scan_error, now.fetch_in_progress, now.update_in_progress,
        now.last_update_finished_unix)


class Watchers:
    """The open Watch streams of one subd, at most `limit` of them."""

    def __init__(self, snapshot: Callable[[], subd_pb2.WatchEvent],
                 limit: int = MAX_WATCHERS) -> None:
        self.snapshot = snapshot
        self.limit = limit
        self.count = 0
        self.refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first stream
        self._event = asyncio.Event()

    def changed(self) -> None:
        """Something a watcher reports may have changed: wake every stream. Safe from
        any thread; a no-op before the first stream and after the loop closed."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: subd is stopping
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def stream(self, request: subd_pb2.WatchRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[subd_pb2.WatchEvent]:
        """One watcher's events: at once when its generation differs, then on every
        change, and a heartbeat after `heartbeat_seconds` without one. Beyond `limit`
        open streams the call fails with RESOURCE_EXHAUSTED."""
        if self.count >= self.limit:
            self.refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"subd serves at most {self.limit} Watch streams at once; "
                                "poll instead")
        self._loop = asyncio.get_running_loop()
        self.count += 1
        interval = heartbeat_seconds(request.heartbeat_seconds)
        loop = self._loop
        try:
            await context.send_initial_metadata(())  # the caller knows it is accepted
            wake = self._event
            sent = self.snapshot()
            if sent.generation != request.have_generation:
                yield sent
            beat = loop.time() + interval
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(beat):
                        await wake.wait()
                wake = self._event  # taken before the snapshot: no change slips between
                now = self.snapshot()
                if changed_since(sent, now):
                    yield now
                elif loop.time() >= beat:  # nothing new for a whole interval: say alive
                    now.heartbeat = True
                    yield now
                else:
                    continue  # woken for something no watcher is told about
                sent, beat = now, loop.time() + interval
        finally:
            self.count -= 1
