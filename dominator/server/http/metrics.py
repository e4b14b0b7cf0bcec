"""The dominator's /metrics (Prometheus text format) from a registry of its own
(never prometheus_client's global one, so several dominators can share a process).

Two kinds of metrics:
- counters and histograms the herd updates as it polls, fetches and updates
  (`HerdMetrics`, one per Herd: `herd.metrics`);
- gauges computed at scrape time from the herd, its diff cache, the state store
  and the deploy engine (`FleetCollector`): hosts by status, compliant hosts,
  diff cache hits and misses, the fleet-wide switch, deploys by status, fetches in
  flight per image server and each replica's lag, bytes and state (from the last
  walk of the master's replicas, refreshed in the background: no scrape waits on it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from dominator.deploy.model import DeployStatus
from dominator.herd.instruments import HerdMetrics, imageserver_metrics
from dominator.herd.replicas import ReplicaTree
from dominator.herd.status import Status
from dominator.server.http.context import HttpContext

log = logging.getLogger(__name__)


class FleetCollector(Collector):
    """Scrape-time metrics of one dominator, plus the herd's counters."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self._updates_disabled = False
        self._deploys: dict[DeployStatus, int] | None = None
        self._replicas: ReplicaTree | None = None

    async def refresh(self) -> None:
        """Read what lives in the state store (off the event loop) before a scrape."""
        self._replicas = self.ctx.herd.servers.known()
        disabled = await asyncio.to_thread(self.ctx.state.updates_disabled)
        self._updates_disabled = disabled is not None
        engine = self.ctx.deploys
        if engine is None:
            return
        try:
            self._deploys = await asyncio.to_thread(engine.store.counts)
        except SQLAlchemyError as err:  # a shared database down: the scrape goes on
            log.debug("deploy counts unreadable, showing those last read: %s", err)

    def collect(self) -> Iterable[Metric]:
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
        yield GaugeMetricFamily("dominator_mdb_up",
                                "1 while the MDB can be read, 0 while reads of it fail.",
                                value=int(not herd.mdb_error))
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
        yield from imageserver_metrics(herd.server_slots, self._replicas)
        ownership = getattr(herd, "ownership", None)  # shard leases (a test's herd has none)
        if ownership is not None:
            yield from ownership.metrics()
        rows = getattr(herd, "rows", None)  # status rows (likewise)
        if rows is not None:
            yield from rows.metrics()
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
