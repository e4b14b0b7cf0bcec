"""Waiting for a daemon to come up: its standard gRPC health check says SERVING."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetlib.errors import FleetError
from fleetlib.rpc.tls import Security, open_channel


def wait_serving(address: str, security: Security, role: str, timeout: float = 30.0,
                 alive: Callable[[], bool] = lambda: True) -> None:
    """Block until `address` reports SERVING; FleetError when `alive()` turns false
    (the process died) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise FleetError(f"{role} at {address} exited before serving")
        channel = open_channel(address, security, role)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.1)
        finally:
            channel.close()
    raise FleetError(f"{role} at {address} did not become healthy within {timeout:.0f} s")
