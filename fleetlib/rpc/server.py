"""Starting a gRPC daemon the same way everywhere: our services plus health and
reflection, mutual TLS with method authorization (or loudly insecure)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from fleetlib.errors import FleetError
from fleetlib.rpc.auth import MethodAuthorizer
from fleetlib.rpc.tls import INSECURE_WARNING, MESSAGE_SIZE_OPTIONS, Security, server_credentials

log = logging.getLogger(__name__)

# gRPC shares a port between processes by default (SO_REUSEPORT): a second daemon
# on a busy port must fail, not silently take half the connections.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (*MESSAGE_SIZE_OPTIONS, ("grpc.so_reuseport", 0))


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
    interceptors = [MethodAuthorizer()] if security.identity is not None else []
    server = grpc.aio.server(interceptors=interceptors, options=list(SERVER_OPTIONS))
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
