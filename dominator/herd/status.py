"""What an operator sees of a sub: its status, and one report of it that every view
converts from (the gRPC API's SubInfo, the CLI's JSON, the dashboard's host rows)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dominator.herd.records import Disabled
from fleetlib.fstree.listing import quote
from fleetlib.wire import dominator_pb2
from mdb.machine import Machine


class Status(enum.StrEnum):
    """What an operator sees for a sub."""

    UNREACHABLE = "unreachable"
    POLLING = "polling"
    FETCHING = "fetching"
    UPDATING = "updating"
    SYNCED = "synced"
    UPDATES_DISABLED = "updates disabled"
    UNSAFE = "unsafe update"
    NO_SPACE = "insufficient space"
    IMAGE_NOT_READY = "image not ready"
    IMAGE_NOT_TRUSTED = "image not trusted"  # unsigned or not by a `--trusted-keys` key
    MISSING_COMPUTED = "missing computed file"
    FAILED = "update failed"
    INTRUSION = "intrusion"
    NO_IMAGE = "no image"
    BAD_MDB_ENTRY = "invalid MDB entry"   # its row does not validate: not converged
    SCAN_FAILED = "scan failed"           # the sub's scans fail: its tree cannot be trusted
    TREE_TOO_LARGE = "tree too large"     # over `dominator serve --max-tree-bytes`
    DISRUPTION_DENIED = "disruption denied"  # a HighImpact trigger would fire, not allowed
    ELSEWHERE = "managed elsewhere"       # its shard is another dominator's: not polled here
    LEASE_LOST = "lease lost"             # its shard's lease is not trusted now: read-only


def disruption_denied(hostname: str, services: Iterable[str]) -> str:
    """Why an update that would fire HighImpact triggers waits, and what lets it through."""
    return (f"HighImpact trigger(s) {', '.join(services)} would fire: "
            f"`dominator fleet allow-disruption {hostname}` (or `dominator deploy start "
            "--allow-disruption`) allows it once")


class Remembered(Protocol):
    """What the state store remembers of a host (state.HostRecord)."""

    @property
    def safety_cleared(self) -> bool: ...
    @property
    def intrusion_paths(self) -> tuple[str, ...]: ...
    @property
    def intrusion_unix(self) -> int: ...
    @property
    def last_sync_unix(self) -> int: ...
    @property
    def current_image(self) -> str: ...
    @property
    def disruption_allowed(self) -> bool: ...
    @property
    def paused(self) -> Disabled | None: ...


class Observed(Protocol):
    """What the herd knows of a sub now (herd.Sub)."""

    @property
    def machine(self) -> Machine: ...
    @property
    def status(self) -> Status: ...
    @property
    def last_error(self) -> str: ...
    @property
    def last_poll_unix(self) -> float: ...
    @property
    def last_scan_unix(self) -> float: ...
    @property
    def change_window_ns(self) -> int: ...
    @property
    def history(self) -> Iterable[tuple[float, str, str]]: ...  # transitions, oldest first
    @property
    def kept_paths(self) -> tuple[str, ...]: ...  # kept directories the image lacks
    @property
    def owner(self) -> str: ...  # the dominator holding its shard ("" when none is known)


@dataclass(frozen=True)
class HistoryEntry:
    """One status transition of a sub (message: its error or detail, "" for none)."""

    time_unix: int
    status: str
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return {"time_unix": self.time_unix, "status": self.status, "message": self.message}


@dataclass(frozen=True)
class SubReport:
    """One sub as operators see it; text made printable (listing.quote)."""

    hostname: str
    address: str
    status: str
    required_image: str
    planned_image: str
    current_image: str
    last_poll_unix: int
    last_sync_unix: int
    last_scan_unix: int
    last_error: str
    intrusion_paths: tuple[str, ...]
    intrusion_unix: int
    change_window_ns: int
    updates_disabled: bool
    safety_cleared: bool
    history: tuple[str, ...]  # "UNIX STATUS[: ERROR]", oldest first
    kept_paths: tuple[str, ...] = ()  # directories the image lacks, kept for filtered content
    tags: Mapping[str, str] = field(default_factory=dict)
    disruption_allowed: bool = False  # the next update may run HighImpact triggers (once)
    history_entries: tuple[HistoryEntry, ...] = ()  # `history`, structured
    pause: Disabled | None = None  # the host's own pause (None: not paused, or it ran out)
    owner: str = ""  # the dominator managing it (holding its shard; "" when none is known)

    @classmethod
    def of(cls, sub: Observed, record: Remembered) -> SubReport:
        """The report of a sub of the herd, with what the state store remembers of it."""
        machine = sub.machine
        paused = record.paused
        return cls(
            hostname=machine.hostname, address=machine.address, status=sub.status.value,
            required_image=machine.required_image, planned_image=machine.planned_image,
            current_image=record.current_image, last_poll_unix=int(sub.last_poll_unix),
            last_sync_unix=record.last_sync_unix, last_scan_unix=int(sub.last_scan_unix),
            last_error=quote(sub.last_error),
            intrusion_paths=tuple(quote(path) for path in record.intrusion_paths),
            intrusion_unix=record.intrusion_unix, change_window_ns=sub.change_window_ns,
            updates_disabled=machine.disable_updates, safety_cleared=record.safety_cleared,
            history=tuple(quote(f"{int(unix)} {status}{': ' + error if error else ''}")
                          for unix, status, error in sub.history),
            kept_paths=tuple(quote(path) for path in sub.kept_paths), tags=dict(machine.tags),
            disruption_allowed=record.disruption_allowed,
            history_entries=tuple(HistoryEntry(int(unix), status, quote(error))
                                  for unix, status, error in sub.history),
            pause=None if paused is None or paused.expired() else paused,
            owner=quote(sub.owner))

    @classmethod
    def from_wire(cls, info: dominator_pb2.SubInfo) -> SubReport:
        """The report a SubInfo carries."""
        return cls(
            hostname=info.hostname, address=info.address, status=info.status,
            required_image=info.required_image, planned_image=info.planned_image,
            current_image=info.current_image, last_poll_unix=info.last_poll_unix,
            last_sync_unix=info.last_sync_unix, last_scan_unix=info.last_scan_unix,
            last_error=info.last_error, intrusion_paths=tuple(info.intrusion_paths),
            intrusion_unix=info.intrusion_unix, change_window_ns=info.change_window_ns,
            updates_disabled=info.updates_disabled, safety_cleared=info.safety_cleared,
            history=tuple(info.history), kept_paths=tuple(info.kept_paths),
            tags=dict(info.tags), disruption_allowed=info.disruption_allowed,
            history_entries=tuple(HistoryEntry(e.time_unix, e.status, e.message)
                                  for e in info.history_entries),
            pause=Disabled(info.pause.by, info.pause.reason, info.pause.since_unix,
                           info.pause.until_unix) if info.HasField("pause") else None,
            owner=info.owner)

    def to_wire(self) -> dominator_pb2.SubInfo:
        """The gRPC API's SubInfo."""
        return dominator_pb2.SubInfo(
            hostname=self.hostname, address=self.address, status=self.status,
            required_image=self.required_image, planned_image=self.planned_image,
            current_image=self.current_image, last_poll_unix=self.last_poll_unix,
            last_sync_unix=self.last_sync_unix, last_scan_unix=self.last_scan_unix,
            last_error=self.last_error, intrusion_paths=list(self.intrusion_paths),
            intrusion_unix=self.intrusion_unix, change_window_ns=self.change_window_ns,
            updates_disabled=self.updates_disabled, safety_cleared=self.safety_cleared,
            history=list(self.history), kept_paths=list(self.kept_paths), tags=self.tags,
            disruption_allowed=self.disruption_allowed,
            history_entries=[dominator_pb2.HistoryEntry(time_unix=e.time_unix, status=e.status,
                                                        message=e.message)
                             for e in self.history_entries],
            pause=dominator_pb2.HostPause(by=self.pause.by, reason=self.pause.reason,
                                          since_unix=self.pause.unix,
                                          until_unix=self.pause.until_unix)
            if self.pause is not None else None, owner=self.owner)

    def to_json(self) -> dict[str, Any]:
        """Plain data (`dominator fleet list --json`, the dashboard's host rows)."""
        return {"hostname": self.hostname, "address": self.address, "status": self.status,
                "required_image": self.required_image, "planned_image": self.planned_image,
                "current_image": self.current_image, "last_poll_unix": self.last_poll_unix,
                "last_sync_unix": self.last_sync_unix, "last_scan_unix": self.last_scan_unix,
                "last_error": self.last_error, "intrusion_paths": list(self.intrusion_paths),
                "intrusion_unix": self.intrusion_unix,
                "change_window_ms": self.change_window_ns / 1e6,
                "updates_disabled": self.updates_disabled,
                "safety_cleared": self.safety_cleared, "history": list(self.history),
                "kept_paths": list(self.kept_paths), "tags": dict(self.tags),
                "disruption_allowed": self.disruption_allowed,
                "history_entries": [entry.to_json() for entry in self.history_entries],
                "pause": None if self.pause is None else {
                    "by": self.pause.by, "reason": self.pause.reason,
                    "since_unix": self.pause.unix, "until_unix": self.pause.until_unix},
                "owner": self.owner}
