"""The RPC security layer against real servers on loopback: certificates, mutual TLS,
method authorization, health, reflection, --insecure and the `dominator certs` CLI."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import click
import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dominator.cli.certs import certs
from fleetlib.cli.options import security_options
from fleetlib.errors import FleetError, NotFoundError, PreconditionError
from fleetlib.rpc.auth import method_permitted
from fleetlib.rpc.certs import (
    PERMITTED_METHODS_OID,
    ROLE_METHODS,
    common_name,
    init_ca,
    issue,
    permitted_methods,
)
from fleetlib.rpc.server import RunningServer, start_server
from fleetlib.rpc.tls import Identity, Security, open_channel, parse_address
from fleetlib.wire import objectserver_pb2 as pb
from fleetlib.wire import objectserver_pb2_grpc as pb_grpc

HASHES = [b"\x01" * 32, b"\x02" * 32]


class FakeObjectServer(pb_grpc.ObjectServerServicer):
    """Knows no object. Mixes handler kinds: coroutine, sync generator, client stream."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def CheckObjects(self, request, context):
        self.calls.append("CheckObjects")
        return pb.CheckObjectsResponse(
            present=[False] * len(request.hashes), sizes=[0] * len(request.hashes)
        )

    def GetObjects(self, request, context):
        self.calls.append("GetObjects")
        for digest in request.hashes:
            yield pb.ObjectChunks(chunks=[pb.ObjectChunk(hash=digest, size=0)])

    async def AddObjects(self, request_iterator, context):
        self.calls.append("AddObjects")
        count = 0
        async for _ in request_iterator:
            count += 1
        return pb.AddObjectsResponse(already_present=count)


def one_piece(digest: bytes) -> pb.ObjectChunks:
    """A stream message holding the first piece of one object."""
    return pb.ObjectChunks(chunks=[pb.ObjectChunk(hash=digest)])


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    init_ca(directory)
    return directory


def identity(ca: Path, tmp_path: Path, name: str, methods: list[str]) -> Security:
    issue(name, methods, ca, tmp_path / name)
    return Security(Identity.load(tmp_path / name))


def role(ca: Path, name: str) -> Security:
    return Security(Identity.load(ca / name))


@pytest.fixture
def servicer() -> FakeObjectServer:
    return FakeObjectServer()


@pytest.fixture
async def secure_server(ca: Path, servicer: FakeObjectServer) -> AsyncIterator[RunningServer]:
    running = await start_server(
        [(pb_grpc.add_ObjectServerServicer_to_server, servicer, "fleet.ObjectServer")],
        0,
        role(ca, "imageserver"),
        host="127.0.0.1",
    )
    yield running
    await running.server.stop(None)


async def check_objects(channel: grpc.aio.Channel) -> pb.CheckObjectsResponse:
    stub = pb_grpc.ObjectServerStub(channel)
    return await stub.CheckObjects(pb.CheckObjectsRequest(hashes=HASHES), timeout=5)


def channel(server: RunningServer, security: Security, server_role: str = "imageserver"):
    return open_channel(f"localhost:{server.port}", security, server_role, aio=True)


# --- certificates -----------------------------------------------------------------


def test_init_writes_ca_and_role_identities(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    ca = tmp_path / "ca"
    assert (ca / "ca.pem").is_file()
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    for name, methods in ROLE_METHODS.items():
        folder = ca / name
        assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
        assert (folder / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()
        assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
        cert_pem = (folder / "cert.pem").read_bytes()
        assert common_name(cert_pem) == name
        assert permitted_methods(cert_pem) == tuple(methods)
    assert not [p for p in ca.rglob(".*")], "temporary files left behind"
    with pytest.raises(FleetError, match="already exists"):
        init_ca(ca)


def test_issued_certificate_contents(ca: Path, tmp_path: Path) -> None:
    issue("builder", ["ImageServer.*"], ca, tmp_path / "out", hosts=["10.1.2.3", "img.example"])
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "cert.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["builder", "localhost", "img.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    methods = cert.extensions.get_extension_for_oid(PERMITTED_METHODS_OID)
    assert not methods.critical
    assert methods.value.value == b"ImageServer.*"
    assert 364 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    assert (ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc).days >= 3649


@pytest.mark.parametrize("pattern", ["Subd/Poll", "Subd..Poll", "Subd.Poll.Extra", "", "1Subd"])
def test_bad_method_pattern_is_refused(ca: Path, tmp_path: Path, pattern: str) -> None:
    with pytest.raises(FleetError, match="bad method pattern|no methods"):
        issue("x", ["Subd.*", pattern] if pattern else [], ca, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["", "a/b", "has space", "x" * 65])
def test_bad_name_is_refused(ca: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(FleetError, match="bad certificate name"):
        issue(name, ["*"], ca, tmp_path / "x")


def test_issue_without_ca_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match=r"cannot read .*ca\.pem"):
        issue("x", ["*"], tmp_path / "nothing", tmp_path / "x")


def test_method_matching() -> None:
    assert method_permitted("/fleet.Subd/Poll", ("Subd.*",))
    assert method_permitted("/fleet.Subd/Poll", ("*",))
    assert method_permitted("/fleet.ImageServer/GetImage", ("Subd.*", "ImageServer.Get*"))
    assert not method_permitted("/fleet.ImageServer/AddImage", ("ImageServer.Get*",))
    assert not method_permitted("/fleet.Subd/Poll", ("subd.*",))
    assert not method_permitted("/fleet.Subd/Poll", ())
    assert not method_permitted("garbage", ("*",))


# --- identities and addresses ------------------------------------------------------


def test_missing_tls_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match=r"no TLS identity: pass --tls-dir DIR"):
        Security.from_options(None, False)
    with pytest.raises(FleetError, match=r"cannot read TLS identity file .*nowhere/ca\.pem"):
        Security.from_options(str(tmp_path / "nowhere"), False)


def test_bad_pem_names_the_file(ca: Path, tmp_path: Path) -> None:
    folder = tmp_path / "id"
    folder.mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (folder / name).write_bytes((ca / "admin" / name).read_bytes())
    (folder / "key.pem").write_bytes((ca / "subd" / "key.pem").read_bytes())
    with pytest.raises(FleetError, match=r"key\.pem does not match .*cert\.pem"):
        Identity.load(folder)
    (folder / "cert.pem").write_text("not a certificate\n")
    with pytest.raises(FleetError, match=r"cert\.pem is not a PEM certificate"):
        Identity.load(folder)
    assert Identity.load(ca / "admin").name == "admin"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", "host:6969"),
        ("host:7000", "host:7000"),
        (" 10.0.0.1 ", "10.0.0.1:6969"),
        ("[::1]:7000", "[::1]:7000"),
        ("[::1]", "[::1]:6969"),
        ("fe80::1", "[fe80::1]:6969"),
    ],
)
def test_parse_address(text: str, expected: str) -> None:
    assert parse_address(text, 6969) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:0", "host:70000", "host:x", "[zz]:1", "a b"])
def test_parse_address_rejects_junk(text: str) -> None:
    with pytest.raises(FleetError):
        parse_address(text, 6969)


# --- real servers --------------------------------------------------------------------


async def test_admin_can_call(ca: Path, secure_server: RunningServer) -> None:
    async with channel(secure_server, role(ca, "admin")) as ch:
        response = await check_objects(ch)
    assert list(response.present) == [False, False]
    assert list(response.sizes) == [0, 0]


async def test_certificate_permits_only_its_methods(
    ca: Path, tmp_path: Path, secure_server: RunningServer, servicer: FakeObjectServer
) -> None:
    limited = identity(ca, tmp_path, "limited", ["ImageServer.GetImage"])
    async with channel(secure_server, limited) as ch:
        stub = pb_grpc.ObjectServerStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await check_objects(ch)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'limited'" in denied.value.details()
        assert "ObjectServer.CheckObjects" in denied.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            [c async for c in stub.GetObjects(pb.GetObjectsRequest(hashes=HASHES), timeout=5)]
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.AddObjects(iter([one_piece(HASHES[0])]), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert servicer.calls == [], "a denied call must never reach the servicer"

    allowed = identity(ca, tmp_path, "objects", ["ObjectServer.*"])
    async with channel(secure_server, allowed) as ch:
        stub = pb_grpc.ObjectServerStub(ch)
        assert list((await check_objects(ch)).present) == [False, False]
        chunks = [c async for c in stub.GetObjects(pb.GetObjectsRequest(hashes=HASHES))]
        assert [m.chunks[0].hash for m in chunks] == HASHES
        added = await stub.AddObjects(iter([one_piece(h) for h in HASHES]), timeout=5)
        assert added.already_present == 2


async def test_subd_role_may_fetch_but_not_add(ca: Path, secure_server: RunningServer) -> None:
    async with channel(secure_server, role(ca, "subd")) as ch:
        stub = pb_grpc.ObjectServerStub(ch)
        await check_objects(ch)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.AddObjects(iter([one_piece(HASHES[0])]), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_client_without_certificate_is_rejected(
    ca: Path, secure_server: RunningServer, servicer: FakeObjectServer
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=(ca / "ca.pem").read_bytes())
    async with grpc.aio.secure_channel(
        f"localhost:{secure_server.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "imageserver")],
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await check_objects(ch)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == []


async def test_client_from_another_ca_is_rejected(
    tmp_path: Path, secure_server: RunningServer, servicer: FakeObjectServer
) -> None:
    init_ca(tmp_path / "other")
    other_admin = role(tmp_path / "other", "admin")
    async with channel(secure_server, other_admin) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await check_objects(ch)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == []


async def test_server_must_hold_the_expected_role(ca: Path, secure_server: RunningServer) -> None:
    async with channel(secure_server, role(ca, "admin"), server_role="subd") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await check_objects(ch)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_for_any_valid_certificate(
    ca: Path, tmp_path: Path, secure_server: RunningServer
) -> None:
    nobody = identity(ca, tmp_path, "prober", ["Nothing.Here"])
    async with channel(secure_server, nobody) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "fleet.ObjectServer"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(
    ca: Path, tmp_path: Path, secure_server: RunningServer
) -> None:
    nobody = identity(ca, tmp_path, "tooling", ["Nothing.Here"])
    async with channel(secure_server, nobody) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"fleet.ObjectServer", "grpc.health.v1.Health"} <= names


async def test_sync_channel_works(ca: Path, secure_server: RunningServer) -> None:
    def call() -> list[bool]:
        address = f"127.0.0.1:{secure_server.port}"
        with open_channel(address, role(ca, "dominator"), "imageserver") as ch:
            stub = pb_grpc.ObjectServerStub(ch)
            request = pb.CheckObjectsRequest(hashes=HASHES)
            return list(stub.CheckObjects(request, timeout=5).present)

    # In a thread, so that the server's event loop keeps serving meanwhile.
    assert await asyncio.to_thread(call) == [False, False]


async def test_insecure_mode_works_and_warns(
    caplog: pytest.LogCaptureFixture, servicer: FakeObjectServer
) -> None:
    with caplog.at_level(logging.WARNING):
        security = Security.from_options(None, insecure=True)
        running = await start_server(
            [(pb_grpc.add_ObjectServerServicer_to_server, servicer, "fleet.ObjectServer")],
            0,
            security,
            host="127.0.0.1",
        )
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("TLS is OFF" in w and "development only" in w for w in warnings)
        async with open_channel(
            f"127.0.0.1:{running.port}", security, "imageserver", aio=True
        ) as ch:
            assert list((await check_objects(ch)).present) == [False, False]
    finally:
        await running.server.stop(None)


async def test_busy_port_is_a_clear_error(ca: Path, secure_server: RunningServer) -> None:
    with pytest.raises(FleetError, match="cannot listen on"):
        await start_server([], secure_server.port, role(ca, "imageserver"), host="127.0.0.1")


# --- command line ----------------------------------------------------------------------


def test_security_options_decorator(ca: Path) -> None:
    seen: list[Security] = []

    @click.command()
    @click.option("--name", default="x")
    @security_options
    def command(name: str, security: Security) -> None:
        seen.append(security)

    runner = CliRunner()
    assert runner.invoke(command, ["--insecure"]).exit_code == 0
    assert seen[-1].identity is None
    result = runner.invoke(command, [], env={"DOMINATOR_TLS_DIR": str(ca / "admin")})
    assert result.exit_code == 0, result.output
    assert seen[-1].identity is not None and seen[-1].identity.name == "admin"
    result = runner.invoke(command, [], env={"DOMINATOR_TLS_DIR": None})
    assert isinstance(result.exception, FleetError)
    assert "--insecure" in runner.invoke(command, ["--help"]).output


def test_certs_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(certs, ["init", str(tmp_path / "ca")])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'ca' / 'ca.key'}" in result.output
    for name in ROLE_METHODS:
        assert f"{tmp_path / 'ca' / name}/" in result.output
    again = runner.invoke(certs, ["init", str(tmp_path / "ca")])
    assert isinstance(again.exception, FleetError)

    result = runner.invoke(
        certs,
        [
            "issue",
            "deployer",
            "--methods",
            "Subd.*, ImageServer.GetImage",
            "--ca",
            str(tmp_path / "ca"),
            "--out",
            str(tmp_path / "deployer"),
            "--host",
            "10.9.9.9",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'deployer' / 'key.pem'}" in result.output
    cert_pem = (tmp_path / "deployer" / "cert.pem").read_bytes()
    assert permitted_methods(cert_pem) == ("Subd.*", "ImageServer.GetImage")

    bad = runner.invoke(
        certs,
        ["issue", "x", "--methods", "Subd/Poll", "--ca", str(tmp_path / "ca"), "--out", "o"],
    )
    assert isinstance(bad.exception, FleetError)
    assert "Subd/Poll" in str(bad.exception)
    assert "Make a CA" in runner.invoke(certs, ["--help"]).output


class FailingObjectServer(pb_grpc.ObjectServerServicer):
    """Lets FleetErrors escape its methods, as a servicer with a missed case would."""

    async def CheckObjects(self, request, context):
        raise NotFoundError("no object here")

    async def GetObjects(self, request, context):
        yield pb.ObjectChunks(chunks=[pb.ObjectChunk(hash=HASHES[0], size=1, data=b"x")])
        raise FleetError("the second object is bad")

    async def AddObjects(self, request_iterator, context):
        async for _ in request_iterator:
            raise PreconditionError("not now")


async def test_escaped_fleet_errors_answer_one_line_without_traceback(
    ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(
        [(pb_grpc.add_ObjectServerServicer_to_server, FailingObjectServer(),
          "fleet.ObjectServer")], 0, role(ca, "imageserver"), host="127.0.0.1")
    try:
        async with channel(running, role(ca, "admin")) as ch:
            stub = pb_grpc.ObjectServerStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await check_objects(ch)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert refused.value.details() == "no object here"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [c async for c in stub.GetObjects(pb.GetObjectsRequest(hashes=HASHES), timeout=5)]
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == "the second object is bad"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.AddObjects(iter([one_piece(HASHES[0])]), timeout=5)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await running.server.stop(None)
    assert not [r for r in caplog.records if r.exc_info or "Unexpected" in r.getMessage()]
    assert any("no object here" in r.getMessage() for r in caplog.records)
