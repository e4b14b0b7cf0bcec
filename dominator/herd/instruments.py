"""The herd's own Prometheus instruments: counters and histograms it updates as it
polls, fetches and updates (one HerdMetrics per Herd, registered nowhere by itself:
the /metrics collector exports them), and the gauges of the image servers it sends
hosts to (`imageserver_metrics`: fetches in flight per server, each replica's lag,
bytes and state)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dominator.herd.fetchslots import ServerSlots
from dominator.herd.replicas import STATES, ReplicaTree

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
        self.mdb_read_errors = counter("dominator_mdb_read_errors",
                                       "Reads of the MDB that failed (each retry counts).")
        self.mdb_notifications = counter("dominator_mdb_notifications",
                                         "Notifications of MDB changes the change feed got "
                                         "(PostgreSQL).")
        self.mdb_backstop_reads = counter("dominator_mdb_backstop_reads",
                                          "Reads of the MDB not woken by a notification: "
                                          "after the backstop interval, or the feed reopening.")
        self.mdb_feed_reconnects = counter("dominator_mdb_feed_reconnects",
                                           "Times the MDB change feed's LISTEN connection "
                                           "was reopened after being lost.")
        self.polls_by_reason = Counter(
            "dominator_polls_by_reason", "Convergence cycles (each a short poll first) by "
            "why they ran (herd/watch.py Reason).", ["reason"], registry=None)
        self.watch_reconnects = counter("dominator_watch_reconnects",
                                        "Watch streams lost (ended, failed or silent "
                                        "past two heartbeats) and reopened.")
        self.hosts_watching = Gauge("dominator_hosts_watching",
                                    "Hosts whose Watch stream is open.", registry=None)

    def timed(self, kind: str) -> Timed:
        """Count one `kind` ("poll", "fetch" or "update") around a block (`with` or
        `async with`), its duration, and a failure when the block raises."""
        total, failures, seconds = {
            "poll": (self.polls, self.poll_errors, self.poll_seconds),
            "fetch": (self.fetches, self.fetch_failures, self.fetch_seconds),
            "update": (self.updates, self.update_failures, self.update_seconds),
        }[kind]
        return Timed(total, failures, seconds)

    def collectors(self) -> list[Counter | Gauge | Histogram]:
        """Every metric, for a collector to export."""
        return [self.polls, self.poll_errors, self.poll_seconds, self.fetches,
                self.fetch_failures, self.fetch_seconds, self.fetched_bytes, self.prefetches,
                self.updates, self.update_failures, self.update_seconds, self.mdb_read_errors,
                self.mdb_notifications, self.mdb_backstop_reads, self.mdb_feed_reconnects,
                self.polls_by_reason, self.watch_reconnects, self.hosts_watching]


def imageserver_metrics(slots: ServerSlots, tree: ReplicaTree | None
                        ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """By image server (label `server`): fetches in flight on it, waiting for one of its
    slots, the most in flight at once, and a count of those that waited; and per replica
    of the last walk of the master's tree: lag in events, bytes pending and replicated,
    and its state (label `state`: 1 for the one it is in, 0 for the others)."""
    for name, doc, counts in (
            ("dominator_fetches_in_flight", "Fetches in flight by the host's first server.",
             slots.in_flight),
            ("dominator_fetches_waiting", "Fetches waiting for a slot of their first server "
             "(serve --fetches-per-imageserver).", slots.waiting),
            ("dominator_fetches_in_flight_max", "The most fetches in flight at once on a "
             "server since the dominator started.", slots.peak)):
        family = GaugeMetricFamily(name, doc, labels=["server"])
        for server in sorted(counts):
            family.add_metric([server], counts[server])
        yield family
    waited = CounterMetricFamily("dominator_fetches_waited", "Fetches that found every slot "
                                 "of their first server taken, and waited.", labels=["server"])
    for server in sorted(slots.waited):
        waited.add_metric([server], slots.waited[server])
    yield waited
    replicas = tree.replicas if tree is not None else []
    for name, doc, field in (
            ("dominator_replica_lag_events", "Journal events a replica is behind its "
             "upstream.", "lag_events"),
            ("dominator_replica_bytes_pending", "Object bytes a replica still lacks for "
             "images its upstream announced.", "bytes_pending"),
            ("dominator_replica_bytes_replicated", "Object bytes a replica moved from its "
             "upstream since it started.", "bytes_replicated")):
        family = GaugeMetricFamily(name, doc, labels=["server", "upstream"])
        for row in replicas:
            family.add_metric([row.address, row.upstream], getattr(row, field))
        yield family
    states = GaugeMetricFamily("dominator_replica_state", "A replica's state, as its "
                               "upstream reports it (1: the state it is in).",
                               labels=["server", "state"])
    for row in replicas:
        for state in sorted({*STATES, row.state}):
            states.add_metric([row.address, state], int(state == row.state))
    yield states
