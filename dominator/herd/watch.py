"""Watch streams: how the herd sees changes instead of polling for them (docs/DESIGN.md
"Steady state").

Each sub's loop keeps one Watch stream open to its subd (on the sub's own channel).
subd pushes an event when its generation, scan error or a fetch's or update's
progress changes, and a heartbeat otherwise. The loop cycles (a short poll, and a
full poll only when the generation moved) when an event says the host differs from
what the herd holds or has work in flight, when the host's status is not settled
(anything but synced, intrusion or no image: those cycles go on at the poll interval
as before), or at a slow backstop. A subd that answers Watch with UNIMPLEMENTED (an
older one), or whose stream cannot be kept open, is polled at the poll interval, as
before watches existed. A stream silent for two heartbeats is dead: the sub is polled
once at once and the stream reopened.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc

from dominator.herd.instruments import HerdMetrics
from dominator.herd.status import Status
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.wire import subd_pb2
from mdb.machine import Machine
from subd.client import AsyncSubClient


class WatchedSub(Protocol):
    """What a watch reads and sets of the herd's Sub (dominator/herd/herd.py)."""

    machine: Machine
    status: Status
    generation: int
    last_scan_unix: float
    wake: asyncio.Event


Sub = TypeVar("Sub", bound=WatchedSub)

log = logging.getLogger(__name__)

# Statuses in which nothing happens until the host or the MDB changes (each of those
# wakes the loop): a watched sub in one of them is only polled at the backstop.
SETTLED = frozenset({Status.SYNCED, Status.INTRUSION, Status.NO_IMAGE})


class Reason(enum.StrEnum):
    """Why a sub's loop cycles (label of dominator_polls_by_reason)."""

    FIRST = "first"          # the loop's first cycle
    CHANGED = "changed"      # a watch event: the host differs, or works
    WATCH_LOST = "watch-lost"  # its stream ended or went silent: poll once
    WOKEN = "woken"          # an MDB change, an operator, the herd's own update
    BUSY = "busy"            # not settled: cycles at the poll interval
    BACKSTOP = "backstop"    # settled and watched: the slow safety net
    FALLBACK = "fallback"    # no stream (an older subd, or failing): the poll interval


@dataclass
class WatchConfig:
    """How the herd watches its subs."""

    backstop_interval: float = 300.0  # a settled, watched sub is polled this often
    heartbeat_seconds: int = 30       # asked of subd; two missed: the stream is dead
    retry_first: float = 1.0          # reopening a failed stream; doubles while it fails
    retry_max: float = 60.0
    older_retry: float = 600.0        # a subd without Watch is asked again this rarely


def wants_poll(event: subd_pb2.WatchEvent, generation: int, status: Status,
               previous: subd_pb2.WatchEvent | None) -> bool:
    """Whether a watch event calls for a cycle now: the host's generation is not the
    one the herd holds, a fetch or update runs on it, an update ended since the last
    event, or its scans started failing (a failing host is polled anyway)."""
    return (event.generation != generation or event.fetch_in_progress
            or event.update_in_progress
            or (previous is not None
                and event.last_update_finished_unix != previous.last_update_finished_unix)
            or (bool(event.scan_error) and status != Status.SCAN_FAILED))


def cycle_delay(status: Status, watching: bool, poll_interval: float,
                config: WatchConfig) -> tuple[float, Reason]:
    """How long a sub's loop waits before its next cycle (unless woken), and why."""
    if not watching:
        return poll_interval, Reason.FALLBACK
    if status not in SETTLED:
        return poll_interval, Reason.BUSY
    return config.backstop_interval, Reason.BACKSTOP


def first_cycle_delay(poll_interval: float, first_spread: float | None) -> float:
    """A random wait before a sub loop's first cycle: within `first_spread`, at most
    the poll interval (the whole interval when no spread is given)."""
    spread = poll_interval if first_spread is None else min(poll_interval, first_spread)
    return random.uniform(0, spread)


class HostWatch(Generic[Sub]):
    """One sub's Watch stream and the waits of its loop."""

    def __init__(self, sub: Sub, client: Callable[[Sub], AsyncSubClient],
                 watches: Watches) -> None:
        self.sub = sub
        self.client = client
        self.watches = watches
        self.watching = False
        self.older = False  # its subd has no Watch
        self._woken_by: Reason | None = None
        self._previous: subd_pb2.WatchEvent | None = None
        self._first = True
        self._cycled = False  # events before the first cycle change nothing: it polls
        self._task = asyncio.create_task(self._run(), name=f"watch {sub.machine.hostname}")

    async def stop(self) -> None:
        """End the stream."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._set_watching(False)

    async def next_cycle(self, poll_interval: float, first_spread: float | None = None
                         ) -> Reason:
        """Wait until the sub's next cycle is due (or it is woken); why it is due. The
        first comes at a random moment within `first_spread` (default: the poll
        interval), so hosts starting together are not polled at once."""
        if self._first:
            self._first = False
            delay, reason = first_cycle_delay(poll_interval, first_spread), Reason.FIRST
        else:
            delay, reason = cycle_delay(self.sub.status, self.watching, poll_interval,
                                        self.watches.config)
            delay *= random.uniform(0.9, 1.1)
        wake = self.sub.wake
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()  # a watch event, an MDB change or a fast update
        if wake.is_set():
            reason = self._woken_by or Reason.WOKEN
        wake.clear()
        self._woken_by = None
        self._cycled = True
        self.watches.metrics.polls_by_reason.labels(reason.value).inc()
        return reason

    def _wake(self, reason: Reason) -> None:
        if self._woken_by is None:
            self._woken_by = reason
        self.sub.wake.set()

    def _set_watching(self, watching: bool) -> None:
        if watching != self.watching:
            self.watching = watching
            self.watches.watching += 1 if watching else -1

    async def _run(self) -> None:
        """Keep the stream open; a lost one polls the sub once and is reopened, after
        a backoff while it keeps failing."""
        config = self.watches.config
        retry = config.retry_first
        hostname = self.sub.machine.hostname
        last_error = ""
        while True:
            try:
                await self._stream()
                error = "the stream ended"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    if not self.older:
                        log.info("%s: its subd has no Watch (older): polled every poll "
                                 "interval", hostname)
                    self.older = True
                    await asyncio.sleep(config.older_retry)
                    continue
                error = describe_rpc_error(err)
            except TimeoutError:
                error = f"no heartbeat for {2 * config.heartbeat_seconds} s"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # stop()
                error = "its channel was closed"  # the herd closes it on a new address
            self.older = False
            if self.watching:
                self.watches.metrics.watch_reconnects.inc()
                self._set_watching(False)
                self._wake(Reason.WATCH_LOST)
                retry = config.retry_first
            if error != last_error:
                log.debug("%s: watch stream lost (%s); reopening", hostname, error)
                last_error = error
            await asyncio.sleep(retry * random.uniform(0.5, 1.0))
            retry = min(config.retry_max, retry * 2)

    async def _stream(self) -> None:
        """One stream, until it fails (grpc.RpcError), goes silent (TimeoutError) or
        ends (a return: subd is stopping)."""
        config = self.watches.config
        silence = 2.0 * config.heartbeat_seconds
        request = subd_pb2.WatchRequest(have_generation=self.sub.generation,
                                        heartbeat_seconds=config.heartbeat_seconds)
        call = self.client(self.sub).stub.Watch(request)
        try:
            async with asyncio.timeout(silence):
                await call.initial_metadata()  # subd sends it as it accepts the stream
            if call.done():  # refused: read() raises its error (or sees the end)
                await call.read()
                return
            self._set_watching(True)
            self._previous = None
            while True:
                async with asyncio.timeout(silence):
                    event = await call.read()
                if event is grpc.aio.EOF:
                    return
                self._seen(event)
        finally:
            call.cancel()

    def _seen(self, event: subd_pb2.WatchEvent) -> None:
        sub = self.sub
        if event.last_scan_unix:
            sub.last_scan_unix = event.last_scan_unix
        if self._cycled and wants_poll(event, sub.generation, sub.status, self._previous):
            self._wake(Reason.CHANGED)
        self._previous = event


class Watches:
    """The herd's watch streams: one per sub loop."""

    def __init__(self, config: WatchConfig, metrics: HerdMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.watching = 0  # subs whose stream is open now
        metrics.hosts_watching.set_function(lambda: self.watching)

    def open(self, sub: Sub, client: Callable[[Sub], AsyncSubClient]) -> HostWatch[Sub]:
        """Start watching `sub` (reaching it through `client(sub)`)."""
        return HostWatch(sub, client, self)
