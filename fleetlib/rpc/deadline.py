"""A default deadline for every unary call on a channel, so a client never waits
forever on a server that accepted the connection but does not answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from fleetlib.rpc.tls import call_timeout


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, timeout: float) -> None:
        self.method = details.method
        self.timeout = timeout
        self.metadata = details.metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class DefaultDeadline(grpc.UnaryUnaryClientInterceptor):
    """Gives each unary call that names no timeout of its own `seconds` to answer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def intercept_unary_unary(self, continuation: Callable[..., Any],
                              client_call_details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        if client_call_details.timeout is None:
            client_call_details = _CallDetails(client_call_details, self.seconds)
        return continuation(client_call_details, request)


def with_default_deadline(channel: grpc.Channel) -> grpc.Channel:
    """CHANNEL whose unary calls time out after `call_timeout()` seconds unless the
    caller gives a timeout (FLEET_RPC_TIMEOUT_SECONDS changes it)."""
    return grpc.intercept_channel(channel, DefaultDeadline(call_timeout()))
