"""Watch streams (issue 11, "Steady state"): a real subd over mutual TLS pushes its
generation at once, an event after a file changes under --root, heartbeats at the
requested interval, and refuses watchers beyond its cap; a real fleet converges as
before while a settled host is not polled beyond the backstop, and a hand edit is
seen within about a second of subd's scan noticing it; the herd falls back to polls
for a subd answering UNIMPLEMENTED, and reopens a stream gone silent."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dominator.herd.herd import Sub
from dominator.herd.instruments import HerdMetrics
from dominator.herd.status import Status
from dominator.herd.watch import HostWatch, Reason, WatchConfig, Watches
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import Daemon, free_port
from fleetlib.testing.fleet import FleetUnderTest, wait_for
from fleetlib.testing.trees import make_tree
from fleetlib.wire import subd_pb2, subd_pb2_grpc
from mdb.machine import Machine
from subd.client import AsyncSubClient, SubClient
from subd.watch import MAX_WATCHERS


@pytest.fixture
def security(ca: Path) -> Security:
    return Security.from_options(str(ca / "admin"), insecure=False)


@pytest.fixture
def watched(tmp_path: Path, start_subd: Callable[..., Daemon]) -> tuple[Daemon, Path, int]:
    """A subd (with a metrics port) over a small tree: (daemon, root, metrics port)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("hello\n")
    port = free_port()
    return start_subd(root, "--metrics-port", str(port)), root, port


def samples(port: int) -> dict[str, float]:
    """Unlabelled samples of a /metrics endpoint on 127.0.0.1."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


class Stream:
    """A Watch stream read in a thread: (arrival time, event) pairs in a queue."""

    def __init__(self, client: SubClient, have_generation: int, heartbeat: int) -> None:
        self.call = client.stub.Watch(subd_pb2.WatchRequest(
            have_generation=have_generation, heartbeat_seconds=heartbeat))
        self.events: queue.Queue[tuple[float, subd_pb2.WatchEvent] | grpc.RpcError] = \
            queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put((time.monotonic(), event))
        except grpc.RpcError as err:
            self.events.put(err)

    def next(self, timeout: float = 20) -> tuple[float, subd_pb2.WatchEvent]:
        item = self.events.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def close(self) -> None:
        self.call.cancel()


def test_watch_pushes_the_generation_at_once_then_each_change(
        watched: tuple[Daemon, Path, int], security: Security) -> None:
    daemon, root, _ = watched
    with SubClient(daemon.address, security) as client:
        status = client.wait_for_scan(0)
        stream = Stream(client, 0, 30)
        try:
            _, first = stream.next()
            assert not first.heartbeat
            assert first.generation == status.generation
            assert first.scan_count >= 1 and first.last_scan_unix > 0
            (root / "etc/motd").write_text("changed by hand\n")
            _, changed = stream.next()
            assert not changed.heartbeat
            assert changed.generation > first.generation
            assert client.poll(short=True)[0].generation == changed.generation
        finally:
            stream.close()


def test_heartbeats_come_at_the_requested_interval(
        watched: tuple[Daemon, Path, int], security: Security) -> None:
    daemon, _, _ = watched
    with SubClient(daemon.address, security) as client:
        generation = client.wait_for_scan(0).generation
        started = time.monotonic()
        stream = Stream(client, generation, 1)  # holds it: nothing is sent at once
        try:
            times = []
            for _ in range(3):
                arrived, event = stream.next()
                assert event.heartbeat and event.generation == generation
                times.append(arrived)
        finally:
            stream.close()
    gaps = [later - earlier for earlier, later in zip([started, *times], times, strict=False)]
    assert all(0.8 < gap < 2.0 for gap in gaps), gaps


def test_watchers_beyond_the_cap_are_refused_clearly(
        watched: tuple[Daemon, Path, int], security: Security) -> None:
    daemon, _, port = watched
    with SubClient(daemon.address, security) as client:
        generation = client.wait_for_scan(0).generation
        streams = [Stream(client, generation, 600) for _ in range(MAX_WATCHERS)]
        try:
            for stream in streams:
                stream.call.initial_metadata()  # accepted: subd counts it
            assert samples(port)["subd_watchers"] == MAX_WATCHERS
            extra = Stream(client, generation, 600)
            with pytest.raises(grpc.RpcError) as err:
                extra.next()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details() == (f"subd serves at most {MAX_WATCHERS} Watch "
                                           "streams at once; poll instead")
            assert samples(port)["subd_watches_refused_total"] == 1
            streams.pop().close()
            wait_for(lambda: samples(port)["subd_watchers"] == MAX_WATCHERS - 1,
                     "subd sees the closed stream go", timeout=10)
            again = Stream(client, 0, 600)
            streams.append(again)
            assert again.next()[1].generation == generation
        finally:
            for stream in streams:
                stream.close()


# ---------------------------------------------------------------- a real fleet


@pytest.fixture
def metered_fleet(tmp_path: Path, ca: Path, imageserver: Daemon,
                  start_subd: Callable[..., Daemon]
                  ) -> Iterator[tuple[FleetUnderTest, dict[str, int]]]:
    """Two hosts with subd metrics ports; the dominator polls unsettled hosts every 20 s
    and settled ones every 300 s: anything faster is the watch streams' doing."""
    ports: dict[str, int] = {}

    def start(root: Path) -> Daemon:
        port = free_port()
        ports[root.name] = port
        return start_subd(root, "--metrics-port", str(port))

    fleet = FleetUnderTest(tmp_path, ca, imageserver, start, hosts=2,
                           serve_args=("--poll-interval", "20", "--backstop-interval", "300"))
    try:
        yield fleet, ports
    finally:
        fleet.stop()


def dominator_samples(fleet: FleetUnderTest) -> dict[tuple[str, str], float]:
    """(name, reason label or "") -> value of the dominator's /metrics."""
    text = httpx.get(f"{fleet.base}/metrics", timeout=30).text
    return {(sample.name, sample.labels.get("reason", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_watched_fleet_converges_stays_quiet_and_sees_a_hand_edit_fast(
        metered_fleet: tuple[FleetUnderTest, dict[str, int]], security: Security) -> None:
    fleet, ports = metered_fleet
    v1 = make_tree(fleet.tmp / "v1")
    fleet.run("image", "add", "v1", str(v1))
    for name in fleet.names:
        fleet.run("mdb", "set", name, "--address", fleet.sub(name).address,
                  "--required-image", "v1")
    fleet.wait_status(fleet.names, "synced", "v1", timeout=60)  # first cycles within 20 s

    def watching() -> dict[tuple[str, str], float] | None:
        metrics = dominator_samples(fleet)
        return metrics if metrics[("dominator_hosts_watching", "")] == 2 else None
    metrics = wait_for(watching, "both hosts watched", timeout=10)
    assert metrics[("dominator_watch_reconnects_total", "")] == 0

    # Idle: nobody polls a settled, watched host (the backstop is 300 s away).
    polls = {name: samples(port)["subd_polls_total"] for name, port in ports.items()}
    time.sleep(4)
    assert {name: samples(port)["subd_polls_total"] for name, port in ports.items()} == polls
    after = dominator_samples(fleet)
    for reason in ("busy", "fallback", "backstop"):
        assert after.get(("dominator_polls_by_reason_total", reason), 0) == \
            metrics.get(("dominator_polls_by_reason_total", reason), 0), reason

    # A hand edit: timed from subd's generation change (seen on a stream of our own)
    # to the dominator's status change. Paused, the host stays 'updates disabled'.
    fleet.run("mdb", "set", "host-1", "--disable-updates", "--reason", "watch test")
    fleet.wait_status(["host-1"], "synced")
    with SubClient(fleet.sub("host-1").address, security) as client:
        stream = Stream(client, client.poll(short=True)[0].generation, 600)
        try:
            (fleet.root("host-1") / "etc/motd").write_text("edited by hand\n")
            changed_at, _ = stream.next()
        finally:
            stream.close()
    seen_at = wait_for(lambda: fleet.shown()["host-1"]["status"] == "updates disabled"
                       and time.monotonic(), "the dominator sees the edit", timeout=30)
    print(f"hand edit seen by the dominator {seen_at - changed_at:.3f} s after subd's "
          "generation change")  # the figure for the notes (pytest -s)
    assert seen_at - changed_at < 1.5, seen_at - changed_at
    assert dominator_samples(fleet)[("dominator_polls_by_reason_total", "changed")] > \
        metrics.get(("dominator_polls_by_reason_total", "changed"), 0)


# ---------------------------------------------------------------- the herd's fallbacks


class OlderSubd(subd_pb2_grpc.SubdServicer):
    """A subd from before Watch: the generated servicer answers it UNIMPLEMENTED."""


class SilentSubd(subd_pb2_grpc.SubdServicer):
    """A subd whose Watch stream accepts, then never says anything again."""

    async def Watch(self, request: subd_pb2.WatchRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[subd_pb2.WatchEvent]:
        await context.send_initial_metadata(())
        await asyncio.Event().wait()
        yield subd_pb2.WatchEvent()


Done = Callable[[Watches, HostWatch[Sub], list[Reason]], bool]


async def herd_watch(servicer: subd_pb2_grpc.SubdServicer, config: WatchConfig, done: Done,
                     timeout: float) -> tuple[Watches, HostWatch[Sub], list[Reason]]:
    """A HostWatch of the herd against a real insecure gRPC server of `servicer` on
    loopback, until `done(watches, watch, reasons)` holds: `reasons` are those of the
    cycles the synced sub's loop ran meanwhile (0.2 s poll interval; no poll is made)."""
    server = grpc.aio.server()
    subd_pb2_grpc.add_SubdServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sub = Sub(Machine("old-host", address=f"127.0.0.1:{port}"), status=Status.SYNCED)
    client = AsyncSubClient(sub.machine.address, Security(None))
    watches = Watches(config, HerdMetrics())
    watch = watches.open(sub, lambda _: client)
    reasons: list[Reason] = []
    try:
        async with asyncio.timeout(timeout):
            while not done(watches, watch, reasons):
                reasons.append(await watch.next_cycle(0.2))
    finally:
        await watch.stop()
        await client.close()
        await server.stop(None)
    return watches, watch, reasons


def test_the_herd_polls_an_older_subd_at_the_poll_interval() -> None:
    started = time.monotonic()
    watches, watch, reasons = asyncio.run(herd_watch(
        OlderSubd(), WatchConfig(), lambda watches, watch, reasons: len(reasons) >= 6, 10))
    assert watch.older and not watch.watching and watches.watching == 0
    assert reasons[0] == Reason.FIRST
    assert set(reasons[2:]) == {Reason.FALLBACK}, reasons  # the first ones may precede
    assert time.monotonic() - started < 2.5  # six cycles of 0.2 s (+-10%), not backstops


def test_a_silent_stream_is_dead_after_two_heartbeats_and_reopened() -> None:
    def reopened(watches: Watches, watch: HostWatch[Sub], reasons: list[Reason]) -> bool:
        return Reason.WATCH_LOST in reasons and watch.watching

    config = WatchConfig(heartbeat_seconds=1, retry_first=0.1)
    started = time.monotonic()
    watches, _, reasons = asyncio.run(herd_watch(SilentSubd(), config, reopened, 15))
    assert 2.0 <= time.monotonic() - started < 6.0
    assert watches.metrics.watch_reconnects._value.get() >= 1
    # Open and synced, the loop waited for the backstop: only the lost stream woke it
    # (then polls at the poll interval until the stream is open again).
    assert reasons[:2] == [Reason.FIRST, Reason.WATCH_LOST], reasons
    assert Reason.BACKSTOP not in reasons, reasons


def test_a_stream_on_a_closed_channel_is_reopened_on_the_new_one() -> None:
    """The herd closes a sub's channel when its MDB address changes: the watch must
    reopen on the channel `client(sub)` gives next, not die with the old one."""
    async def run() -> tuple[Watches, HostWatch[Sub], list[Reason]]:
        server = grpc.aio.server()
        subd_pb2_grpc.add_SubdServicer_to_server(SilentSubd(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sub = Sub(Machine("moved-host", address=f"127.0.0.1:{port}"), status=Status.SYNCED)
        clients = [AsyncSubClient(sub.machine.address, Security(None))]
        watches = Watches(WatchConfig(heartbeat_seconds=600, retry_first=0.1), HerdMetrics())
        watch = watches.open(sub, lambda _: clients[-1])
        reasons: list[Reason] = []
        try:
            async with asyncio.timeout(15):
                while not watch.watching:
                    await asyncio.sleep(0.05)
                await clients[-1].close()
                clients.append(AsyncSubClient(sub.machine.address, Security(None)))
                reasons.append(await watch.next_cycle(0.2))  # the first, at once or so
                while not (Reason.WATCH_LOST in reasons and watch.watching):
                    reasons.append(await watch.next_cycle(0.2))
        finally:
            await watch.stop()
            for client in clients:
                await client.close()
            await server.stop(None)
        return watches, watch, reasons
    watches, _, reasons = asyncio.run(run())  # it ends once watching again
    assert watches.metrics.watch_reconnects._value.get() == 1
    assert Reason.BACKSTOP not in reasons, reasons
