"""Starting a gRPC daemon the same way everywhere: our services plus health and
reflection, mutual TLS with method authorization (or loudly insecure)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from fleetlib.errors import FleetError
from fleetlib.rpc.auth import MethodAuthorizer
from fleetlib.rpc.guard import Behavior, guard, wrap_handler
from fleetlib.rpc.status import abort
from fleetlib.rpc.tls import (
    INSECURE_WARNING,
    MESSAGE_SIZE_OPTIONS,
    Security,
    server_credentials,
    server_keepalive_options,
)

log = logging.getLogger(__name__)

# gRPC shares a port between processes by default (SO_REUSEPORT): a second daemon
# on a busy port must fail, not silently take half the connections.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (*MESSAGE_SIZE_OPTIONS, ("grpc.so_reuseport", 0))


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request message whose bytes did not parse."""

    error: str


class BadRequests(grpc.aio.ServerInterceptor):
    """Bad input answers one line and logs one, never UNKNOWN and a traceback:
    a request whose bytes are not the method's message gets INVALID_ARGUMENT (the
    deserializer hands a `Malformed` over, the wrapped servicer aborts on it), and
    a FleetError escaping an asyncio servicer gets its status (`status_for`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        deserializer = _tolerant(handler.request_deserializer)
        if not handler.request_streaming:
            return wrap_handler(
                handler, lambda behavior: _answering(guard(behavior, _refusal(method)), method),
                request_deserializer=deserializer)
        behavior = handler.stream_unary or handler.stream_stream
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # only asyncio servicers here; a plain one keeps gRPC's handling
        return wrap_handler(
            handler, lambda behavior: _answering(_checking_stream(behavior, method), method),
            request_deserializer=deserializer)


def _answering(behavior: Behavior, method: str) -> Behavior:
    """An asyncio BEHAVIOR whose escaping FleetError ends the call with its status."""

    async def answer(context: grpc.aio.ServicerContext, err: FleetError) -> None:
        log.warning("%s from %s refused: %s", method, context.peer(), err)
        await abort(context, err)

    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
            except FleetError as err:
                await answer(context, err)

        return streaming
    if inspect.iscoroutinefunction(behavior):

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except FleetError as err:
                await answer(context, err)

        return unary
    return behavior


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as err:
            return Malformed(str(err))
    return deserialize


def _refuse(context: grpc.aio.ServicerContext, method: str,
            request: Malformed) -> tuple[grpc.StatusCode, str]:
    log.warning("refused a malformed request to %s from %s: %s", method, context.peer(),
                request.error)
    return grpc.StatusCode.INVALID_ARGUMENT, f"malformed request to {method}: {request.error}"


def _refusal(method: str) -> Callable[[Any, grpc.aio.ServicerContext],
                                      tuple[grpc.StatusCode, str] | None]:
    def check(request: Any, context: grpc.aio.ServicerContext
              ) -> tuple[grpc.StatusCode, str] | None:
        return _refuse(context, method, request) if isinstance(request, Malformed) else None
    return check


def _checking_stream(behavior: Behavior, method: str) -> Behavior:
    """An asyncio request-stream BEHAVIOR whose stream aborts at a malformed message."""

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                await context.abort(*_refuse(context, method, request))
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            async for response in behavior(checked(requests, context), context):
                yield response

        return streaming

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)

    return unary


@dataclass(frozen=True)
class RunningServer:
    """A started server and the port it is bound to (useful when asked for port 0)."""

    server: grpc.aio.Server
    port: int


async def start_server(
    services: list[tuple[Callable[[object, grpc.aio.Server], None], object, str]],
    port: int,
    security: Security,
    host: str = "[::]",
) -> RunningServer:
    """Start serving SERVICES ((add_XServicer_to_server, servicer, full name) tuples).

    Adds the standard health service (everything SERVING) and server reflection.
    PORT 0 picks a free port; the returned RunningServer says which.
    """
    # The first listed runs its check first: authorization before anything else.
    interceptors: list[grpc.aio.ServerInterceptor] = [BadRequests()]
    if security.identity is not None:
        interceptors.insert(0, MethodAuthorizer())
    server = grpc.aio.server(interceptors=interceptors,
                             options=[*SERVER_OPTIONS, *server_keepalive_options()])
    names = [name for _, _, name in services]
    for add_servicer, servicer, _ in services:
        add_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*names, health.OVERALL_HEALTH]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{host}:{port}"
    try:
        if security.identity is None:
            log.warning(INSECURE_WARNING)
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, server_credentials(security.identity))
    except RuntimeError as err:
        await server.stop(None)
        raise FleetError(f"cannot listen on {address}: {err}") from None
    if bound == 0:
        await server.stop(None)
        raise FleetError(f"cannot listen on {address}: address in use or unavailable")
    await server.start()
    log.info(
        "serving %s on %s:%d (%s)",
        ", ".join(names) or "nothing",
        host,
        bound,
        "insecure" if security.identity is None else f"mutual TLS as {security.identity.name}",
    )
    return RunningServer(server, bound)


async def serve_until_stopped(running: RunningServer, grace: float = 2.0) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully: calls in flight get
    `grace` seconds to finish (state is crash-safe either way)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(running.server.stop(grace)))
    try:
        await running.server.wait_for_termination()
    finally:
        await running.server.stop(grace)
        log.info("stopped")


def serve_metrics(collector: Collector, host: str, port: int) -> Callable[[], None]:
    """Serve `collector` at http://HOST:PORT/metrics (plain HTTP, read-only) in a
    thread; returns how to stop it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host.strip("[]") or "::",
                                           registry=registry)
    except OSError as err:
        raise FleetError(f"cannot listen on {host}:{port} (metrics): {err.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()
    return stop
