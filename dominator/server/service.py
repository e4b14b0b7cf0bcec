"""The Dominator gRPC service: the herd's state for operators, the fleet-wide
switch, safety clearances, intrusion acknowledgements, fast updates, the MDB (in
Dominator's JSON format), the HTTP API's named tokens and the audit log. Every
change is written to the audit log, with the caller's certificate CN."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from dominator.herd.herd import Herd, Sub
from dominator.herd.state import DominatorState
from dominator.herd.status import Status, SubReport
from dominator.herd.tokens import ApiTokens
from fleetlib.audit import AuditLog, caller
from fleetlib.errors import FleetError, NotFoundError
from fleetlib.rpc.status import abort
from fleetlib.wire import audit_pb2, dominator_pb2, dominator_pb2_grpc
from mdb.machine import Machine, parse_machines_json
from mdb.store import Mdb

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext  # every method's call context

# Statuses that end a fast update (after its first cycle).
FINAL = {Status.SYNCED, Status.INTRUSION, Status.UNSAFE, Status.FAILED, Status.NO_SPACE,
         Status.UNREACHABLE, Status.MISSING_COMPUTED, Status.IMAGE_NOT_READY,
         Status.UPDATES_DISABLED, Status.NO_IMAGE, Status.DISRUPTION_DENIED}
FAST_UPDATE_TIMEOUT = 600.0


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
        return reply

    async def DisableUpdates(self, request: dominator_pb2.DisableUpdatesRequest,
                            context: Context) -> dominator_pb2.FleetStatus:
        if not request.reason.strip():
            await abort(context, FleetError("give a reason for disabling updates"))
        by, reason = caller(context), request.reason.strip()
        await asyncio.to_thread(self.state.disable_updates, by, reason)
        log.warning("updates disabled fleet-wide by %s: %s", by, reason)
        await self._record(context, "updates.disable",
                           f"disabled updates fleet-wide: {reason}", reason=reason)
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

    # The MDB.

    async def GetMachine(self, request: dominator_pb2.HostRequest,
                        context: Context) -> dominator_pb2.MachinesJson:
        machine = await asyncio.to_thread(self.mdb.get, request.hostname)
        if machine is None:
            await abort(context, NotFoundError(f"unknown host {request.hostname}"))
        return dominator_pb2.MachinesJson(json=json.dumps(machine.to_json()))

    async def SetMachine(self, request: dominator_pb2.SetMachineRequest,
                        context: Context) -> dominator_pb2.MachinesJson:
        try:
            patch = json.loads(request.patch_json or "{}")
            if not isinstance(patch, dict):
                raise FleetError("the patch must be a JSON object")
            current = await asyncio.to_thread(self.mdb.get, request.hostname)
            record = current.to_json() if current is not None else {
                "Hostname": request.hostname}
            machine = Machine.from_json({**record, **patch, "Hostname": request.hostname},
                                        request.hostname)
            await asyncio.to_thread(self.mdb.set, machine)
        except json.JSONDecodeError as err:
            await abort(context, FleetError(f"malformed patch JSON: {err}"))
        except FleetError as err:
            await abort(context, err)
        verb = "changed" if current is not None else "added"
        await self._record(context, "mdb.set", f"MDB: {verb} {request.hostname}: "
                           + ", ".join(f"{key}={json.dumps(value)}"
                                       for key, value in sorted(patch.items())),
                           host=request.hostname, fields=patch, new=current is None)
        return dominator_pb2.MachinesJson(json=json.dumps(machine.to_json()))

    async def ListMachines(self, request: dominator_pb2.ListMachinesRequest,
                          context: Context) -> dominator_pb2.MachinesJson:
        machines = await asyncio.to_thread(self.mdb.export_machines)
        return dominator_pb2.MachinesJson(json=json.dumps([m.to_json() for m in machines],
                                                          indent=2))

    async def ImportMachines(self, request: dominator_pb2.ImportMachinesRequest,
                            context: Context) -> dominator_pb2.ImportMachinesResponse:
        try:
            machines = parse_machines_json(request.json, "import")
            added, changed, removed = await asyncio.to_thread(
                self.mdb.import_machines, machines, request.replace)
        except FleetError as err:
            await abort(context, err)
        await self._record(context, "mdb.import",
                           f"MDB import{' (replace)' if request.replace else ''}: {added} "
                           f"added, {changed} changed, {removed} removed",
                           hosts=len(machines), added=added, changed=changed, removed=removed,
                           replace=request.replace)
        return dominator_pb2.ImportMachinesResponse(added=added, changed=changed,
                                                    removed=removed)

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
        return dominator_pb2.ListTokensResponse(
            tokens=[token.to_wire() for token in self.tokens.list()])

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
