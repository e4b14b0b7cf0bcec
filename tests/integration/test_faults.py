"""Network faults between the parts (issue 9): a fault-injecting TCP proxy
(fleetlib.testing.faultproxy) between subd and the image server, or between the CLI
and subd. Under each fault `dominator sub push-image` completes or fails with one
clear line; once the fault is cleared a retry converges exactly, no final path holds
content no image has, no temporary file is left over and nothing hangs.

`push-image --imageserver X` reads the image from X and passes X to subd's Fetch, so
a proxy given there sits in front of both the CLI's GetImage and subd's downloads.

Every process here runs with short RPC timeouts (keepalive KEEPALIVE s, calls
CALL_TIMEOUT s; see fleetlib.rpc.tls), so a connection gone silent fails in seconds,
and the push-image tests share one image server, its images and its proxy (each test
gets its own subd on a fresh copy of v1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetlib.fstree.scan import scan_directory
from fleetlib.fstree.tree import Kind
from fleetlib.rpc.tls import CALL_TIMEOUT_ENV, KEEPALIVE_ENV
from fleetlib.testing.daemons import TRACEBACK_RE, Daemon, cli, imageserver_daemon
from fleetlib.testing.faultproxy import Fault, FaultProxy
from fleetlib.testing.fleet import FleetUnderTest, wait_for
from fleetlib.testing.trees import make_tree, rsync_differences

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")]

BOUND = 45.0  # seconds any push may take under a fault before it counts as hung
KEEPALIVE = 3  # seconds: a silent connection fails within twice that
CALL_TIMEOUT = 20  # seconds a unary call (or the download's next message) may take
SILENT_BOUND = 25.0  # seconds a push may take when a connection goes silent
BIG_FILES = 4
BIG_SIZE = 250_000  # v2 downloads 4 x 250 kB + 4 x 50 kB, incompressible: ~1.2 MB


@pytest.fixture(scope="module", autouse=True)
def short_timeouts() -> Iterator[None]:
    """Short keepalive and call timeouts for every process the module starts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEEPALIVE_ENV, str(KEEPALIVE))
        patch.setenv(CALL_TIMEOUT_ENV, str(CALL_TIMEOUT))
        yield


# ---------------------------------------------------------------- the proxy itself


@pytest.fixture
def echo() -> Iterator[str]:
    """A loopback TCP echo server: HOST:PORT."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets some connections
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    listener.close()


def connect(proxy: FaultProxy) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.settimeout(2)
    return sock


def echoed(sock: socket.socket, size: int) -> bytes:
    sock.sendall(os.urandom(size))
    received = b""
    while len(received) < size:
        data = sock.recv(65536)
        if not data:
            break
        received += data
    return received


def test_proxy_forwards_and_injects_each_fault(echo: str) -> None:
    with FaultProxy(echo, lifetime=60) as proxy:
        sock = connect(proxy)
        assert len(echoed(sock, 200_000)) == 200_000
        proxy.set_fault(Fault(latency=0.3))
        started = time.monotonic()
        assert len(echoed(sock, 10)) == 10
        assert time.monotonic() - started >= 0.55  # both directions delayed
        proxy.set_fault(Fault(bandwidth=100_000))
        started = time.monotonic()
        assert len(echoed(sock, 50_000)) == 50_000
        assert time.monotonic() - started >= 0.4
        proxy.set_fault(Fault(stall="down"))
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.clear()  # a stall holds data back, it does not lose it
        assert sock.recv(10) == b"held"
        proxy.set_fault(Fault(blackhole=True))
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.set_fault(Fault(reset=True, after_bytes=1000))
        fresh = connect(proxy)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(10):
                echoed(fresh, 600)
        assert proxy.bytes["up"] >= 200_000
    with pytest.raises(OSError):
        connect(proxy)  # stopped with its context


def test_proxy_stops_itself_after_its_lifetime(echo: str) -> None:
    proxy = FaultProxy(echo, lifetime=0.5).start()
    try:
        sock = connect(proxy)
        time.sleep(1.0)
        sock.sendall(b"x")
        assert sock.recv(10) == b""  # reset: recv returns nothing or raises
    except ConnectionResetError:
        pass
    finally:
        proxy.stop()
    assert proxy.stopped.is_set()


# ---------------------------------------------------------------- push-image under faults


def add_image(env: dict[str, str], name: str, source: Path) -> None:
    cli("image", "add", name, str(source), env=env, check=True)


@pytest.fixture(scope="module")
def shared_imageserver(short_timeouts: None, tmp_path_factory: pytest.TempPathFactory,
                       ca: Path) -> Iterator[Daemon]:
    """One image server for the module's push-image tests (they only read from it)."""
    folder = tmp_path_factory.mktemp("imageserver")
    state = folder / "state"
    daemon = imageserver_daemon(state, ca, folder / "imageserver.log")
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def cli_env(ca: Path, shared_imageserver: Daemon) -> dict[str, str]:
    """The CLI as admin, pointed at the shared image server."""
    return {"DOMINATOR_TLS_DIR": str(ca / "admin"),
            "DOMINATOR_IMAGESERVER": shared_imageserver.address}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]
           ) -> tuple[Path, Path]:
    """Images v1 and v2 (v2 changes every big file and adds some), added to the
    image server; returns their source folders."""
    folder = tmp_path_factory.mktemp("images")
    v1 = make_tree(folder / "v1")
    for index in range(BIG_FILES):
        (v1 / "usr" / "bin" / f"tool{index}").write_bytes(os.urandom(BIG_SIZE))
    v2 = folder / "v2"
    subprocess.run(["cp", "-a", str(v1), str(v2)], check=True)
    for index in range(BIG_FILES):
        (v2 / "usr" / "bin" / f"tool{index}").write_bytes(os.urandom(BIG_SIZE + 1))
        (v2 / "etc" / f"new{index}.conf").write_bytes(os.urandom(50_000))
    add_image(cli_env, "v1", v1)
    add_image(cli_env, "v2", v2)
    return v1, v2


@pytest.fixture(scope="module")
def allowed(images: tuple[Path, Path]) -> dict[str, set[bytes]]:
    """Path -> every content hash v1 or v2 gives it."""
    return allowed_contents(*images)


@pytest.fixture
def host(tmp_path: Path, images: tuple[Path, Path], start_subd: Callable[..., Daemon]
         ) -> tuple[Path, Daemon]:
    """A subd whose root holds v1."""
    root = tmp_path / "host"
    subprocess.run(["cp", "-a", str(images[0]), str(root)], check=True)
    return root, start_subd(root)


def push(env: dict[str, str], sub_address: str, image: str, imageserver: str,
         timeout: float = BOUND) -> subprocess.CompletedProcess[str] | None:
    """push-image, or None when it did not end within `timeout` (hung)."""
    try:
        return cli("sub", "push-image", sub_address, image, "--imageserver", imageserver,
                   env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def check_outcome(result: subprocess.CompletedProcess[str] | None, fault: str) -> None:
    """Completed, or one clear line and a non-zero exit; never hung."""
    assert result is not None, f"push-image hung under {fault}"
    if result.returncode == 0:
        return
    assert not TRACEBACK_RE.search(result.stderr), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (fault, result.stderr)


def check_failed(result: subprocess.CompletedProcess[str] | None, fault: str) -> str:
    """The fault bit: one clear line and a non-zero exit; returns the line."""
    check_outcome(result, fault)
    assert result is not None and result.returncode != 0, f"{fault} did not bite"
    return result.stderr.strip()


def allowed_contents(*roots: Path) -> dict[str, set[bytes]]:
    """Path -> every content hash some image gives it."""
    allowed: dict[str, set[bytes]] = {}
    for root in roots:
        for path, _, inode in scan_directory(root).walk():
            if inode.kind == Kind.REGULAR:
                allowed.setdefault(path, set()).add(inode.hash)
    return allowed


def check_no_corrupt_file(root: Path, allowed: dict[str, set[bytes]]) -> None:
    for path, _, inode in scan_directory(root, exclude=lambda p: p == "/.subd").walk():
        if inode.kind == Kind.REGULAR:
            assert inode.hash in allowed.get(path, set()), \
                f"{path} holds content no image has (a partial write?)"


def check_converged(env: dict[str, str], root: Path, sub: Daemon, image_root: Path,
                    image: str, imageserver: str) -> None:
    """A retry without the fault converges exactly and leaves no temporary file."""
    retry = push(env, sub.address, image, imageserver, timeout=90)
    assert retry is not None, "the retry after the fault was cleared hung"
    assert retry.returncode == 0, retry.stderr
    check_clean(root, image_root)


def check_clean(root: Path, image_root: Path) -> None:
    """ROOT holds exactly the image and no temporary file."""
    assert rsync_differences(image_root, root, "/.subd") == ""
    left = [p for p in (root / ".subd" / "tmp").rglob("*")] if (root / ".subd/tmp").exists() \
        else []
    assert left == [], f"temporary files left after the update: {left}"
    scratch = [p for p in root.glob(".subd/**/.tmp/*")]
    assert scratch == [], f"object scratch files left after a complete fetch: {scratch}"


@pytest.fixture(scope="module")
def shared_proxy(shared_imageserver: Daemon) -> Iterator[FaultProxy]:
    with FaultProxy(shared_imageserver.address, lifetime=600) as proxy:
        yield proxy


@pytest.fixture
def imageserver_proxy(shared_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy in front of the shared image server, faithful again after the test."""
    yield shared_proxy
    shared_proxy.clear()
    shared_proxy.reset_all()


@pytest.mark.parametrize("fault", [
    Fault(latency=0.05),
    Fault(bandwidth=1_000_000),
    Fault(reset=True, after_bytes=200_000),  # mid-download (the image itself is smaller)
    Fault(reset=True, after_bytes=900_000),
    Fault(reset=True, after_bytes=1000),  # in the TLS handshake of every connection
], ids=["latency", "bandwidth", "reset-mid-fetch", "reset-late-fetch", "reset-handshake"])
def test_imageserver_path_fault_then_retry_converges(
        fault: Fault, cli_env: dict[str, str], images: tuple[Path, Path],
        allowed: dict[str, set[bytes]], host: tuple[Path, Daemon],
        imageserver_proxy: FaultProxy) -> None:
    root, sub = host
    imageserver_proxy.set_fault(fault)
    result = push(cli_env, sub.address, "v2", imageserver_proxy.address)
    if fault.reset and fault.after_bytes >= 200_000:
        check_failed(result, str(fault))
    else:
        check_outcome(result, str(fault))
    check_no_corrupt_file(root, allowed)
    imageserver_proxy.clear()
    if result is not None and result.returncode == 0:  # nothing left to retry
        check_clean(root, images[1])
    else:
        check_converged(cli_env, root, sub, images[1], "v2", imageserver_proxy.address)


# A whole push of v2 moves about 15 kB between the CLI and subd (TLS handshake ~3 kB,
# Poll with the tree, the fetch polls, UpdateStream, the final Poll): reset early,
# mid-way and late in it.
@pytest.mark.parametrize("after_bytes", [3000, 6000, 9500], ids=["early", "mid", "late"])
def test_cli_to_subd_reset_then_retry_converges(
        after_bytes: int, cli_env: dict[str, str], images: tuple[Path, Path],
        allowed: dict[str, set[bytes]], host: tuple[Path, Daemon],
        shared_imageserver: Daemon) -> None:
    """Resets on the CLI's connection to subd at several points of the exchange."""
    root, sub = host
    with FaultProxy(sub.address, lifetime=300) as proxy:
        proxy.set_fault(Fault(reset=True, after_bytes=after_bytes))
        result = push(cli_env, proxy.address, "v2", shared_imageserver.address)
        check_failed(result, f"reset after {after_bytes} bytes")
        check_no_corrupt_file(root, allowed)
        proxy.clear()
        check_converged(cli_env, root, sub, images[1], "v2", shared_imageserver.address)


@pytest.mark.parametrize("fault", [
    Fault(blackhole=True, after_bytes=300_000),
    Fault(stall="down", after_bytes=300_000),
], ids=["blackhole-mid-fetch", "half-open-mid-fetch"])
def test_imageserver_goes_silent_mid_fetch(
        fault: Fault, cli_env: dict[str, str], images: tuple[Path, Path],
        host: tuple[Path, Daemon], imageserver_proxy: FaultProxy) -> None:
    """The download's connection goes silent: keepalive fails it, the fetch ends with
    that error in its status (not in progress forever), push-image says so in one
    line, and a retry on a fresh connection converges."""
    root, sub = host
    imageserver_proxy.set_fault(fault)
    started = time.monotonic()
    result = push(cli_env, sub.address, "v2", imageserver_proxy.address,
                  timeout=SILENT_BOUND)
    imageserver_proxy.clear()
    imageserver_proxy.reset_all()  # what a retry would face: a fresh connection
    line = check_failed(result, str(fault))
    assert "fetch failed" in line, line
    assert time.monotonic() - started < 4 * KEEPALIVE + 10, "the silence took too long to fail"
    check_converged(cli_env, root, sub, images[1], "v2", imageserver_proxy.address)


def test_imageserver_black_hole_from_the_start_fails_clearly(
        cli_env: dict[str, str], images: tuple[Path, Path], host: tuple[Path, Daemon],
        imageserver_proxy: FaultProxy) -> None:
    """Every byte dropped from the first: the CLI's own GetImage cannot connect (gRPC
    gives up the TLS handshake), so push-image fails before asking subd anything."""
    root, sub = host
    imageserver_proxy.set_fault(Fault(blackhole=True))
    result = push(cli_env, sub.address, "v2", imageserver_proxy.address)
    check_failed(result, "black hole")
    imageserver_proxy.clear()
    check_converged(cli_env, root, sub, images[1], "v2", imageserver_proxy.address)


def test_subd_goes_silent_mid_poll(cli_env: dict[str, str], images: tuple[Path, Path],
                                   host: tuple[Path, Daemon],
                                   shared_imageserver: Daemon) -> None:
    """subd's answers stop mid-poll (half-open): the CLI's keepalive fails the call and
    push-image exits non-zero with one line instead of waiting forever."""
    root, sub = host
    with FaultProxy(sub.address, lifetime=300) as proxy:
        proxy.set_fault(Fault(stall="down", after_bytes=6000))
        result = push(cli_env, proxy.address, "v2", shared_imageserver.address,
                      timeout=SILENT_BOUND)
        proxy.clear()
        check_failed(result, "subd silent mid-poll")
    check_converged(cli_env, root, sub, images[1], "v2", shared_imageserver.address)


# ---------------------------------------------------------------- a fleet rollout


def test_fleet_rollout_through_a_faulty_link(tmp_path: Path, ca: Path, imageserver: Daemon,
                                             start_subd: Callable[..., Daemon]) -> None:
    """The proxy between the dominator and host-1 resets its connections (early, then
    mid-stream), then adds latency, while the MDB moves every host to v2: the other
    hosts converge meanwhile, host-1 shows as unreachable and converges once the link
    heals; with one fetch and one update slot, a slot the faulty host kept would stall
    the next rollout."""
    fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=3,
                           serve_args=("--fetch-slots", "1", "--update-slots", "1"))
    try:
        v1 = make_tree(tmp_path / "v1")
        v2 = tmp_path / "v2"
        subprocess.run(["cp", "-a", str(v1), str(v2)], check=True)
        for index in range(BIG_FILES):
            (v2 / "usr" / "bin" / f"tool{index}").write_bytes(os.urandom(BIG_SIZE))
        fleet.run("image", "add", "v1", str(v1))
        fleet.run("image", "add", "v2", str(v2))
        everyone = fleet.names
        with FaultProxy(fleet.subs[0].address, lifetime=400) as proxy:
            addresses = [proxy.address] + [sub.address for sub in fleet.subs[1:]]
            for name, address in zip(everyone, addresses, strict=True):
                fleet.run("mdb", "set", name, "--address", address, "--required-image", "v1")
            fleet.wait_status(everyone, "synced", "v1", timeout=90)

            proxy.set_fault(Fault(reset=True, after_bytes=4000))
            for name in everyone:
                fleet.run("mdb", "set", name, "--required-image", "v2")
            fleet.wait_status(everyone[1:], "synced", "v2", timeout=90)
            troubled = wait_for(lambda: (host := fleet.hosts()["host-1"])["last_error"] and host,
                                "host-1 shows the faulty link", timeout=60)
            assert troubled["status"] == "unreachable", troubled
            assert troubled["current_image"] == "v1", troubled

            proxy.set_fault(Fault(reset=True, after_bytes=15_000))  # polls pass, then cut
            time.sleep(3)
            proxy.set_fault(Fault(latency=0.05))
            time.sleep(1)
            proxy.clear()
            fleet.wait_status(everyone, "synced", "v2", timeout=120)
            for root in fleet.roots:
                assert rsync_differences(v2, root, "/.subd") == ""
            history = " ".join(fleet.hosts()["host-1"]["history"])
            assert "unreachable" in history or "failed" in history, history

            # Nothing stuck: the next rollout goes through the one fetch and update slot.
            for name in everyone:
                fleet.run("mdb", "set", name, "--required-image", "v1")
            fleet.wait_status(everyone, "synced", "v1", timeout=90)
            for root in fleet.roots:
                assert rsync_differences(v1, root, "/.subd") == ""
    finally:
        fleet.stop()
