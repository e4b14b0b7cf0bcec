"""Tests of fleetlib.rpc.deadline: a dominator or image server that accepts calls but
never answers makes the client fail after the call timeout instead of hanging."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from dominator.client import DominatorClient
from fleetlib.rpc.tls import CALL_TIMEOUT_ENV, Security
from fleetlib.wire import dominator_pb2, dominator_pb2_grpc, imageserver_pb2, imageserver_pb2_grpc
from imageserver.client import ImageServerClient


class Silent(dominator_pb2_grpc.DominatorServicer):
    """Takes ListSubs and GetFleetStatus calls and answers only when released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def ListSubs(self, request: dominator_pb2.ListSubsRequest,
                 context: grpc.ServicerContext) -> dominator_pb2.ListSubsResponse:
        self.release.wait(30)
        return dominator_pb2.ListSubsResponse()

    def GetFleetStatus(self, request: dominator_pb2.GetFleetStatusRequest,
                       context: grpc.ServicerContext) -> dominator_pb2.FleetStatus:
        self.release.wait(30)
        return dominator_pb2.FleetStatus()


@pytest.fixture
def silent_dominator() -> Iterator[tuple[str, Silent]]:
    servicer = Silent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    dominator_pb2_grpc.add_DominatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    servicer.release.set()
    server.stop(0)


def test_a_silent_dominator_fails_the_call_after_the_call_timeout(
        silent_dominator: tuple[str, Silent], monkeypatch: pytest.MonkeyPatch) -> None:
    address, _ = silent_dominator
    monkeypatch.setenv(CALL_TIMEOUT_ENV, "0.5")
    with DominatorClient(address, Security(None)) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            client.list_subs()
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10  # not the 30 s the server would make it wait


def test_a_timeout_the_caller_gives_wins_over_the_default(
        silent_dominator: tuple[str, Silent], monkeypatch: pytest.MonkeyPatch) -> None:
    address, servicer = silent_dominator
    monkeypatch.setenv(CALL_TIMEOUT_ENV, "0.2")
    threading.Timer(1.0, servicer.release.set).start()
    with DominatorClient(address, Security(None)) as client:
        client.fleet_status(timeout=20)  # answers after 1 s, past the 0.2 s default


class SilentImageServer(imageserver_pb2_grpc.ImageServerServicer):
    """Takes ListImages calls and answers only when released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def ListImages(self, request: imageserver_pb2.ListImagesRequest,
                   context: grpc.ServicerContext) -> imageserver_pb2.ListImagesResponse:
        self.release.wait(30)
        return imageserver_pb2.ListImagesResponse()


def test_a_silent_image_server_fails_the_call_after_the_call_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    servicer = SilentImageServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    imageserver_pb2_grpc.add_ImageServerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv(CALL_TIMEOUT_ENV, "0.5")
    try:
        with ImageServerClient(f"127.0.0.1:{port}", Security(None)) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                client.list_images()
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10
    finally:
        servicer.release.set()
        server.stop(0)
