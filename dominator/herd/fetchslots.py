"""Fetch directives in flight per image server, capped by count and by bytes: a host
holds a slot of the server ranked first for it while its fetch runs, so no one
replica's egress carries more hosts at once than the caps allow; hosts beyond them
wait (their status stays 'fetching'). The byte budget sizes the count to the change:
a 1 MB rollout runs hundreds of fetches per server at once, a 500 MB one a few, each
then at a useful share of the server's egress."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

DEFAULT_FETCHES = 200  # fetches in flight per image server
DEFAULT_BYTES = 2 << 30  # bytes those fetches may ask of one image server at once


class ServerSlots:
    """Per-server fetch slots: at most `cap` fetches and `byte_budget` bytes in flight
    on one server (0: no such cap, only counted; a fetch larger than the budget runs
    alone). `in_flight`, `bytes_in_flight`, `waiting`, `peak` (the most in flight at
    once since start) and `waited` (fetches that had to wait) are by server address."""

    def __init__(self, cap: int, byte_budget: int = 0) -> None:
        self.cap = cap
        self.byte_budget = byte_budget
        self._freed: dict[str, asyncio.Condition] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.bytes_in_flight: collections.Counter[str] = collections.Counter()
        self.waiting: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()
        self.waited: collections.Counter[str] = collections.Counter()

    def _fits(self, server: str, size: int) -> bool:
        count, held = self.in_flight[server], self.bytes_in_flight[server]
        return (not self.cap or count < self.cap) and (
            not self.byte_budget or not count or held + size <= self.byte_budget)

    @contextlib.asynccontextmanager
    async def hold(self, server: str, size: int = 0) -> AsyncIterator[None]:
        """Hold a slot of `server` for a fetch of `size` bytes for the block, waiting
        while the server's caps leave no room for it."""
        freed = self._freed.setdefault(server, asyncio.Condition())
        async with freed:
            if not self._fits(server, size):
                self.waited[server] += 1
                self.waiting[server] += 1
                try:
                    await freed.wait_for(lambda: self._fits(server, size))
                finally:
                    self.waiting[server] -= 1
            self.in_flight[server] += 1
            self.bytes_in_flight[server] += size
            self.peak[server] = max(self.peak[server], self.in_flight[server])
        try:
            yield
        finally:
            async with freed:
                self.in_flight[server] -= 1
                self.bytes_in_flight[server] -= size
                freed.notify_all()
