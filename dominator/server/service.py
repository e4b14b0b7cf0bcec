"""The Dominator gRPC service: the herd's state for operators, the fleet-wide
switch, safety clearances, intrusion acknowledgements, fast updates, the MDB (in
Dominator's JSON format), the HTTP API's named tokens and the audit log. Every
change is written to the audit log, with the caller's certificate CN."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from dominator.herd.herd import Herd, Sub, describe_pause
from dominator.herd.records import Disabled
from dominator.herd.state import DominatorState
from dominator.herd.status import Status, SubReport
from dominator.herd.tokenstore import ApiTokens
from fleetlib.audit import caller, format_time
from fleetlib.auditlog import AuditLog
from fleetlib.errors import FleetError, NotFoundError, PreconditionError
from fleetlib.fstree.listing import quote
from fleetlib.rpc.status import abort
from fleetlib.suggest import close_matches, did_you_mean
from fleetlib.wire import audit_pb2, dominator_pb2, dominator_pb2_grpc
from mdb.machine import IMAGE_FIELDS, Machine, parse_machines_json
from mdb.store import Mdb

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext  # every method's call context

# Statuses that end a fast update (after its first cycle).
FINAL = {Status.SYNCED, Status.INTRUSION, Status.UNSAFE, Status.FAILED, Status.NO_SPACE,
         Status.UNREACHABLE, Status.MISSING_COMPUTED, Status.IMAGE_NOT_READY,
         Status.UPDATES_DISABLED, Status.NO_IMAGE, Status.DISRUPTION_DENIED, Status.LEASE_LOST}
FAST_UPDATE_TIMEOUT = 600.0
MAX_PAUSE_SECONDS = 10 * 366 * 86400  # an expiry further away is surely a mistake
HOSTS_NAMED = 3  # hosts an unknown-image refusal names for each image


def pause_to_wire(paused: Disabled) -> dominator_pb2.HostPause:
    """The wire view of a host's pause."""
    return dominator_pb2.HostPause(by=paused.by, reason=paused.reason, since_unix=paused.unix,
                                   until_unix=paused.until_unix)


def unknown_images_message(unknown: dict[str, list[str]], uses: dict[str, list[str]]) -> str:
    """One line refusing images the image server lacks: each with where it would be
    set (`uses`: 'RequiredImage of host-1', ...) and the similar names it holds."""
    parts = []
    for name, similar in sorted(unknown.items()):
        where = uses[name]
        named = ", ".join(where[:HOSTS_NAMED]) + (
            f" and {len(where) - HOSTS_NAMED} more" if len(where) > HOSTS_NAMED else "")
        suggestion = did_you_mean(similar)
        parts.append(f"{name} ({named}" + (f"; {suggestion})" if suggestion else ")"))
    what = "unknown image" if len(parts) == 1 else f"{len(parts)} unknown images"
    return (f"{what}: {', '.join(parts)}: the image server holds no such image; nothing "
            "changed: add the image first, or use --force to set it anyway")


def until_unix(expires_in_seconds: int) -> int:
    """When a switch that expires in that many seconds runs out (0: never, for 0);
    FleetError for an expiry so far away it is surely a mistake."""
    if expires_in_seconds > MAX_PAUSE_SECONDS:
        raise FleetError(f"an expiry {expires_in_seconds} s away is over 10 years away: "
                         "leave it out for a switch that holds until lifted")
    return int(time.time()) + expires_in_seconds if expires_in_seconds else 0


def forced(force: bool) -> dict[str, bool]:
    """The audit detail of a write made with --force (none without: the usual case)."""
    return {"force": True} if force else {}


def until_text(until: int) -> str:
    """' until 2026-12-01T18:00:00Z' for an audit summary ('' for no expiry)."""
    return f" until {format_time(until * 10**9)}" if until else ""


def sub_info(sub: Sub, state: DominatorState) -> dominator_pb2.SubInfo:
    """The wire view of one sub, with what the state store remembers of it."""
    return SubReport.of(sub, state.host(sub.machine.hostname)).to_wire()


class DominatorService(dominator_pb2_grpc.DominatorServicer):
    """Admin API over the herd, its state store and the MDB."""

    def __init__(self, herd: Herd, state: DominatorState, mdb: Mdb, audit: AuditLog,
                 tokens: ApiTokens) -> None:
        self.herd = herd
        self.state = state
        self.mdb = mdb
        self.audit = audit
        self.tokens = tokens

    async def _record(self, context: Context, action: str, summary: str,
                      **details: object) -> None:
        """Write the caller's change to the audit log."""
        await asyncio.to_thread(self.audit.record, caller(context), action, summary, **details)

    async def _info(self, hostname: str) -> dominator_pb2.SubInfo:
        sub = self.herd.find(hostname)
        return await asyncio.to_thread(sub_info, sub, self.state)

    async def ListSubs(self, request: dominator_pb2.ListSubsRequest,
                      context: Context) -> dominator_pb2.ListSubsResponse:
        subs = [await asyncio.to_thread(sub_info, sub, self.state)
                for _, sub in sorted(self.herd.subs.items())]
        return dominator_pb2.ListSubsResponse(subs=subs)

    async def GetSubInfo(self, request: dominator_pb2.HostRequest,
                        context: Context) -> dominator_pb2.SubInfo:
        try:
            return await self._info(request.hostname)
        except FleetError as err:
            await abort(context, NotFoundError(str(err)))

    async def GetFleetStatus(self, request: dominator_pb2.GetFleetStatusRequest,
                            context: Context) -> dominator_pb2.FleetStatus:
        return await self._fleet_status()

    async def _fleet_status(self) -> dominator_pb2.FleetStatus:
        disabled = await asyncio.to_thread(self.state.updates_disabled)
        counts: dict[str, int] = {}
        for sub in self.herd.subs.values():
            counts[sub.status.value] = counts.get(sub.status.value, 0) + 1
        reply = dominator_pb2.FleetStatus(
            updates_disabled=disabled is not None, hosts=len(self.herd.subs),
            hosts_by_status=counts, diff_cache_hits=self.herd.cache.hits,
            diff_cache_misses=self.herd.cache.misses, mdb_error=self.herd.mdb_error)
        if disabled is not None:
            reply.disabled_by, reply.disabled_reason = disabled.by, disabled.reason
            reply.disabled_unix = disabled.unix
            reply.disabled_until_unix = disabled.until_unix
        return reply

    async def DisableUpdates(self, request: dominator_pb2.DisableUpdatesRequest,
                            context: Context) -> dominator_pb2.FleetStatus:
        if not request.reason.strip():
            await abort(context, FleetError("give a reason for disabling updates"))
        try:
            until = until_unix(request.expires_in_seconds)
        except FleetError as err:
            await abort(context, err)
        by, reason = caller(context), request.reason.strip()
        disabled = await asyncio.to_thread(self.state.disable_updates, by, reason, until)
        log.warning("updates disabled fleet-wide %s", describe_pause(disabled))
        await self._record(context, "updates.disable",
                           f"disabled updates fleet-wide{until_text(until)}: {reason}",
                           reason=reason, **({"until_unix": until} if until else {}))
        return await self._fleet_status()

    async def EnableUpdates(self, request: dominator_pb2.EnableUpdatesRequest,
                           context: Context) -> dominator_pb2.FleetStatus:
        await asyncio.to_thread(self.state.enable_updates)
        log.warning("updates enabled fleet-wide by %s", caller(context))
        await self._record(context, "updates.enable", "enabled updates fleet-wide")
        for sub in self.herd.subs.values():
            sub.wake.set()
        return await self._fleet_status()

    async def ClearSafetyShutoff(self, request: dominator_pb2.HostRequest,
                                context: Context) -> dominator_pb2.SubInfo:
        try:
            sub = self.herd.find(request.hostname)
        except FleetError as err:
            await abort(context, NotFoundError(str(err)))
        await asyncio.to_thread(self.state.clear_safety, request.hostname)
        log.warning("%s: safety check cleared by %s", request.hostname, caller(context))
        await self._record(context, "safety.clear",
                           f"cleared the safety check of {request.hostname}",
                           host=request.hostname)
        sub.wake.set()
        return await self._info(request.hostname)

    async def AcknowledgeIntrusion(self, request: dominator_pb2.HostRequest,
                                  context: Context) -> dominator_pb2.SubInfo:
        try:
            sub = self.herd.find(request.hostname)
        except FleetError as err:
            await abort(context, NotFoundError(str(err)))
        paths = self.state.intrusion(request.hostname)
        await asyncio.to_thread(self.state.acknowledge_intrusion, request.hostname)
        log.info("%s: intrusion acknowledged by %s", request.hostname, caller(context))
        await self._record(context, "intrusion.acknowledge",
                           f"acknowledged the intrusion report of {request.hostname} "
                           f"({len(paths)} path(s))", host=request.hostname,
                           paths=list(paths[:20]))
        sub.wake.set()
        return await self._info(request.hostname)

    async def FastUpdate(self, request: dominator_pb2.HostRequest,
                        context: Context) -> AsyncIterator[dominator_pb2.FastUpdateProgress]:
        try:
            sub = self.herd.find(request.hostname)
        except FleetError as err:
            await abort(context, NotFoundError(str(err)))
        if sub.status == Status.ELSEWHERE or sub.mirrored:  # no loop here would ever answer
            why = f"managed by dominator {quote(sub.owner)}" if sub.mirrored else sub.last_error
            await abort(context, PreconditionError(
                f"{request.hostname}: {why}: ask that dominator"))
        await self._record(context, "fast-update", f"fast update of {request.hostname}",
                           host=request.hostname)
        changes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        def listener(status: str, error: str) -> None:
            changes.put_nowait((status, error))

        sub.listeners.append(listener)
        try:
            sub.wake.set()
            deadline = asyncio.get_running_loop().time() + FAST_UPDATE_TIMEOUT
            busy = {Status.POLLING.value, Status.FETCHING.value, Status.UPDATING.value}
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                status, error = await asyncio.wait_for(changes.get(), max(remaining, 0.1))
                done = Status(status) in FINAL and status not in busy
                success = status in (Status.SYNCED.value, Status.INTRUSION.value)
                yield dominator_pb2.FastUpdateProgress(status=status, message=error,
                                                       done=done, success=done and success)
                if done:
                    return
        except TimeoutError:
            yield dominator_pb2.FastUpdateProgress(status=sub.status.value, done=True,
                                                   message="timed out waiting for the sub")
        finally:
            sub.listeners.remove(listener)

    # The MDB. Writes that name an unknown host as their target are bad input
    # (INVALID_ARGUMENT, naming close hostnames); reads and deletes answer NOT_FOUND.

    async def _unknown_host(self, hostname: str, hint: str = "") -> str:
        """'unknown host NAME; did you mean ...?' over every hostname of the MDB."""
        hostnames = await asyncio.to_thread(self.mdb.hostnames)
        suggestion = did_you_mean(close_matches(hostname, hostnames))
        return (f"unknown host {hostname}" + (f" ({suggestion})" if suggestion else "")
                + (f"; {hint}" if hint else ""))

    def _view(self, machines: list[Machine], one: bool = False) -> dominator_pb2.MachinesJson:
        """Records in Dominator's JSON (one object, or an array), with the pauses the
        dominator holds for those hosts beside them (never inside: the JSON stays
        what `mdb import` reads)."""
        records = [machine.to_json() for machine in machines]
        pauses = {machine.hostname: pause_to_wire(paused) for machine in machines
                  if (paused := self.state.host_paused(machine.hostname)) is not None}
        return dominator_pb2.MachinesJson(
            json=json.dumps(records[0]) if one else json.dumps(records, indent=2),
            pauses=pauses)

    async def _check_images(self, changes: list[tuple[Machine, Machine | None]]) -> None:
        """Refuse (FleetError naming similar images) images the image server does not
        hold among those the changes (new machine, its record before or None) put
        into the MDB; a name a host's field already holds is not checked again, so an
        unrelated write is never refused for an image deleted since. UnavailableError
        when the image server cannot answer."""
        uses: dict[str, list[str]] = {}
        for machine, before in changes:
            for key, attribute in IMAGE_FIELDS:
                name = getattr(machine, attribute)
                if name and (before is None or getattr(before, attribute) != name):
                    uses.setdefault(name, []).append(f"{key} of {machine.hostname}")
        unknown = await asyncio.to_thread(self.herd.images.unknown, uses) if uses else {}
        if unknown:
            raise FleetError(unknown_images_message(unknown, uses))

    async def GetMachine(self, request: dominator_pb2.HostRequest,
                        context: Context) -> dominator_pb2.MachinesJson:
        try:
            machine = await asyncio.to_thread(self.mdb.get, request.hostname)
            if machine is None:
                raise NotFoundError(await self._unknown_host(request.hostname))
        except FleetError as err:
            await abort(context, err)
        return self._view([machine], one=True)

    async def SetMachine(self, request: dominator_pb2.SetMachineRequest,
                        context: Context) -> dominator_pb2.MachinesJson:
        hostname, pausing, by = request.hostname, request.HasField("pause"), caller(context)
        reason = " ".join(request.pause.reason.split())  # one line, in every status message
        try:
            if pausing and request.resume:
                raise FleetError("pause the host's updates or resume them, not both")
            patch = json.loads(request.patch_json or "{}")
            if not isinstance(patch, dict):
                raise FleetError("the patch must be a JSON object")
            current = await asyncio.to_thread(self.mdb.get, hostname)
            if current is None and not patch.get("IpAddress"):
                raise FleetError(await self._unknown_host(
                    hostname, "to add a new host give its address (IpAddress, "
                    "`mdb set --address`)"))
            fields = {**(current.to_json() if current is not None else {}), **patch,
                      "Hostname": hostname}
            if request.resume:
                fields["DisableUpdates"] = False
            machine = Machine.from_json(fields, hostname)
            until = until_unix(request.pause.expires_in_seconds) if pausing else 0
            if not request.force:
                await self._check_images([(machine, current)])
            if pausing:  # before the MDB write: the herd never follows it unpaused
                paused = await asyncio.to_thread(self.state.pause_host, hostname, by, reason,
                                                 until)
            await asyncio.to_thread(self.mdb.set, machine)
            resumed = self.state.host(hostname).paused if request.resume else None
            if resumed is not None:  # after the MDB write: it may have failed
                await asyncio.to_thread(self.state.resume_host, hostname)
        except json.JSONDecodeError as err:
            await abort(context, FleetError(f"malformed patch JSON: {err}"))
        except FleetError as err:
            await abort(context, err)
        if patch:
            verb = "changed" if current is not None else "added"
            await self._record(context, "mdb.set", f"MDB: {verb} {hostname}: "
                               + ", ".join(f"{key}={json.dumps(value)}"
                                           for key, value in sorted(patch.items()))
                               + (" (images unchecked: --force)" if request.force else ""),
                               host=hostname, fields=patch, new=current is None,
                               **forced(request.force))
        if pausing:
            log.warning("%s: updates paused %s", hostname, describe_pause(paused))
            await self._record(context, "host.pause", f"paused updates of {hostname}"
                               f"{until_text(until)}: {reason or '(no reason given)'}",
                               host=hostname, reason=reason, until_unix=until)
        cleared_mdb = current is not None and current.disable_updates and request.resume
        if resumed is not None or cleared_mdb:
            log.warning("%s: updates resumed by %s", hostname, by)
            await self._record(context, "host.resume", f"resumed updates of {hostname}"
                               + (f" (paused by {resumed.by})" if resumed is not None else "")
                               + (" and cleared its MDB DisableUpdates" if cleared_mdb else ""),
                               host=hostname, was_paused=resumed is not None,
                               cleared_mdb=cleared_mdb)
        if pausing or request.resume:  # its status says so at once
            sub = self.herd.subs.get(hostname)
            if sub is not None:
                sub.wake.set()
        return self._view([machine], one=True)

    async def ListMachines(self, request: dominator_pb2.ListMachinesRequest,
                          context: Context) -> dominator_pb2.MachinesJson:
        try:
            machines = await asyncio.to_thread(self.mdb.export_machines)
        except FleetError as err:
            await abort(context, err)
        return self._view(machines)

    async def ImportMachines(self, request: dominator_pb2.ImportMachinesRequest,
                            context: Context) -> dominator_pb2.ImportMachinesResponse:
        try:
            machines = parse_machines_json(request.json, "import")
            if not request.force:
                valid, _ = await asyncio.to_thread(self.mdb.load)
                before = {machine.hostname: machine for machine in valid}
                await self._check_images([(machine, before.get(machine.hostname))
                                          for machine in machines])
            added, changed, removed = await asyncio.to_thread(
                self.mdb.import_machines, machines, request.replace)
        except FleetError as err:
            await abort(context, err)
        await self._record(context, "mdb.import",
                           f"MDB import{' (replace)' if request.replace else ''}: {added} "
                           f"added, {changed} changed, {removed} removed"
                           + (" (images unchecked: --force)" if request.force else ""),
                           hosts=len(machines), added=added, changed=changed, removed=removed,
                           replace=request.replace, **forced(request.force))
        return dominator_pb2.ImportMachinesResponse(added=added, changed=changed,
                                                    removed=removed)

    async def DeleteMachine(self, request: dominator_pb2.HostRequest,
                            context: Context) -> dominator_pb2.MachinesJson:
        hostname = request.hostname
        try:
            try:
                machine = await asyncio.to_thread(self.mdb.get, hostname)
            except FleetError:  # an invalid row: deleting it is how one gets rid of it
                machine = None
            await asyncio.to_thread(self.mdb.delete, hostname)
        except NotFoundError:
            await abort(context, NotFoundError(await self._unknown_host(hostname)))
        except FleetError as err:
            await abort(context, err)
        record = machine.to_json() if machine is not None else {"Hostname": hostname}
        await self._record(context, "mdb.delete", f"MDB: deleted {hostname}", host=hostname,
                           record=record)
        return dominator_pb2.MachinesJson(json=json.dumps(record))

    # The audit log and the HTTP API's tokens.

    async def ListAudit(self, request: audit_pb2.ListAuditRequest,
                        context: Context) -> audit_pb2.ListAuditResponse:
        return await asyncio.to_thread(self.audit.list_response, request)

    async def CreateToken(self, request: dominator_pb2.CreateTokenRequest,
                          context: Context) -> dominator_pb2.CreateTokenResponse:
        try:
            token, value = await asyncio.to_thread(self.tokens.create, request.name,
                                                   request.scope, caller(context))
        except FleetError as err:
            await abort(context, err)
        await self._record(context, "token.create",
                           f"created HTTP token {token.name} (scope {token.scope})",
                           name=token.name, scope=token.scope)
        return dominator_pb2.CreateTokenResponse(token=token.to_wire(), value=value)

    async def ListTokens(self, request: dominator_pb2.ListTokensRequest,
                         context: Context) -> dominator_pb2.ListTokensResponse:
        tokens = await asyncio.to_thread(self.tokens.list)  # shared: read from the database
        return dominator_pb2.ListTokensResponse(tokens=[token.to_wire() for token in tokens])

    async def RevokeToken(self, request: dominator_pb2.RevokeTokenRequest,
                          context: Context) -> dominator_pb2.TokenInfo:
        try:
            token = await asyncio.to_thread(self.tokens.revoke, request.name, caller(context))
        except FleetError as err:
            await abort(context, err)
        await self._record(context, "token.revoke", f"revoked HTTP token {token.name}",
                           name=token.name, scope=token.scope)
        return token.to_wire()

    # Disruption allowances.

    async def AllowDisruption(self, request: dominator_pb2.HostRequest,
                              context: Context) -> dominator_pb2.SubInfo:
        try:
            sub = self.herd.find(request.hostname)
            await asyncio.to_thread(self.herd.allow_disruption, request.hostname)
        except NotFoundError as err:
            await abort(context, err)
        log.warning("%s: disruption allowed by %s for its next update", request.hostname,
                    caller(context))
        await self._record(context, "disruption.allow",
                           f"allowed the next update of {request.hostname} to run HighImpact "
                           "triggers", host=request.hostname)
        sub.wake.set()
        return await self._info(request.hostname)

    # The dominators sharing the MDB.

    async def ListDominators(self, request: dominator_pb2.ListDominatorsRequest,
                             context: Context) -> dominator_pb2.ListDominatorsResponse:
        ownership = self.herd.ownership
        try:
            live = await asyncio.to_thread(ownership.live_dominators)
        except FleetError as err:
            await abort(context, err)
        me = ownership.leases.status().dominator_id
        return dominator_pb2.ListDominatorsResponse(
            shards=ownership.shards, lease_seconds=ownership.lease_seconds,
            dominators=[dominator_pb2.DominatorInfo(
                name=row.name, address=row.address, shards=row.shards,
                lease_age_seconds=-1.0 if row.lease_age is None else row.lease_age,
                renewal_age_seconds=row.renewal_age, started_unix=int(row.started.timestamp()),
                last_renewal_unix=int(row.last_renewal.timestamp()), answering=row.id == me)
                for row in live])
