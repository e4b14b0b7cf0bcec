"""The dominator's /metrics (Prometheus text format) from a registry of its own
(never prometheus_client's global one, so several dominators can share a process).

Two kinds of metrics:
- counters and histograms the herd updates as it polls, fetches and updates
  (`HerdMetrics`, one per Herd: `herd.metrics`);
- gauges computed at scrape time from the herd, its diff cache, the state store
  and the deploy engine (`FleetCollector`): hosts by status, compliant hosts,
  diff cache hits and misses, the fleet-wide switch, deploys by status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dominator.http_app import HttpContext

# Seconds: from a short poll on loopback (a millisecond) to a fetch of gigabytes.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TRANSFER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class Timed:
    """A block counted in `total`, timed into `seconds`, and counted in `failures`
    when it raises an error (a cancellation is no failure). Both a context manager
    and an async one, so it joins an `async with` of semaphores."""

    def __init__(self, total: Counter, failures: Counter, seconds: Histogram) -> None:
        self.total, self.failures, self.seconds = total, failures, seconds
        self.started = 0.0

    def __enter__(self) -> Timed:
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.total.inc()
        self.seconds.observe(time.perf_counter() - self.started)
        if kind is not None and issubclass(kind, Exception):
            self.failures.inc()

    async def __aenter__(self) -> Timed:
        return self.__enter__()

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.__exit__(kind, *rest)


class HerdMetrics:
    """What the herd counts: polls, fetches and updates, their failures and latencies,
    and the bytes subs fetched. The metrics are registered nowhere by themselves: a
    FleetCollector exports them."""

    def __init__(self) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=None)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=None)

        self.polls = counter("dominator_polls", "Polls of subs (short and full).")
        self.poll_errors = counter("dominator_poll_errors", "Polls that failed (RPC error).")
        self.poll_seconds = histogram("dominator_poll_duration_seconds",
                                      "Latency of one poll RPC.", RPC_BUCKETS)
        self.fetches = counter("dominator_fetches",
                               "Fetches a sub was asked to make before an update.")
        self.fetch_failures = counter("dominator_fetch_failures",
                                      "Fetches that failed (RPC error or the sub's error).")
        self.fetch_seconds = histogram("dominator_fetch_duration_seconds",
                                       "Time from asking a sub to fetch until it is done.",
                                       TRANSFER_BUCKETS)
        self.fetched_bytes = counter("dominator_fetched_bytes",
                                     "Object bytes subs fetched for updates that succeeded.")
        self.prefetches = counter("dominator_prefetches",
                                  "Pre-fetches of planned images started on synced subs.")
        self.updates = counter("dominator_updates", "Update RPCs sent to subs.")
        self.update_failures = counter("dominator_update_failures",
                                       "Updates a sub refused or failed.")
        self.update_seconds = histogram("dominator_update_duration_seconds",
                                        "Latency of one update RPC.", TRANSFER_BUCKETS)

    def timed(self, kind: str) -> Timed:
        """Count one `kind` ("poll", "fetch" or "update") around a block (`with` or
        `async with`), its duration, and a failure when the block raises."""
        total, failures, seconds = {
            "poll": (self.polls, self.poll_errors, self.poll_seconds),
            "fetch": (self.fetches, self.fetch_failures, self.fetch_seconds),
            "update": (self.updates, self.update_failures, self.update_seconds),
        }[kind]
        return Timed(total, failures, seconds)

    def collectors(self) -> list[Counter | Histogram]:
        """Every metric, for a collector to export."""
        return [self.polls, self.poll_errors, self.poll_seconds, self.fetches,
                self.fetch_failures, self.fetch_seconds, self.fetched_bytes, self.prefetches,
                self.updates, self.update_failures, self.update_seconds]


def count_deploys(engine: Any) -> dict[str, int]:
    """Deploys by status, every status present: counted in the deploy engine's table
    (dominator/deploy.py keeps one row per deploy with its status)."""
    from dominator.deploy import CANCELED, RUNNING, SUCCEEDED, TERMINAL  # it imports the herd

    counts = dict.fromkeys((RUNNING, SUCCEEDED, TERMINAL, CANCELED), 0)
    with engine.store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, COUNT(*) FROM deploys GROUP BY status"))
        counts.update({status: count for status, count in rows})
    return counts


class FleetCollector(Collector):
    """Scrape-time metrics of one dominator, plus the herd's counters."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self._updates_disabled = False
        self._deploys: dict[str, int] | None = None

    async def refresh(self) -> None:
        """Read what lives in the state store (off the event loop) before a scrape."""
        disabled = await asyncio.to_thread(self.ctx.state.updates_disabled)
        self._updates_disabled = disabled is not None
        engine = getattr(self.ctx, "deploys", None)
        self._deploys = None if engine is None else await asyncio.to_thread(
            count_deploys, engine)

    def collect(self) -> Iterable[Metric]:
        from dominator.herd import Status  # the herd imports this module

        herd = self.ctx.herd
        subs = list(herd.subs.values())
        by_status = {status.value: 0 for status in Status}
        for sub in subs:
            by_status[sub.status.value] = by_status.get(sub.status.value, 0) + 1
        hosts = GaugeMetricFamily("dominator_hosts", "Hosts of the MDB by status.",
                                  labels=["status"])
        for status, count in by_status.items():
            hosts.add_metric([status], count)
        yield hosts
        yield GaugeMetricFamily(
            "dominator_hosts_compliant",
            "Hosts synced to their required image (the rest are deviant).",
            value=sum(1 for sub in subs if sub.status == Status.SYNCED))
        yield GaugeMetricFamily("dominator_updates_disabled",
                                "1 while updates are disabled fleet-wide.",
                                value=int(self._updates_disabled))
        yield CounterMetricFamily("dominator_diff_cache_hits",
                                  "Plans reused from the diff cache.", value=herd.cache.hits)
        yield CounterMetricFamily("dominator_diff_cache_misses",
                                  "Plans computed (diff cache misses).", value=herd.cache.misses)
        if self._deploys is not None:
            deploys = GaugeMetricFamily("dominator_deploys", "Deploys by status.",
                                        labels=["status"])
            for status, count in self._deploys.items():
                deploys.add_metric([status], count)
            yield deploys
        metrics: HerdMetrics | None = getattr(herd, "metrics", None)
        if metrics is not None:
            for metric in metrics.collectors():
                yield from metric.collect()


def metrics_router(ctx: HttpContext) -> APIRouter:
    """GET /metrics: the dominator's metrics in Prometheus text format (open, like the
    dashboard: read-only)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = FleetCollector(ctx)
    registry.register(collector)
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        await collector.refresh()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
