"""The Subd gRPC service: Poll, Fetch, Update, Cleanup, GetFiles and configuration,
over the scanner, the object cache, the fetcher and the updater."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fleetlib.errors import FleetError, NotFoundError, PreconditionError
from fleetlib.fstree.exclusions import SUBD_DIR
from fleetlib.fstree.hashing import check_hash
from fleetlib.fstree.listing import quote
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.safeopen import open_under
from fleetlib.fstree.tree import Kind, Tree, check_clean_path
from fleetlib.rpc.chunks import CHUNK_SIZE, join_chunks_async, split_message
from fleetlib.rpc.status import abort
from fleetlib.wire import subd_pb2, subd_pb2_grpc, tree_pb2
from fleetlib.wire.codec import tree_to_proto
from subd.changes import UpdatePlan, plan_from_proto
from subd.configuration import (
    EXCLUSIONS,
    check_configuration,
    configuration_json,
    requested,
)
from subd.fence import Fences, fence_of
from subd.fetcher import Fetcher, free_bytes
from subd.scanner import Scanner
from subd.state import SubdState, UpdateOutcome
from subd.trust import TrustedImages
from subd.updater import Updater
from subd.watch import Watchers

log = logging.getLogger(__name__)

MAX_GET_FILES = 10_000
# Configuration fields that are ScanConfig fields of the same name.
SCAN_SETTINGS = ("scan_speed_percent", "cpu_percent", "verify_period_seconds")
# The most a streamed update may carry: protobuf cannot encode a message of 2 GiB, and a
# first sync of a large host (a few hundred thousand paths) plus 64 MiB of computed
# files is well below 1 GiB; the bound stops a caller making subd buffer without end.
MAX_UPDATE_BYTES = 2 << 30


def installed_files(plan: UpdatePlan) -> list[tuple[str, bytes]]:
    """(path, hash) of every regular file an update wrote or touched."""
    return [(entry.path, entry.new.hash) for entry in plan.diff.entries
            if entry.new is not None and entry.new.kind == Kind.REGULAR and entry.new.size]


def outcome_to_proto(outcome: UpdateOutcome | None, in_progress: bool) -> subd_pb2.UpdateResult:
    """The wire form of the last update's result."""
    if outcome is None:
        return subd_pb2.UpdateResult(in_progress=in_progress)
    return subd_pb2.UpdateResult(  # texts may name undecodable paths: escape them
        in_progress=in_progress, image_name=outcome.image_name, success=outcome.success,
        error=quote(outcome.error), finished_unix=outcome.finished_unix,
        change_window_ns=outcome.change_window_ns, paths_changed=outcome.paths_changed,
        triggers_run=outcome.triggers_run, warnings=[quote(w) for w in outcome.warnings])


class SubdService(subd_pb2_grpc.SubdServicer):
    """One host's agent."""

    def __init__(self, root: Path, scanner: Scanner, cache: ObjectStore, fetcher: Fetcher,
                 updater: Updater, state: SubdState, fences: Fences,
                 trust: TrustedImages | None = None) -> None:
        self.root = root
        self.fences = fences  # refuses mutating calls of a former lease holder
        self.trust = trust  # subd --trusted-keys: only signed images are fetched and applied
        self.scanner = scanner
        self.cache = cache
        self.fetcher = fetcher
        self.updater = updater
        self.state = state
        self._update_lock = asyncio.Lock()
        self._encoded: tuple[int, bytes] | None = None  # (generation, serialized tree)
        self._cached: tuple[int, int] | None = None  # (generation, objects in the cache)
        self._pinned: tuple[tuple[int, int], int] | None = None  # ((generation, pins), count)
        # A boost's end: (timer, settings to restore by key, when in Unix time).
        self._restore: tuple[asyncio.TimerHandle, dict[str, Any], float] | None = None
        self.polls = 0  # Poll calls answered (subd_polls)
        self.watchers = Watchers(self.watch_event)  # the Watch streams
        scanner.add_listener(self.watchers.changed)

    def status(self) -> subd_pb2.SubStatus:
        """Everything Poll always reports."""
        scanner = self.scanner
        tree = scanner.tree
        return subd_pb2.SubStatus(
            generation=scanner.generation, fingerprint=scanner.fingerprint,
            scan_count=scanner.scan_count, last_scan_ns=int(scanner.last_scan_seconds * 1e9),
            last_scan_unix=int(scanner.last_scan_unix), free_bytes=self._free_bytes(),
            fetch=self.fetcher.progress.to_proto(),
            last_update=outcome_to_proto(self.state.last_update, self._update_lock.locked()),
            last_successful_image=self.state.last_successful_image,
            cached_objects=self._cached_objects(),
            inodes=len(tree.inodes) if tree is not None else 0,
            is_root=os.geteuid() == 0, scan_exclusions=scanner.config.exclusions,
            scan_error=quote(scanner.scan_error), pinned_objects=self._pinned_objects(),
            fence=self.fences.to_proto(), fence_error=quote(self.fences.error))

    def watch_event(self) -> subd_pb2.WatchEvent:
        """What a Watch stream reports now."""
        scanner, last = self.scanner, self.state.last_update
        return subd_pb2.WatchEvent(
            generation=scanner.generation, scan_count=scanner.scan_count,
            fetch_in_progress=self.fetcher.progress.in_progress,
            update_in_progress=self._update_lock.locked(),
            last_update_finished_unix=last.finished_unix if last is not None else 0,
            scan_error=quote(scanner.scan_error), last_scan_unix=int(scanner.last_scan_unix))

    def _free_bytes(self) -> int:
        """Free bytes on ROOT's filesystem; 0 while ROOT cannot be reached (Poll still
        answers, its scan_error saying why)."""
        try:
            return free_bytes(self.root)
        except OSError:
            return 0

    def _cached_objects(self) -> int:
        generation = self.scanner.generation  # rises whenever the cache changes
        if self._cached is None or self._cached[0] != generation:
            self._cached = (generation, sum(1 for _ in self.cache))
        return self._cached[1]

    def _pinned_objects(self) -> int:
        """Cached objects a recent fetch pinned (those installed since are gone)."""
        pins = self.fetcher.pins.live()
        key = (self.scanner.generation, len(pins))
        if self._pinned is None or self._pinned[0] != key:
            self._pinned = (key, sum(1 for digest in pins if self.cache.has(digest)))
        return self._pinned[1]

    def _tree_bytes(self) -> tuple[int, bytes] | None:
        generation, tree = self.scanner.generation, self.scanner.tree
        if tree is None:
            return None
        if self._encoded is None or self._encoded[0] != generation:
            self._encoded = (generation, tree_to_proto(tree).SerializeToString())
        return self._encoded

    async def Poll(self, request: subd_pb2.PollRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[subd_pb2.PollResponse]:
        self.polls += 1
        status = self.status()
        send_tree = not request.short and request.have_generation != status.generation
        encoded = self._tree_bytes() if send_tree else None
        yield subd_pb2.PollResponse(status=status, tree_follows=encoded is not None,
                                    tree_bytes=len(encoded[1]) if encoded is not None else 0)
        if encoded is not None:
            for chunk in split_message(encoded[1]):
                yield subd_pb2.PollResponse(tree_chunk=chunk)

    async def Fetch(self, request: subd_pb2.FetchRequest, context: grpc.aio.ServicerContext
                    ) -> subd_pb2.FetchResponse:
        try:
            fence = fence_of(request)
            self.fences.check(fence, "fetch")
            hashes = [check_hash(h) for h in request.hashes]
            servers = list(request.servers) or [request.server]
            if self.trust is not None:
                manifest = await self.trust.manifest(request.image_name, servers, "fetch")
                self.trust.check_fetch(manifest, hashes)
            self.fences.admit(fence, "fetch")  # again: a newer owner may have come meanwhile
            self.fetcher.start(servers, hashes)
            self.watchers.changed()  # a fetch in progress (its end bumps the generation)
        except FleetError as err:
            await abort(context, err)
        return subd_pb2.FetchResponse()

    async def Update(self, request: subd_pb2.UpdateRequest, context: grpc.aio.ServicerContext
                     ) -> subd_pb2.UpdateResponse:
        return await self._update(request, context)

    async def UpdateStream(self, request_iterator: AsyncIterator[tree_pb2.Chunk],
                           context: grpc.aio.ServicerContext) -> subd_pb2.UpdateResponse:
        try:
            data = await join_chunks_async(request_iterator, MAX_UPDATE_BYTES)
            request = await asyncio.to_thread(subd_pb2.UpdateRequest.FromString, data)
        except FleetError as err:
            await abort(context, err)
        except DecodeError:
            await abort(context, FleetError("update stream is not a valid UpdateRequest"))
        return await self._update(request, context)

    async def _update(self, request: subd_pb2.UpdateRequest, context: grpc.aio.ServicerContext
                      ) -> subd_pb2.UpdateResponse:
        """Validate and apply one update, however it arrived."""
        try:
            fence = fence_of(request)
            self.fences.check(fence, "update")
            plan = await asyncio.to_thread(plan_from_proto, request)  # 100k paths take a while
            if self._update_lock.locked():
                raise PreconditionError("an update is already in progress")
            if self.fetcher.progress.in_progress:
                raise PreconditionError("a fetch is in progress; update after it ends")
            tree = self.scanner.tree
            if tree is None:
                raise PreconditionError("subd has not finished its first scan yet")
            async with self._updating():
                await self._check_signed(plan)
                self.fences.admit(fence, "update")  # no await until the apply has started
                outcome = await asyncio.to_thread(self._apply, plan, tree)
        except FleetError as err:
            await abort(context, err)
        if not outcome.success:
            await context.abort(grpc.StatusCode.ABORTED, f"update failed: {outcome.error}")
        return subd_pb2.UpdateResponse()

    @contextlib.asynccontextmanager
    async def _updating(self) -> AsyncIterator[None]:
        """Hold the update lock, telling watchers when it is taken and released."""
        await self._update_lock.acquire()
        self.watchers.changed()
        try:
            yield
        finally:
            self._update_lock.release()
            self.watchers.changed()

    async def _check_signed(self, plan: UpdatePlan) -> None:
        """With trusted keys: refuse (and report as the last update) an update that does
        not make the host hold exactly its signed image."""
        if self.trust is None:
            return
        try:
            manifest = await self.trust.manifest(plan.image_name, plan.servers, "update")
            await asyncio.to_thread(self.trust.check_update, manifest, plan)
        except FleetError as err:
            log.warning("update to %s refused: %s", plan.image_name or "(unnamed)", err)
            self.state.record(UpdateOutcome(plan.image_name, error=str(err),
                                            finished_unix=int(time.time())))
            raise

    def _apply(self, plan: UpdatePlan, tree: Tree) -> UpdateOutcome:
        """Apply with scanning paused, then let the next pass trust what was installed."""
        for data in plan.inline_objects:  # computed files travel with the update
            if data:
                self.cache.add_bytes(data)
        try:
            with self.scanner.paused():
                outcome = self.updater.apply(plan, tree, self.scanner.excluded)
                if outcome.success:
                    self.scanner.trust(installed_files(plan), time.time())
            return outcome
        finally:
            self.scanner.bump_generation()  # the cache lost the objects it installed
            self.scanner.request_scan()

    async def Cleanup(self, request: subd_pb2.CleanupRequest, context: grpc.aio.ServicerContext
                      ) -> subd_pb2.CleanupResponse:
        try:
            hashes = [check_hash(h) for h in request.hashes]
            keep = {check_hash(h) for h in request.keep}
            self.fences.admit(fence_of(request), "cleanup")
        except FleetError as err:
            await abort(context, err)
        if request.all_but_keep:
            hashes = [digest for digest in self.cache if digest not in keep]
        pinned = self.fetcher.pins.live()
        kept = [digest for digest in hashes if digest in pinned and self.cache.has(digest)]
        removed = sum(1 for digest in hashes if digest not in pinned
                      and self.cache.remove(digest))
        if removed:
            self.scanner.bump_generation()
        if removed or kept:
            log.info("cleanup removed %d cached objects%s", removed,
                     f", kept {len(kept)} a recent fetch pinned" if kept else "")
        return subd_pb2.CleanupResponse(removed=removed, kept_pinned=len(kept))

    async def GetFiles(self, request: subd_pb2.GetFilesRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[subd_pb2.GetFilesResponse]:
        if len(request.paths) > MAX_GET_FILES:
            await abort(context, FleetError(f"at most {MAX_GET_FILES} paths per request"))
        for raw in request.paths:
            try:
                path = check_clean_path(os.fsdecode(raw))
                if path == f"/{SUBD_DIR}" or path.startswith(f"/{SUBD_DIR}/"):
                    raise NotFoundError(f"{path} is subd's own state")
                reader = os.fdopen(open_under(self.root, path)[0], "rb")  # no FIFO, device
            except FleetError as err:
                await abort(context, err)
            except OSError as err:
                if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink: it is no file
                    await abort(context, FleetError(f"{path}: not a regular file (a symlink)"))
                yield subd_pb2.GetFilesResponse(path=raw, missing=True, last=True)
                continue
            with reader:
                while True:
                    data = reader.read(CHUNK_SIZE)
                    last = len(data) < CHUNK_SIZE
                    yield subd_pb2.GetFilesResponse(path=raw, data=data, last=last)
                    if last:
                        break

    async def GetConfiguration(self, request: subd_pb2.GetConfigurationRequest,
                               context: grpc.aio.ServicerContext) -> subd_pb2.Configuration:
        return self._configuration()

    async def SetConfiguration(self, request: subd_pb2.Configuration,
                               context: grpc.aio.ServicerContext) -> subd_pb2.Configuration:
        """Change what the request sets (0 or an empty list: unchanged), all or nothing;
        INVALID_ARGUMENT for a value out of range. With for_seconds, a boost: the old
        values come back after that long. Lasts until subd restarts."""
        try:
            check_configuration(request)
            self.fences.admit(fence_of(request), "configuration change")
            values = requested(request)
            previous = {key: value for key, value in self._settings().items()
                        if key in values}
            self._use_settings(values)
        except FleetError as err:
            await abort(context, err)
        self._plan_restore(values, previous, request.for_seconds)
        log.info("configuration changed%s: %s",
                 f" for {request.for_seconds} s" if request.for_seconds else "",
                 configuration_json(self._configuration()))
        return self._configuration()

    def _settings(self) -> dict[str, Any]:
        """Every setting's current value, by Configuration key."""
        config = self.scanner.config
        values: dict[str, Any] = {key: getattr(config, key) for key in SCAN_SETTINGS}
        values["network_speed_percent"] = self.fetcher.network_speed_percent
        values[EXCLUSIONS] = list(config.exclusions)
        return values

    def _use_settings(self, values: dict[str, Any]) -> None:
        """Use these settings (by Configuration key) from now on; FleetError when the
        scanner refuses them (nothing changes then)."""
        scan = {key: value for key, value in values.items() if key in SCAN_SETTINGS}
        if EXCLUSIONS in values:
            scan["exclusions"] = values[EXCLUSIONS]
        self.scanner.reconfigure(dataclasses.replace(self.scanner.config, **scan))
        if "network_speed_percent" in values:
            self.fetcher.network_speed_percent = values["network_speed_percent"]

    def _plan_restore(self, values: dict[str, Any], previous: dict[str, Any],
                      seconds: int) -> None:
        """After a change: a boost adds what it changed to the settings to restore (a
        boost on a boost keeps the first values) and sets when; a lasting change is the
        new value to keep, so it is no longer restored."""
        restore: dict[str, Any] = {}
        until = 0.0
        if self._restore is not None:
            handle, restore, until = self._restore
            handle.cancel()
            self._restore = None
        if seconds:
            restore = {**previous, **restore}
            until = time.time() + seconds
        else:
            restore = {key: value for key, value in restore.items() if key not in values}
        if restore:
            handle = asyncio.get_running_loop().call_later(max(0.0, until - time.time()),
                                                           self._end_boost)
            self._restore = (handle, restore, until)

    def _end_boost(self) -> None:
        if self._restore is None:
            return
        _, values, _ = self._restore
        self._restore = None
        try:
            self._use_settings(values)
        except FleetError as err:  # they were in use before the boost: cannot happen
            log.error("cannot restore the settings a boost changed: %s", err)
            return
        log.info("boost over: restored %s", values)

    def _configuration(self) -> subd_pb2.Configuration:
        config = self.scanner.config
        restore = self._restore
        return subd_pb2.Configuration(
            scan_speed_percent=int(config.scan_speed_percent), cpu_percent=int(config.cpu_percent),
            network_speed_percent=int(self.fetcher.network_speed_percent),
            scan_exclusions=config.exclusions,
            verify_period_seconds=int(config.verify_period_seconds),
            restore_unix=int(restore[2]) if restore else 0,
            restore_keys=sorted(restore[1]) if restore else [])

    async def Watch(self, request: subd_pb2.WatchRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[subd_pb2.WatchEvent]:
        async for event in self.watchers.stream(request, context):
            yield event
