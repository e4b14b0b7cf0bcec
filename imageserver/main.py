"""`imageserver`: the image and object server daemon."""

# ruff: noqa: E402
from __future__ import annotations

import os

# gRPC's C core logs a failed handshake to stderr at info level, beside the one line a
# refused start prints; it reads this when it loads, so before anything imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import click
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetlib.auditlog import AuditLog
from fleetlib.cli.options import Duration, address_option, parse_duration, security_options
from fleetlib.cli.run import (
    CONTEXT_SETTINGS,
    EXIT_CODES_HELP,
    run,
    setup_logging,
    version_option,
)
from fleetlib.errors import FleetError
from fleetlib.location import check_location
from fleetlib.rpc.ports import IMAGESERVER_PORT
from fleetlib.rpc.server import serve_metrics, serve_until_stopped, start_server
from fleetlib.rpc.tls import Security, parse_address
from fleetlib.sql.engine import open_engine
from fleetlib.wire import imageserver_pb2, imageserver_pb2_grpc, objectserver_pb2_grpc
from imageserver.feed import ReplicaRegistry
from imageserver.follower import Follower, Session, is_this_server, open_session
from imageserver.journal import new_id, peek
from imageserver.service import ImageService, ObjectService, collect_orphans, expire_images
from imageserver.store import JOURNAL, ImageStore
from imageserver.upstream import Upstream

log = logging.getLogger(__name__)

DEFAULT_PORT = IMAGESERVER_PORT
ORPHAN_GRACE = "6h"
ORPHAN_INTERVAL = "1h"


class ImageServerCollector(Collector):
    """The image server's metrics, read at scrape time from its store and service."""

    def __init__(self, store: ImageStore, objects: ObjectService,
                 replicas: ReplicaRegistry | None = None, follower: Follower | None = None
                 ) -> None:
        self.store = store
        self.objects = objects
        self.replicas = replicas  # the servers following this one
        self.follower = follower  # a replica's replication from its upstream

    def collect(self) -> Iterator[Metric]:
        store, objects = self.store, self.objects
        images = list(store.images.values())
        yield GaugeMetricFamily("imageserver_images", "Images stored.", value=len(images))
        yield GaugeMetricFamily("imageserver_objects_stored",
                                "Distinct objects the stored images reference.",
                                value=len(store.refcounts))
        yield GaugeMetricFamily("imageserver_image_bytes",
                                "Bytes of file content of every image (shared objects count "
                                "once per image).", value=sum(i.total_bytes for i in images))
        yield CounterMetricFamily("imageserver_received_bytes",
                                  "Object bytes received by AddObjects (as sent).",
                                  value=objects.received_bytes)
        yield CounterMetricFamily("imageserver_added_bytes",
                                  "Bytes of objects new to the store.", value=objects.added_bytes)
        yield CounterMetricFamily("imageserver_served_objects", "Objects sent by GetObjects.",
                                  value=objects.served_objects)
        yield CounterMetricFamily("imageserver_served_bytes",
                                  "Object bytes sent by GetObjects (before compression).",
                                  value=objects.served_bytes)
        yield CounterMetricFamily("imageserver_served_wire_bytes",
                                  "Object bytes sent by GetObjects (as sent, compressed where "
                                  "asked).", value=objects.served_wire_bytes)
        yield CounterMetricFamily("imageserver_pulled_objects",
                                  "Objects a replica pulled through from its upstream for "
                                  "callers (0 on a master).", value=objects.pulled_objects)
        yield CounterMetricFamily("imageserver_pulled_bytes",
                                  "Bytes of the objects pulled through from the upstream.",
                                  value=objects.pulled_bytes)
        yield CounterMetricFamily("imageserver_shared_fetch_objects",
                                  "Times replication or a pull-through caller waited for an "
                                  "object the other was fetching from upstream already, "
                                  "instead of fetching it again.",
                                  value=objects.shared_fetch_objects)
        yield from self._replication()

    def _replication(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("imageserver_journal_sequence",
                                "The last sequence number of this server's journal.",
                                value=self.store.journal.sequence)
        yield GaugeMetricFamily("imageserver_quarantined_images",
                                "Images a replica moved aside: its copy's content differs "
                                "from upstream's (an alarm).", value=len(self.store.quarantined))
        if self.replicas is not None:
            yield GaugeMetricFamily("imageserver_followers_connected",
                                    "Servers replicating from this one now.",
                                    value=self.replicas.connected_count())
            yield CounterMetricFamily("imageserver_snapshots_sent",
                                      "Journal snapshots sent to followers (a resume sends "
                                      "none).", value=self.replicas.snapshots_sent)
        follower = self.follower
        if follower is None:
            return
        yield GaugeMetricFamily("imageserver_replication_lag_events",
                                "Upstream journal events this replica has not applied yet.",
                                value=follower.lag())
        yield CounterMetricFamily("imageserver_replicated_bytes",
                                  "Object bytes this replica moved from its upstream.",
                                  value=follower.bytes_replicated)
        yield GaugeMetricFamily("imageserver_replication_pending_bytes",
                                "Object bytes this replica still lacks for the images its "
                                "upstream announced.", value=follower.bytes_pending)
        yield GaugeMetricFamily("imageserver_replication_diverged",
                                "1 when this replica found its upstream replaced or older "
                                "(it then applies no deletes until started with "
                                "--accept-upstream).", value=int(follower.diverged))
        yield GaugeMetricFamily("imageserver_replication_connected",
                                "1 while this replica's stream to its upstream is open.",
                                value=int(follower.connected))
        yield CounterMetricFamily("imageserver_replication_snapshots",
                                  "Journal snapshots this replica received from upstream.",
                                  value=follower.snapshots)


async def serve(state_dir: Path, port: int, security: Security, host: str = "[::]",
                metrics_port: int = 0, orphan_grace: float = parse_duration(ORPHAN_GRACE),
                orphan_interval: float = parse_duration(ORPHAN_INTERVAL),
                location: str = "", replicate_from: str = "", accept_upstream: bool = False
                ) -> None:
    """Load the store, collect orphaned objects, and serve until cancelled (as a replica
    of `replicate_from` when given: a first start reaches the upstream before it touches
    the state directory, and refuses to start when it cannot; `accept_upstream`: follow
    the upstream as it is now, even if it was replaced or restored)."""
    upstream = Upstream(replicate_from, security) if replicate_from else None
    ident, first = await _first_contact(state_dir, upstream, port, location)
    store = ImageStore(state_dir, ident)
    store.load()
    store.collect_orphans(orphan_grace)
    audit = AuditLog(open_engine(str(state_dir / "audit.sqlite")), "imageserver")
    objects = ObjectService(store, upstream)
    images = ImageService(store, audit, location, upstream, objects.pullthrough)
    follower = None
    if upstream is not None:
        assert objects.pullthrough is not None  # a replica's
        follower = Follower(store, upstream, objects.pullthrough, port, location,
                            accept_upstream=accept_upstream, audit=audit)
    if follower is not None and first is not None:
        follower.adopt(first.hello)
    stop_metrics = serve_metrics(ImageServerCollector(store, objects, images.replicas, follower),
                                 host, metrics_port) if metrics_port else None
    running = await start_server(
        [(objectserver_pb2_grpc.add_ObjectServerServicer_to_server, objects,
          "fleet.ObjectServer"),
         (imageserver_pb2_grpc.add_ImageServerServicer_to_server, images, "fleet.ImageServer")],
        port, security, host)
    log.info("image server listening on port %d, state in %s%s", running.port, state_dir,
             f", location {location}" if location else "")
    tasks = [asyncio.create_task(expire_images(store, audit)),
             asyncio.create_task(collect_orphans(store, orphan_grace, orphan_interval))]
    if follower is not None:
        follower.port = running.port
        tasks.append(asyncio.create_task(follower.run(first)))
    try:
        await serve_until_stopped(running)
    finally:
        for task in tasks:
            task.cancel()
        if stop_metrics is not None:
            stop_metrics()
        if upstream is not None:
            await upstream.close()


async def _first_contact(state_dir: Path, upstream: Upstream | None, port: int, location: str
                         ) -> tuple[str, Session | None]:
    """A replica's first start (no position persisted): reach the upstream and exchange
    hellos before touching STATE_DIR, so a wrong --replicate-from fails at once and
    changes nothing. (The id a new journal takes, the open session or None.)"""
    if upstream is None:
        return "", None
    if is_this_server(upstream.address, port):
        raise FleetError(f"--replicate-from {upstream.address} is this server itself")
    identity, followed = peek(state_dir / JOURNAL)
    if followed:
        log.info("replicating from %s, serving the images held meanwhile", upstream.address)
        return "", None
    identity = identity or imageserver_pb2.ServerIdentity(id=new_id(), generation=1)
    try:
        session = await open_session(upstream, imageserver_pb2.ReplicaHello(
            identity=identity, port=port, location=location))
    except FleetError as err:
        await upstream.close()
        raise FleetError(str(err)) from None  # a start-up error: exit 2, whatever the kind
    return identity.id, session


def checked_location(value: str) -> str:
    """--location, validated ('' : unknown); a usage error says what is wrong."""
    try:
        return check_location(value) if value else value
    except FleetError as err:
        raise click.BadParameter(str(err), param_hint="--location") from None


@click.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
@version_option("imageserver")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the objects and images (created if missing).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0 picks a free one).")
@click.option("--host", default="[::]", show_default=True, help="Address to listen on.")
@click.option("--metrics-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics (images, objects stored, bytes served and "
                   "received) over plain HTTP at :PORT/metrics on --host; 0: off.")
@click.option("--orphan-grace", default=ORPHAN_GRACE, show_default=True, type=Duration(),
              help="Delete objects no image references once untouched this long (e.g. 90, "
                   "30m, 6h, 2d): uploads whose image was never added. Keep it longer than "
                   "the longest upload.")
@click.option("--orphan-interval", default=ORPHAN_INTERVAL, show_default=True,
              type=Duration(), help="How often to look for such objects (also at start-up).")
@click.option("--location", default="", metavar="REGION/DC[/RACK]",
              callback=lambda ctx, param, value: checked_location(value),
              help="Where this server stands (told in ListImages): the dominator sends each "
                   "host to the servers nearest its MDB Location first.")
@address_option("replicate-from", "FLEET_REPLICATE_FROM", "",
                "Be a replica of this image server (a master or another replica): copy "
                "its images, serve reads, write `image add` through to the master.")
@click.option("--accept-upstream", is_flag=True,
              help="With --replicate-from, on this start: follow the upstream as it is now. "
                   "A replica that diverged (its upstream was replaced by a new server, or "
                   "restored from an older copy) adopts the upstream's identity and "
                   "generation from its snapshot, clears the diverged alarm and applies "
                   "deletes again: DELETED events and tombstones of the same content, never "
                   "an image merely missing upstream. Logged at warning and audited. Later "
                   "starts without it judge the upstream as usual.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@security_options
def command(state_dir: Path, port: int, host: str, metrics_port: int, orphan_grace: int,
            orphan_interval: int, location: str, replicate_from: str, accept_upstream: bool,
            verbose: bool, security: Security) -> None:
    """Serve images and their content-addressed objects over gRPC (mutual TLS).

    Images are immutable trees added with `dominator image add`; objects are
    verified against their SHA-256 on arrival and stored crash-safely.
    """
    setup_logging(verbose)
    if accept_upstream and not replicate_from:
        raise click.UsageError("--accept-upstream needs --replicate-from: only a replica "
                               "follows an upstream")
    if replicate_from:
        replicate_from = parse_address(replicate_from, DEFAULT_PORT)
    asyncio.run(serve(state_dir, port, security, host, metrics_port, orphan_grace,
                      orphan_interval, location, replicate_from, accept_upstream))


def main() -> None:
    """Console entry point."""
    run(command)


if __name__ == "__main__":
    main()
