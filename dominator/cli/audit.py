"""`dominator audit`: the audit logs of the dominator and the image server, merged
by time (newest last). A server that cannot be read is named in a one-line warning
and the command exits 3 after printing the others."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click
import grpc

from dominator.cli.options import dominator_option, imageserver_option, json_option
from dominator.client import DominatorClient
from fleetlib.audit import AuditEntry, merged
from fleetlib.cli.display import echo_json
from fleetlib.cli.endpoints import explain
from fleetlib.cli.options import Duration, security_options
from fleetlib.cli.run import EXIT_UNAVAILABLE
from fleetlib.errors import UnavailableError
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security
from fleetlib.wire import audit_pb2
from imageserver.client import ImageServerClient

TIMEOUT = 10.0


def _imageserver_audit(address: str, security: Security, request: audit_pb2.ListAuditRequest
                       ) -> list[AuditEntry]:
    with ImageServerClient(address, security) as client:
        reply = client.images.ListAudit(request, timeout=TIMEOUT)
    return [AuditEntry.from_wire(entry) for entry in reply.entries]


def _dominator_audit(address: str, security: Security, request: audit_pb2.ListAuditRequest
                     ) -> list[AuditEntry]:
    with DominatorClient(address, security) as client:
        return client.audit(request.limit, request.since_unix_ns, timeout=TIMEOUT)


@click.command(name="audit")
@click.option("--limit", type=click.IntRange(1), help="Only the newest N entries.")
@click.option("--since", type=Duration(), help="Only entries of the last DURATION (30m, 2d).")
@json_option
@dominator_option
@imageserver_option
@security_options
def audit(limit: int | None, since: int | None, as_json: bool, dominator: str,
          imageserver: str, security: Security) -> None:
    """Who changed what, when: image adds, deletes and expiries (the image server),
    MDB changes, the fleet-wide switch, safety clearances, intrusion
    acknowledgements, fast updates, deploys and tokens (the dominator). The
    dominators of a PostgreSQL MDB keep one log: any of them shows every one's
    changes, each entry naming its dominator (SERVER `dominator NAME`)."""
    request = audit_pb2.ListAuditRequest(
        limit=limit or 0, since_unix_ns=time.time_ns() - since * 10**9 if since else 0)
    sources: dict[str, tuple[str, Callable[..., list[AuditEntry]]]] = {
        "dominator": (dominator, _dominator_audit),
        "image server": (imageserver, _imageserver_audit)}
    logs, warnings = [], []
    for label, (address, read) in sources.items():
        try:
            logs.append(read(address, security, request))
        except grpc.RpcError as err:
            warnings.append(f"warning: cannot read the audit log of the {label} at {address}: "
                            f"{explain(err) or describe_rpc_error(err)}")
    if not logs:
        raise UnavailableError("; ".join(w.removeprefix("warning: ") for w in warnings))
    entries = merged(*logs, limit=limit or 0)
    if as_json:
        echo_json([entry.to_json() for entry in entries])
    else:
        width = max((len(entry.server) for entry in entries), default=0)
        for entry in entries:
            click.echo(entry.line(width))
    for warning in warnings:
        click.echo(warning, err=True)
    if warnings:
        sys.exit(EXIT_UNAVAILABLE)  # some entries shown, a server's missing
