"""Mapping FleetError kinds to gRPC status codes, on both sides of a call, and one
line of text for a failed call."""

from __future__ import annotations

import re
from typing import NoReturn

import grpc

from fleetlib.errors import (
    ExistsError,
    FleetError,
    NoSpaceError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)


def status_for(err: FleetError) -> grpc.StatusCode:
    """The gRPC status a server answers with for a refused request."""
    if isinstance(err, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, ExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(err, NoSpaceError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, PreconditionError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


async def abort(context: grpc.aio.ServicerContext, err: FleetError) -> NoReturn:
    """End the call with the status and one-line message of `err` (this raises)."""
    # Imported here: a client describing a failed call (below) loads no tree library.
    from fleetlib.fstree.listing import quote

    await context.abort(status_for(err), quote(str(err)))  # paths may not be UTF-8
    # grpc's abort always raises; the raise tells mypy so, grpc having no type stubs.
    raise AssertionError("grpc.aio context.abort returned")


# "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:6969: Failed
# to connect to remote host: Connection refused"
CONNECT_FAILED = re.compile(r"last error: \w+: (?:ipv[46]:)?(\S+?): (?:Failed to connect to "
                            r"remote host: )?(.*)$")

# Refusals whose message already says what is wrong and what to do.
SELF_EXPLAINING = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                   grpc.StatusCode.ALREADY_EXISTS)


def describe_rpc_error(err: grpc.RpcError) -> str:
    """One line for a failed RPC: the server's message or why it was unreachable."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        failed = CONNECT_FAILED.search(details or "")
        if failed:  # gRPC's long form, down to the address and the reason
            return f"server unavailable: cannot connect to {failed.group(1)}: {failed.group(2)}"
        return f"server unavailable: {details}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"permission denied: {details}"
    if code in SELF_EXPLAINING:
        return details  # the server's own sentence, without gRPC's status name
    name = code.name.lower().replace("_", " ") if code else "rpc failed"
    return f"{name}: {details}"
