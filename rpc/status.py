"""Mapping FleetError kinds to gRPC status codes, on both sides of a call."""

from __future__ import annotations

import grpc

from fstree.errors import ExistsError, FleetError, NotFoundError, PreconditionError
from fstree.listing import quote


def status_for(err: FleetError) -> grpc.StatusCode:
    """The gRPC status a server answers with for a refused request."""
    if isinstance(err, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, ExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(err, PreconditionError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


async def abort(context: grpc.aio.ServicerContext, err: FleetError) -> None:
    """End the call with the status and one-line message of `err`."""
    await context.abort(status_for(err), quote(str(err)))  # paths may not be UTF-8
