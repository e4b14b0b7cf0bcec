"""A failed call in one readable line: gRPC's long connection failure is cut down to
the address and the reason (a real call to a port nobody listens on)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetlib.rpc.status import describe_rpc_error
from fleetlib.testing.daemons import free_port


def test_refused_connection_is_one_short_line() -> None:
    port = free_port()  # claimed by this process: nobody listens there
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
    assert describe_rpc_error(failed.value) == (
        f"server unavailable: cannot connect to 127.0.0.1:{port}: Connection refused")
