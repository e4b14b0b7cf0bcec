"""At most N Fetch directives in flight per image server: a host holds a slot of the
server ranked first for it while its fetch runs, so no one replica's egress carries
more hosts at once than the cap; hosts beyond it wait (their status stays 'fetching')."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class ServerSlots:
    """Per-server fetch slots (`cap` 0: no cap, only counted). `in_flight`, `waiting`,
    `peak` (the most in flight at once since start) and `waited` (fetches that found
    every slot taken) are by server address."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.waiting: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()
        self.waited: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def hold(self, server: str) -> AsyncIterator[None]:
        """Hold one of `server`'s slots for the block, waiting for one while it has
        `cap` fetches in flight."""
        semaphore = None
        if self.cap:
            semaphore = self._semaphores.setdefault(server, asyncio.Semaphore(self.cap))
            if semaphore.locked():
                self.waited[server] += 1
            self.waiting[server] += 1
            try:
                await semaphore.acquire()
            finally:
                self.waiting[server] -= 1
        self.in_flight[server] += 1
        self.peak[server] = max(self.peak[server], self.in_flight[server])
        try:
            yield
        finally:
            self.in_flight[server] -= 1
            if semaphore is not None:
                semaphore.release()
