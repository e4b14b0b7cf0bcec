"""An update as both ends see it: the diff entries to apply plus the image's filter
and triggers, and its wire form (`fleet.UpdateRequest`), validated on decode."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from fleetlib.errors import FleetError
from fleetlib.fstree.diff import Change, DiffEntry, TreeDiff
from fleetlib.fstree.filter import Filter
from fleetlib.fstree.tree import check_clean_path
from fleetlib.fstree.triggers import Trigger, make_trigger
from fleetlib.wire import imageserver_pb2, subd_pb2
from fleetlib.wire.codec import inode_from_proto, inode_to_proto

MAX_INLINE_BYTES = 64 << 20
_KIND_TO_WIRE = {Change.ADD: subd_pb2.ADD, Change.REPLACE: subd_pb2.REPLACE,
                 Change.METADATA: subd_pb2.METADATA, Change.DELETE: subd_pb2.DELETE}
_KIND_FROM_WIRE = {wire: kind for kind, wire in _KIND_TO_WIRE.items()}


@dataclass
class UpdatePlan:
    """Everything subd needs to make its tree match an image (docs/DESIGN.md step 3)."""

    image_name: str
    diff: TreeDiff
    filter: Filter | None
    triggers: list[Trigger] = field(default_factory=list)
    old_triggers: list[Trigger] = field(default_factory=list)
    disable_safety_check: bool = False
    disruption_permitted: bool = False
    inline_objects: list[bytes] = field(default_factory=list)  # computed files' content
    servers: list[str] = field(default_factory=list)  # where subd --trusted-keys reads the
    # image's signed manifest (image servers in order)


def _triggers_to_wire(triggers: list[Trigger]) -> list[imageserver_pb2.Trigger]:
    return [imageserver_pb2.Trigger(match_lines=t.match_lines, service=t.service,
                                    do_reload=t.do_reload, do_reboot=t.do_reboot,
                                    high_impact=t.high_impact) for t in triggers]


def _triggers_from_wire(triggers: Iterable[imageserver_pb2.Trigger]) -> list[Trigger]:
    return [make_trigger(t.match_lines, t.service, t.do_reload, t.do_reboot, t.high_impact)
            for t in triggers]


def plan_to_proto(plan: UpdatePlan) -> subd_pb2.UpdateRequest:
    """Encode an update for the wire."""
    request = subd_pb2.UpdateRequest(
        image_name=plan.image_name,
        triggers=_triggers_to_wire(plan.triggers),
        old_triggers=_triggers_to_wire(plan.old_triggers),
        disable_safety_check=plan.disable_safety_check,
        disruption_permitted=plan.disruption_permitted,
        inline_objects=plan.inline_objects,
        servers=plan.servers,
    )
    for entry in plan.diff.entries:
        change = request.changes.add(path=os.fsencode(entry.path),
                                     kind=_KIND_TO_WIRE[entry.change])
        if entry.new is not None:
            change.inode.CopyFrom(inode_to_proto(0, entry.new))
        if entry.link_to is not None:
            change.link_to = os.fsencode(entry.link_to)
    if plan.filter is not None:
        request.filter.lines.extend(plan.filter.lines)
    return request


def plan_from_proto(request: subd_pb2.UpdateRequest) -> UpdatePlan:
    """Decode and validate an update: clean paths, known kinds, inodes where needed."""
    entries = []
    for change in request.changes:
        path = check_clean_path(os.fsdecode(change.path))
        kind = _KIND_FROM_WIRE.get(change.kind)
        if kind is None:
            raise FleetError(f"{path}: unknown change kind {change.kind}")
        if path == "/" and kind in (Change.DELETE, Change.REPLACE):
            raise FleetError("the root directory cannot be deleted or replaced")
        link_to = check_clean_path(os.fsdecode(change.link_to)) if change.link_to else None
        inode = None
        if kind != Change.DELETE:
            if not change.HasField("inode"):
                raise FleetError(f"{path}: {kind.name.lower()} without an inode")
            inode = inode_from_proto(change.inode)
        entries.append(DiffEntry(path, kind, None, inode, link_to))
    flt = Filter.from_lines(list(request.filter.lines), "update filter") \
        if request.HasField("filter") else None
    inline = list(request.inline_objects)
    if sum(len(data) for data in inline) > MAX_INLINE_BYTES:
        raise FleetError(f"inline objects exceed {MAX_INLINE_BYTES} bytes: fetch them instead")
    return UpdatePlan(request.image_name, TreeDiff(entries), flt,
                      _triggers_from_wire(request.triggers),
                      _triggers_from_wire(request.old_triggers),
                      request.disable_safety_check, request.disruption_permitted, inline,
                      list(request.servers))
