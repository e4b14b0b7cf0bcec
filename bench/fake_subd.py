"""Many in-memory subs in one process, for the fleet benchmark only (the dominator is
what it measures, not subd).

`python -m bench.fake_subd --count N --port P [--first K] [--base 127.1] --insecure`
serves subs K .. K+N-1, each on its own loopback address (`address(base, i)`, e.g.
127.1.0.1:P): one grpc.aio server per sub, since a servicer cannot tell which of a
server's ports a call came in on. Linux routes all of 127.0.0.0/8 to `lo`, so no
set-up is needed.

Each sub holds a tiny tree (an image's tree from the image server with `--image`, so
the fleet starts synced) and implements what the herd calls:

- Poll: status (generation, fingerprint = tree.fingerprint(), scan_count rising every
  `--scan-period` seconds at a random phase, free_bytes, cached_objects, last update),
  then the tree in chunks when asked for it and the generation differs.
- Fetch: pretends. The hashes are recorded as cached at once (or after
  `--fetch-seconds`): no bytes move, the image server is not asked. The bytes a fetch
  stood for are counted when the update installs them (the plan carries sizes).
- Update and UpdateStream (the dominator's way: the request in chunks): checks every
  installed object was fetched (or came inline), applies the plan's changes to the
  in-memory tree (memoized: equal subs given equal plans share one result), bumps the
  generation, and completes a scan `--rescan-delay` later.
- Cleanup: drops cached hashes.
- Fencing: Fetch, Update and Cleanup go through subd's own `Fences` (subd/fence.py),
  one file per sub in a folder on tmpfs (/dev/shm), so an older token is refused as
  subd would refuse it ("fenced: ..."); the status carries the highest token.
- Watch: subd's own stream (subd/watch.py): an event whenever the generation or a
  fetch's progress changes, heartbeats in between (`--no-watch`: UNIMPLEMENTED, as
  an older subd answers, so the dominator polls every host at its poll interval).

`--mode echo` serves instead a plain unary echo (`bench.Echo/Echo`, raw bytes) on the
same addresses: the ceiling the fleet benchmark compares against.

A control port on 127.0.0.1 (`--control-port`) answers one-line commands with one
JSON line: `stats` (poll counts, largest gap between two polls of one sub since the
last `reset`, polls per sub, open Watch streams, the most subs neither watched nor
polled within 10 s in any second, which image each sub holds, fetches and updates),
`images` (just which image each sub holds), `reset`, `touch K SECONDS` (K random
subs each find a change, at random times over SECONDS: their generation moves, as a
scan that found one moves it; `stats` then gives the seconds from each change to
the sub's next poll), `mark` and `seen` (for each sub, the unix time of its first
poll and of its first Watch stream opened since the last `mark`, or null, and of its
last fetch and update).
The process prints `ready N` on stdout once every server listens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import xxhash

from fleetlib.errors import FleetError
from fleetlib.fstree.tree import Kind, Tree, TreeBuilder, directory, regular, split
from fleetlib.rpc.chunks import join_chunks_async, split_message
from fleetlib.rpc.status import abort
from fleetlib.rpc.tls import MESSAGE_SIZE_OPTIONS, Identity, server_credentials
from fleetlib.wire import subd_pb2, subd_pb2_grpc
from fleetlib.wire.codec import inode_from_proto, tree_to_proto
from subd.fence import Fences, fence_of
from subd.watch import Watchers

FREE_BYTES = 1 << 40
ECHO_SERVICE = "bench.Echo"
SERVER_OPTIONS = [*MESSAGE_SIZE_OPTIONS, ("grpc.so_reuseport", 0)]
TICKS = os.sysconf("SC_CLK_TCK")
COVERED_SECONDS = 10.0  # a sub polled this recently, or watched, counts as covered
MAX_UPDATE_BYTES = 64 << 20


def address(base: str, index: int) -> str:
    """Loopback address of sub `index` (0-based): base 127.1 gives 127.1.0.1, 127.1.0.2,
    ..., skipping last octets 0 and 255, then 127.2.x.y after 127.1.255.254."""
    first, second = (int(part) for part in base.split("."))
    host = index // 254 * 256 + index % 254 + 1
    second += host >> 16
    if first != 127 or second > 255:
        raise ValueError(f"sub {index} does not fit in loopback from {base}")
    return f"127.{second}.{(host >> 8) & 255}.{host & 255}"


def sample_tree() -> Tree:
    """A few files, for when no image is given."""
    builder = TreeBuilder(directory(0o755, 0, 0))
    for i, path in enumerate(["/etc/hostname", "/etc/motd", "/usr/bin/app", "/usr/lib/app.so"]):
        data = f"{path} {i}".encode()
        builder.add(path, regular(0o644, 0, 0, 1_700_000_000_000_000_000, len(data),
                                  xxhash.xxh3_128_digest(data) * 2))
    return builder.tree


@dataclass(frozen=True)
class TreeState:
    """An immutable tree and what polls need of it, shared by every sub holding it."""

    tree: Tree
    fingerprint: bytes
    chunks: tuple
    inodes: int

    @classmethod
    def of(cls, tree: Tree) -> TreeState:
        encoded = tree_to_proto(tree).SerializeToString()
        return cls(tree, tree.fingerprint(), tuple(split_message(encoded)), len(tree.inodes))


class UpdateError(Exception):
    """An update the fake cannot apply (as subd would refuse it)."""


def apply_changes(tree: Tree, request: subd_pb2.UpdateRequest) -> Tree:
    """The tree after the update: directories first, then files and links, deletes,
    metadata; unreachable inodes dropped."""
    inodes = dict(tree.inodes)
    children = {ino: dict(kids) for ino, kids in tree.children.items()}
    result = Tree(tree.root, inodes, children)
    next_number = max(inodes) + 1

    def parent_of(path: str) -> tuple[dict[str, int], str]:
        parent, name = split(path)
        ino = result.lookup(parent)
        if ino is None or ino not in children:
            raise UpdateError(f"{path}: parent {parent} is not a directory")
        return children[ino], name

    changes = list(request.changes)
    adds = [c for c in changes if c.kind in (subd_pb2.ADD, subd_pb2.REPLACE)]
    adds.sort(key=lambda c: (c.inode.kind != Kind.DIRECTORY, c.path))
    for change in adds:
        path = os.fsdecode(change.path)
        kids, name = parent_of(path)
        if change.link_to:
            number = result.lookup(os.fsdecode(change.link_to))
            if number is None:
                raise UpdateError(f"{path}: link target missing")
        else:
            number, next_number = next_number, next_number + 1
            inodes[number] = inode_from_proto(change.inode)
            if inodes[number].kind == Kind.DIRECTORY:
                children[number] = {}
        kids[name] = number
    deletes = sorted((os.fsdecode(c.path) for c in changes if c.kind == subd_pb2.DELETE),
                     key=lambda p: -p.count("/"))
    for path in deletes:
        kids, name = parent_of(path)
        kids.pop(name, None)
    for change in changes:
        if change.kind == subd_pb2.METADATA:
            path = os.fsdecode(change.path)
            number = result.lookup(path)
            if number is None:
                raise UpdateError(f"{path}: missing for a metadata change")
            inodes[number] = inode_from_proto(change.inode)
    reachable = {ino for _, ino, _ in result.walk()}
    return Tree(tree.root, {n: i for n, i in inodes.items() if n in reachable},
                {n: k for n, k in children.items() if n in reachable})


class Fleet:
    """What the subs of this process share: memoized trees and the poll counters."""

    def __init__(self, count: int, scan_period: float, rescan_delay: float,
                 fetch_seconds: float, fence_dir: Path, watch: bool = True) -> None:
        self.count = count
        self.scan_period = scan_period
        self.rescan_delay = rescan_delay
        self.fetch_seconds = fetch_seconds
        self.fence_dir = fence_dir
        self.watch = watch
        self.t0 = time.monotonic()
        self.unix0 = time.time()
        self.applied: dict[tuple[bytes, bytes], TreeState] = {}
        self.fetches = 0
        self.updates = 0
        self.cleanups = 0
        self.bytes_fetched = 0
        self.update_errors = 0
        self.watch_opens = 0
        self.subs: list[FakeSub] = []
        self.last_contact = [-float("inf")] * count  # monotonic time of the last poll
        self.touched: dict[int, float] = {}  # sub -> when it changed, until its next poll
        self.touch_latencies: list[float] = []
        self.mark()
        self.reset()

    def reset(self) -> None:
        """Start a new measuring window: poll counts, the largest gap between two polls
        of each sub (the window's start counts as a poll), intervals between two polls
        both inside the window, polls per second of the window."""
        now = time.monotonic()
        self.window_start = now
        self.polls = [0] * self.count
        self.tree_polls = 0
        self.last_poll = [now] * self.count
        self.interval_sum = 0.0
        self.intervals = 0
        self.max_gap = [0.0] * self.count
        self.per_second: dict[int, int] = {}
        self.max_uncovered = 0
        self.touch_latencies = []

    def mark(self) -> None:
        """From now on note each sub's first poll and first Watch stream opened."""
        self.mark_unix = time.time()
        self.first_poll: list[float | None] = [None] * self.count
        self.first_watch: list[float | None] = [None] * self.count

    def uncovered(self) -> int:
        """Subs with no open Watch stream and no poll for COVERED_SECONDS."""
        since = time.monotonic() - COVERED_SECONDS
        return sum(1 for sub, last in zip(self.subs, self.last_contact, strict=True)
                   if not sub.watchers.count and last < since)

    async def sample_coverage(self) -> None:
        """Every second: the most subs uncovered at once since the last reset."""
        while True:
            await asyncio.sleep(1.0)
            self.max_uncovered = max(self.max_uncovered, self.uncovered())

    def touch(self, count: int, seconds: float) -> None:
        """`count` random subs each find a change at a random time within `seconds`."""
        loop = asyncio.get_running_loop()
        for sub in random.sample(self.subs, min(count, len(self.subs))):
            loop.call_later(random.uniform(0, seconds), sub.changed)

    def watch_opened(self, index: int) -> None:
        """Count a Watch stream of sub `index` accepted."""
        self.watch_opens += 1
        if self.first_watch[index] is None:
            self.first_watch[index] = time.time()

    def polled(self, index: int) -> None:
        """Count a poll of sub `index`."""
        now = time.monotonic()
        self.last_contact[index] = now
        if self.first_poll[index] is None:
            self.first_poll[index] = time.time()
        if (touched := self.touched.pop(index, None)) is not None:
            self.touch_latencies.append(now - touched)
        gap = now - self.last_poll[index]
        if gap > self.max_gap[index]:
            self.max_gap[index] = gap
        if self.polls[index]:  # an interval between two polls in the window
            self.interval_sum += gap
            self.intervals += 1
        self.last_poll[index] = now
        self.polls[index] += 1
        second = int(now - self.window_start)
        self.per_second[second] = self.per_second.get(second, 0) + 1

    def apply(self, state: TreeState, request: subd_pb2.UpdateRequest) -> TreeState:
        """The state after an update, computed once per (tree, request)."""
        key = (state.fingerprint, xxhash.xxh3_128_digest(request.SerializeToString()))
        new = self.applied.get(key)
        if new is None:
            new = self.applied[key] = TreeState.of(apply_changes(state.tree, request))
        return new

    def images(self) -> dict:
        """Which image each sub holds (counts), and when the last update landed."""
        images: dict[str, int] = {}
        for sub in self.subs:
            images[sub.image] = images.get(sub.image, 0) + 1
        return {"images": images,
                "last_update_unix": max((s.updated_unix for s in self.subs), default=0.0)}

    def stats(self) -> dict:
        """Everything counted since the last reset, as plain data."""
        now = time.monotonic()
        gaps = sorted(max(gap, now - last) for gap, last in zip(self.max_gap, self.last_poll,
                                                                  strict=True))
        seconds = [self.per_second.get(s, 0) for s in range(int(now - self.window_start))]
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return {
            "subs": self.count, "window_s": now - self.window_start,
            "polls": sum(self.polls), "tree_polls": self.tree_polls,
            "interval_sum": self.interval_sum, "intervals": self.intervals,
            "per_second": seconds,
            "never_polled": sum(1 for p in self.polls if p == 0),
            "max_gap_s": gaps[-1] if gaps else 0.0,
            "gaps_s": [round(gap, 3) for gap in gaps],
            "min_polls": min(self.polls, default=0),
            **self.images(),
            "fetches": self.fetches, "updates": self.updates, "cleanups": self.cleanups,
            "update_errors": self.update_errors, "bytes_fetched": self.bytes_fetched,
            "cpu_s": (int(fields[11]) + int(fields[12])) / TICKS,
            "polls_per_sub": self.polls,
            "watching": sum(1 for sub in self.subs if sub.watchers.count),
            "watch_opens": self.watch_opens,
            "watch_refused": sum(sub.watchers.refused for sub in self.subs),
            "uncovered_now": self.uncovered(), "max_uncovered": self.max_uncovered,
            "touch_latencies": sorted(round(t, 4) for t in self.touch_latencies),
            "touch_pending": len(self.touched),
            "fenced_refusals": sum(sub.fences.refused for sub in self.subs),
            "fence_owners": self.fence_owners(),
        }

    def fence_owners(self) -> dict[str, int]:
        """How many subs' highest fencing token each dominator holds ("" for none)."""
        owners: dict[str, int] = {}
        for sub in self.subs:
            owner = sub.fences.highest.owner if sub.fences.highest is not None else ""
            owners[owner] = owners.get(owner, 0) + 1
        return owners

    def seen(self) -> dict:
        """Each sub's first poll and first Watch stream since the last mark (unix)."""
        return {"mark_unix": self.mark_unix, "first_poll": self.first_poll,
                "first_watch": self.first_watch,
                "fetched": [sub.fetched_unix for sub in self.subs],
                "updated": [sub.updated_unix for sub in self.subs]}


class FakeSub(subd_pb2_grpc.SubdServicer):
    """One sub: a tree in memory and the counters a real subd would report."""

    def __init__(self, fleet: Fleet, index: int, state: TreeState, image: str) -> None:
        self.fleet = fleet
        self.index = index
        self.state = state
        self.image = image
        self.updated_unix = 0.0  # the last update's and fetch's times
        self.fetched_unix = 0.0
        self.generation = 1
        self.phase = random.random() * fleet.scan_period
        self.extra_scans = 0
        self.cached: set[bytes] = set()
        self.fetch_until = 0.0
        self.fetch_status = subd_pb2.FetchStatus()
        self.last_update = subd_pb2.UpdateResult()
        self.last_successful_image = image
        self.updating = False
        self.watchers = Watchers(self._watch_event)
        self.fences = Fences(fleet.fence_dir / f"sub-{index}.json")

    def changed(self) -> None:
        """A scan found a change (`touch`): the generation moves, watchers hear it."""
        self.generation += 1
        self.extra_scans += 1
        self.fleet.touched.setdefault(self.index, time.monotonic())
        self.watchers.changed()

    async def _admit(self, request, context, what: str) -> None:
        """subd's fence check on a mutating call, right before acting on it."""
        try:
            self.fences.admit(fence_of(request), what)
        except FleetError as err:
            await abort(context, err)

    def _watch_event(self) -> subd_pb2.WatchEvent:
        status = self._status()
        return subd_pb2.WatchEvent(
            generation=status.generation, scan_count=status.scan_count,
            fetch_in_progress=status.fetch.in_progress,
            update_in_progress=status.last_update.in_progress,
            last_update_finished_unix=status.last_update.finished_unix,
            last_scan_unix=status.last_scan_unix)

    async def Watch(self, request, context):
        if not self.fleet.watch:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch (--no-watch)")
        if self.watchers.count < self.watchers.limit:
            self.fleet.watch_opened(self.index)
        async for event in self.watchers.stream(request, context):
            yield event

    def _status(self) -> subd_pb2.SubStatus:
        fleet = self.fleet
        elapsed = time.monotonic() - fleet.t0 + self.phase
        periodic = int(elapsed / fleet.scan_period)
        fetching = self.fetch_until > time.monotonic()
        fetch = self.fetch_status
        if fetching != fetch.in_progress:
            fetch.in_progress = fetching
        last_update = self.last_update
        if self.updating != last_update.in_progress:
            last_update.in_progress = self.updating
        return subd_pb2.SubStatus(
            generation=self.generation, fingerprint=self.state.fingerprint,
            scan_count=periodic + 1 + self.extra_scans, last_scan_ns=1_000_000,
            last_scan_unix=int(fleet.unix0 + periodic * fleet.scan_period - self.phase),
            free_bytes=FREE_BYTES, fetch=fetch, last_update=last_update,
            last_successful_image=self.last_successful_image,
            cached_objects=len(self.cached), inodes=self.state.inodes, is_root=True,
            fence=self.fences.to_proto())

    async def Poll(self, request, context):
        self.fleet.polled(self.index)
        status = self._status()
        send_tree = not request.short and request.have_generation != self.generation
        yield subd_pb2.PollResponse(status=status, tree_follows=send_tree)
        if send_tree:
            self.fleet.tree_polls += 1
            for chunk in self.state.chunks:
                yield subd_pb2.PollResponse(tree_chunk=chunk)

    async def Fetch(self, request, context):
        if any(len(h) != 32 for h in request.hashes):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed hash")
        if self.fetch_until > time.monotonic():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a fetch is in progress")
        await self._admit(request, context, "fetch")
        self.cached.update(request.hashes)
        self.fetched_unix = time.time()
        self.fleet.fetches += 1
        self.fetch_until = time.monotonic() + self.fleet.fetch_seconds
        total = len(request.hashes)
        self.fetch_status = subd_pb2.FetchStatus(objects_total=total, objects_done=total,
                                                 in_progress=self.fleet.fetch_seconds > 0)
        self.generation += 1  # the cache changed
        self.watchers.changed()
        if self.fleet.fetch_seconds > 0:  # its end, as subd tells it
            asyncio.get_running_loop().call_later(self.fleet.fetch_seconds,
                                                  self.watchers.changed)
        return subd_pb2.FetchResponse()

    async def UpdateStream(self, request_iterator, context):
        try:
            data = await join_chunks_async(request_iterator, MAX_UPDATE_BYTES)
        except FleetError as err:
            await abort(context, err)
        return await self.Update(subd_pb2.UpdateRequest.FromString(data), context)

    async def Update(self, request, context):
        if self.fetch_until > time.monotonic() or self.updating:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "a fetch or an update is in progress")
        inline = {hashlib.sha256(data).digest() for data in request.inline_objects}
        needed = {c.inode.hash: c.inode.size for c in request.changes
                  if c.kind in (subd_pb2.ADD, subd_pb2.REPLACE) and not c.link_to
                  and c.inode.kind == Kind.REGULAR and c.inode.size}
        missing = [h for h in needed if h not in self.cached and h not in inline]
        if missing:
            self.fleet.update_errors += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{len(missing)} object(s) not fetched")
        try:
            new = self.fleet.apply(self.state, request)
        except UpdateError as err:
            self.fleet.update_errors += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        await self._admit(request, context, "update")
        self.state = new
        self.fleet.bytes_fetched += sum(size for h, size in needed.items() if h in self.cached)
        self.cached.difference_update(needed)
        self.image = self.last_successful_image = request.image_name
        self.updated_unix = time.time()
        self.fleet.updates += 1
        self.last_update = subd_pb2.UpdateResult(
            image_name=request.image_name, success=True, finished_unix=int(self.updated_unix),
            change_window_ns=100_000, paths_changed=len(request.changes))
        self.generation += 1
        self.watchers.changed()
        asyncio.get_running_loop().call_later(self.fleet.rescan_delay, self._scanned)
        return subd_pb2.UpdateResponse()

    def _scanned(self) -> None:
        self.extra_scans += 1

    async def Cleanup(self, request, context):
        await self._admit(request, context, "cleanup")
        if request.all_but_keep:
            keep = set(request.keep)
            gone = {h for h in self.cached if h not in keep}
        else:
            gone = self.cached & set(request.hashes)
        self.cached -= gone
        self.fleet.cleanups += 1
        if gone:
            self.generation += 1
            self.watchers.changed()
        return subd_pb2.CleanupResponse(removed=len(gone))


class EchoCounter:
    """The echo ceiling's handler for one address."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index

    async def echo(self, request: bytes, context) -> bytes:
        self.fleet.polled(self.index)
        return request


async def control(fleet: Fleet, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    """One control connection: a command per line, a JSON line per answer."""
    try:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "reset":
                fleet.reset()
                reply: dict = {"ok": True}
            elif command == "stats":
                reply = fleet.stats()
            elif command == "images":
                reply = fleet.images()
            elif command == "mark":
                fleet.mark()
                reply = {"ok": True, "mark_unix": fleet.mark_unix}
            elif command == "seen":
                reply = fleet.seen()
            elif command.startswith("touch "):
                _, count, seconds = command.split()
                fleet.touch(int(count), float(seconds))
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown command {command!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    finally:
        writer.close()


def initial_state(args: argparse.Namespace) -> tuple[TreeState, str]:
    if not args.image:
        return TreeState.of(sample_tree()), ""
    from fleetlib.rpc.tls import Security
    from imageserver.client import ImageServerClient
    tls_dir = args.client_tls_dir or args.tls_dir
    security = Security(None if args.insecure else Identity.load(Path(tls_dir)))
    with ImageServerClient(args.imageserver, security) as client:
        image = client.get_image(args.image)
    return TreeState.of(image.tree), args.image


async def serve(args: argparse.Namespace, fence_dir: Path) -> None:
    fleet = Fleet(args.count, args.scan_period, args.rescan_delay, args.fetch_seconds,
                  fence_dir, watch=not args.no_watch)
    credentials = None
    if not args.insecure:
        credentials = server_credentials(Identity.load(Path(args.tls_dir)))
    state, image = initial_state(args) if args.mode == "subd" else (None, "")
    servers = []
    for i in range(args.count):
        server = grpc.aio.server(options=SERVER_OPTIONS)
        if args.mode == "subd":
            sub = FakeSub(fleet, i, state, image)
            fleet.subs.append(sub)
            subd_pb2_grpc.add_SubdServicer_to_server(sub, server)
        else:
            counter = EchoCounter(fleet, i)
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(counter.echo)})])
        where = f"{address(args.base, args.first + i)}:{args.port}"
        bound = (server.add_insecure_port(where) if credentials is None
                 else server.add_secure_port(where, credentials))
        if not bound:
            raise SystemExit(f"cannot listen on {where}")
        await server.start()
        servers.append(server)
    controller = await asyncio.start_server(lambda r, w: control(fleet, r, w), "127.0.0.1",
                                            args.control_port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sampler = asyncio.create_task(fleet.sample_coverage())
    print(f"ready {args.count}", flush=True)
    try:
        await stop.wait()
    finally:
        sampler.cancel()
        controller.close()
        await asyncio.gather(*(s.stop(None) for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, required=True, help="Subs in this process.")
    parser.add_argument("--first", type=int, default=0, help="Index of the first sub.")
    parser.add_argument("--port", type=int, required=True, help="Port on every address.")
    parser.add_argument("--base", default="127.1", help="First two octets of the addresses.")
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--mode", choices=["subd", "echo"], default="subd")
    parser.add_argument("--image", help="Start every sub holding this image's tree.")
    parser.add_argument("--imageserver", default="localhost:6971")
    parser.add_argument("--scan-period", type=float, default=1.0)
    parser.add_argument("--rescan-delay", type=float, default=0.05,
                        help="Seconds from an update to the scan that sees it.")
    parser.add_argument("--fetch-seconds", type=float, default=0.0,
                        help="Simulated duration of every fetch (no bytes move).")
    parser.add_argument("--tls-dir", help="subd identity (ca.pem, cert.pem, key.pem).")
    parser.add_argument("--client-tls-dir",
                        help="Identity for reading --image (default: --tls-dir).")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--no-watch", action="store_true",
                        help="Answer Watch with UNIMPLEMENTED (an older subd): polled.")
    args = parser.parse_args()
    if not args.insecure and not args.tls_dir:
        parser.error("give --tls-dir or --insecure")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * args.count + 100  # a listener and an accepted connection per sub
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if needed > hard:
        print(f"warning: {args.count} subs need about {needed} file descriptors, the limit "
              f"is {hard}: split them across processes", file=sys.stderr)
    shm = Path("/dev/shm")
    fence_dir = Path(tempfile.mkdtemp(prefix="fake-subd-fences-",
                                      dir=shm if shm.is_dir() else None))
    try:
        asyncio.run(serve(args, fence_dir))
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(fence_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
