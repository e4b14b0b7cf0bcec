"""Method authorization: a server interceptor that lets a caller run only the RPC
methods its certificate permits (glob patterns such as `Subd.*`)."""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from fleetlib.rpc.certs import common_name, permitted_methods
from fleetlib.rpc.guard import guard, wrap_handler

log = logging.getLogger(__name__)

# Services any caller with a valid certificate may use: probes and tooling.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class MethodAuthorizer(grpc.aio.ServerInterceptor):
    """Deny (PERMISSION_DENIED) every RPC the caller's certificate does not permit.

    An aio interceptor sees only the method name, not the peer, so it wraps the
    handler: the check runs inside the call, where the TLS auth context is known.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return handler
        return _guard_handler(handler, method)


def short_method_name(method: str) -> str | None:
    """A gRPC method as certificates name it ("/fleet.Subd/Poll" -> "Subd.Poll"), or None."""
    service, sep, name = method.lstrip("/").partition("/")
    if not sep or not service or not name or "/" in name:
        return None
    return f"{service.rpartition('.')[2]}.{name}"


def method_permitted(method: str, patterns: tuple[str, ...]) -> bool:
    """Whether a full gRPC method ("/fleet.Subd/Poll") matches any pattern ("Subd.*")."""
    short = short_method_name(method)
    return short is not None and any(fnmatch.fnmatchcase(short, p) for p in patterns)


@functools.lru_cache(maxsize=256)
def _caller(cert_pem: bytes) -> tuple[str, tuple[str, ...]]:
    """(CN, permitted patterns) of a client certificate, parsed once per certificate."""
    return common_name(cert_pem), permitted_methods(cert_pem)


def _refusal(context: grpc.ServicerContext, method: str) -> str | None:
    """Why the caller may not run METHOD, or None if it may."""
    certs = context.auth_context().get("x509_pem_cert") or []
    if not certs:
        log.warning("denied %s to %s: no client certificate", method, context.peer())
        return f"{method} requires a client certificate"
    name, patterns = _caller(certs[0])
    if method_permitted(method, patterns):
        return None
    log.warning("denied %s to %r (%s)", method, name, context.peer())
    wanted = short_method_name(method) or method
    allowed = ",".join(patterns) or "no methods"
    return f"certificate {name!r} does not permit {wanted} (it permits {allowed})"


def _guard_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, with its behavior guarded by the method check."""

    def check(_request: Any, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        reason = _refusal(context, method)
        return None if reason is None else (grpc.StatusCode.PERMISSION_DENIED, reason)

    return wrap_handler(handler, lambda behavior: guard(behavior, check))
