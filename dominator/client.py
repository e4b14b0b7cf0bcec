"""A typed, synchronous client of the dominator's admin gRPC API (the Dominator
service), for the CLI and tools: sub reports, the fleet-wide switch, fast updates,
the MDB (records as Dominator's JSON), the audit log and the HTTP API's tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from dominator.herd.status import SubReport
from dominator.herd.tokens import ApiToken
from fleetlib.audit import AuditEntry
from fleetlib.rpc.deadline import with_default_deadline
from fleetlib.rpc.ports import DOMINATOR_PORT
from fleetlib.rpc.tls import Security, open_channel, parse_address
from fleetlib.wire import audit_pb2, dominator_pb2, dominator_pb2_grpc
from mdb.machine import PAUSE_KEY

DEFAULT_PORT = DOMINATOR_PORT


def pause_json(pause: dominator_pb2.HostPause) -> dict[str, Any]:
    """A host's pause as plain data (snake_case, times as *_unix)."""
    return {"by": pause.by, "reason": pause.reason, "since_unix": pause.since_unix,
            "until_unix": pause.until_unix}


def add_pause(record: dict[str, Any], reply: dominator_pb2.MachinesJson) -> None:
    """Put the reply's pause of the record's host (or None) under "pause"."""
    pause = reply.pauses.get(record["Hostname"])
    record[PAUSE_KEY] = None if pause is None else pause_json(pause)


def one_record(reply: dominator_pb2.MachinesJson, with_pause: bool) -> dict[str, Any]:
    """The one record a reply carries, with its pause when asked."""
    record: dict[str, Any] = json.loads(reply.json)
    if with_pause:
        add_pause(record, reply)
    return record


class DominatorClient:
    """One connection to a dominator (`HOST` or `HOST:PORT`, default port 6970).
    Failed calls raise grpc.RpcError (fleetlib.cli.run makes it one line)."""

    def __init__(self, address: str, security: Security) -> None:
        self.address = parse_address(address, DEFAULT_PORT)
        self.channel = open_channel(self.address, security, "dominator")
        self.stub = dominator_pb2_grpc.DominatorStub(with_default_deadline(self.channel))

    def close(self) -> None:
        """Close the connection."""
        self.channel.close()

    def __enter__(self) -> DominatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The herd.

    def list_subs(self) -> list[SubReport]:
        """Every sub, by hostname."""
        reply = self.stub.ListSubs(dominator_pb2.ListSubsRequest())
        return [SubReport.from_wire(info) for info in reply.subs]

    def sub(self, hostname: str) -> SubReport:
        """One sub."""
        return SubReport.from_wire(self.stub.GetSubInfo(dominator_pb2.HostRequest(
            hostname=hostname)))

    def dominators(self) -> dominator_pb2.ListDominatorsResponse:
        """The live dominators sharing this one's MDB."""
        reply: dominator_pb2.ListDominatorsResponse = self.stub.ListDominators(
            dominator_pb2.ListDominatorsRequest())
        return reply

    def fleet_status(self, timeout: float | None = None) -> dominator_pb2.FleetStatus:
        """Hosts by status, the fleet-wide switch, diff cache counters."""
        reply: dominator_pb2.FleetStatus = self.stub.GetFleetStatus(
            dominator_pb2.GetFleetStatusRequest(), timeout=timeout)
        return reply

    def disable_updates(self, reason: str, expires_in_seconds: int = 0
                        ) -> dominator_pb2.FleetStatus:
        """Stop every update fleet-wide, until enabled again or, when given, for that long."""
        reply: dominator_pb2.FleetStatus = self.stub.DisableUpdates(
            dominator_pb2.DisableUpdatesRequest(reason=reason,
                                                expires_in_seconds=expires_in_seconds))
        return reply

    def enable_updates(self) -> dominator_pb2.FleetStatus:
        """Allow updates again."""
        reply: dominator_pb2.FleetStatus = self.stub.EnableUpdates(
            dominator_pb2.EnableUpdatesRequest())
        return reply

    def clear_safety(self, hostname: str) -> SubReport:
        """Let the host's next update through the unsafe-update check, once."""
        return SubReport.from_wire(self.stub.ClearSafetyShutoff(dominator_pb2.HostRequest(
            hostname=hostname)))

    def acknowledge_intrusion(self, hostname: str) -> SubReport:
        """Drop the host's intrusion report."""
        return SubReport.from_wire(self.stub.AcknowledgeIntrusion(dominator_pb2.HostRequest(
            hostname=hostname)))

    def allow_disruption(self, hostname: str) -> SubReport:
        """Let the host's next update run HighImpact triggers, once."""
        return SubReport.from_wire(self.stub.AllowDisruption(dominator_pb2.HostRequest(
            hostname=hostname)))

    def fast_update(self, hostname: str) -> Iterator[dominator_pb2.FastUpdateProgress]:
        """Converge the host now: each step until it is done."""
        yield from self.stub.FastUpdate(dominator_pb2.HostRequest(hostname=hostname))

    # The MDB. Records are Dominator's JSON; `with_pause` adds the key "pause": the
    # dominator's own pause of the host ({"by", "reason", "since_unix", "until_unix"})
    # or None. It is not an MDB field: `mdb import` refuses it.

    def get_machine(self, hostname: str, with_pause: bool = False) -> dict[str, Any]:
        """One host's record."""
        return one_record(self.stub.GetMachine(dominator_pb2.HostRequest(hostname=hostname)),
                          with_pause)

    def set_machine(self, hostname: str, patch: dict[str, Any], force: bool = False,
                    pause: dominator_pb2.PauseSpec | None = None, resume: bool = False,
                    with_pause: bool = False) -> dict[str, Any]:
        """Change the fields of `patch` (an unknown host is added only when the patch
        sets IpAddress); images the image server lacks are refused unless `force`.
        `pause` also holds the host's updates in the dominator's state (an MDB import
        never lifts it); `resume` lifts that pause and the MDB's DisableUpdates.
        The host's record after."""
        return one_record(self.stub.SetMachine(dominator_pb2.SetMachineRequest(
            hostname=hostname, patch_json=json.dumps(patch), force=force, pause=pause,
            resume=resume)), with_pause)

    def delete_machine(self, hostname: str) -> dict[str, Any]:
        """Remove the host's record (a pause of it stays): the record removed."""
        return one_record(self.stub.DeleteMachine(dominator_pb2.HostRequest(
            hostname=hostname)), False)

    def export_machines(self) -> str:
        """Every record, as Dominator's JSON array (text)."""
        reply: dominator_pb2.MachinesJson = self.stub.ListMachines(
            dominator_pb2.ListMachinesRequest())
        return reply.json

    def list_machines(self, with_pause: bool = False) -> list[dict[str, Any]]:
        """Every record."""
        reply: dominator_pb2.MachinesJson = self.stub.ListMachines(
            dominator_pb2.ListMachinesRequest())
        records: list[dict[str, Any]] = json.loads(reply.json)
        if with_pause:
            for record in records:
                add_pause(record, reply)
        return records

    def import_machines(self, text: str, replace: bool, force: bool = False
                        ) -> tuple[int, int, int]:
        """Load Dominator's JSON array in one transaction: (added, changed, removed).
        Images the image server lacks refuse the whole file unless `force`."""
        reply = self.stub.ImportMachines(dominator_pb2.ImportMachinesRequest(
            json=text, replace=replace, force=force))
        return reply.added, reply.changed, reply.removed

    # The audit log and the HTTP API's tokens.

    def audit(self, limit: int = 0, since_unix_ns: int = 0,
              timeout: float | None = None) -> list[AuditEntry]:
        """The dominator's audit entries, newest last."""
        reply = self.stub.ListAudit(audit_pb2.ListAuditRequest(
            limit=limit, since_unix_ns=since_unix_ns), timeout=timeout)
        return [AuditEntry.from_wire(entry) for entry in reply.entries]

    def create_token(self, name: str, scope: str) -> tuple[ApiToken, str]:
        """A new named token: its record and its value (shown this once)."""
        reply = self.stub.CreateToken(dominator_pb2.CreateTokenRequest(name=name, scope=scope))
        return ApiToken.from_wire(reply.token), reply.value

    def list_tokens(self) -> list[ApiToken]:
        """Every token (never a value), revoked ones too."""
        reply = self.stub.ListTokens(dominator_pb2.ListTokensRequest())
        return [ApiToken.from_wire(info) for info in reply.tokens]

    def revoke_token(self, name: str) -> ApiToken:
        """Refuse the named token from now on."""
        return ApiToken.from_wire(self.stub.RevokeToken(
            dominator_pb2.RevokeTokenRequest(name=name)))
