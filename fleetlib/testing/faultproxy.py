"""A fault-injecting TCP proxy for tests: put it on a loopback port in front of a
real daemon and switch network faults on and off while the test runs.

    with FaultProxy(imageserver.address) as proxy:
        proxy.set_fault(Fault(reset=True, after_bytes=100_000))
        ...  # connect to proxy.address instead of the daemon
        proxy.clear()

Faults (one `Fault` at a time, applied to every connection, open or new):
latency (each chunk held that long, per direction), a bandwidth cap (bytes/s per
direction), a reset (RST both ends), a black hole (bytes read and dropped, both
ways, the connection kept open) and a stall of one direction (that side is no
longer read, so the sender's window fills; nothing is closed). `after_bytes` delays
a reset, black hole or stall until that many bytes have crossed the connection since
the fault was set (or the connection opened): a fault in the middle of a stream.

The proxy is bounded: it stops itself after `lifetime` seconds, its threads are
daemons that notice a stop within a fraction of a second, and leaving the context
closes every connection.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Direction = Literal["up", "down"]  # up: client to daemon; down: daemon to client
CHUNK = 64 * 1024
TICK = 0.05  # how often an idle thread looks at the fault and the stop flag
MAX_PENDING = 64  # chunks held back by latency before the proxy stops reading


@dataclass(frozen=True)
class Fault:
    """What the proxy does to traffic; the default is a faithful proxy."""

    latency: float = 0.0
    bandwidth: int = 0  # bytes per second and direction; 0: unlimited
    reset: bool = False
    blackhole: bool = False
    stall: Direction | None = None
    after_bytes: int = 0

    def __post_init__(self) -> None:
        if self.latency < 0 or self.bandwidth < 0 or self.after_bytes < 0:
            raise ValueError(f"negative value in {self}")
        if self.stall not in (None, "up", "down"):
            raise ValueError(f"stall must be 'up' or 'down', not {self.stall!r}")


NO_FAULT = Fault()


class _Connection:
    """One client connection and its connection to the daemon."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.lock = threading.Lock()
        self.generation = -1
        self.crossed = 0  # bytes since the current fault was set or the connection opened
        self.closed = False
        self.open_directions = 2

    def fault(self) -> tuple[Fault, bool]:
        """The current fault, and whether its `after_bytes` threshold is passed."""
        fault, generation = self.proxy.current()
        with self.lock:
            if generation != self.generation:
                self.generation, self.crossed = generation, 0
            return fault, self.crossed >= fault.after_bytes

    def count(self, size: int) -> None:
        with self.lock:
            self.crossed += size

    def reset(self) -> None:
        """Close both ends with RST (SO_LINGER 0)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()

    def direction_done(self) -> None:
        """One direction reached end of stream; close when both have."""
        with self.lock:
            self.open_directions -= 1
            last = self.open_directions == 0 and not self.closed
            if last:
                self.closed = True
        if last:
            self.client.close()
            self.server.close()

    def pump(self, direction: Direction) -> None:
        """Forward one direction until end of stream, a reset or the proxy's stop."""
        source, dest = (self.client, self.server) if direction == "up" \
            else (self.server, self.client)
        pending: collections.deque[tuple[float, bytes]] = collections.deque()
        budget_start, budget_sent = time.monotonic(), 0
        try:
            while self.live():
                fault, armed = self.fault()
                if armed and fault.reset:
                    log.info("fault proxy: resetting a connection")
                    self.reset()
                    return
                if armed and fault.stall == direction:
                    time.sleep(TICK)  # hold what was read; read no more
                    continue
                while pending and pending[0][0] <= time.monotonic():
                    data = pending.popleft()[1]
                    if fault.bandwidth:
                        budget_sent += len(data)
                        wait = budget_start + budget_sent / fault.bandwidth - time.monotonic()
                        if wait < -1:  # idle for a while: no burst credit beyond a second
                            budget_start, budget_sent = time.monotonic() - 1, len(data)
                        elif wait > 0:
                            time.sleep(wait)
                    else:
                        budget_start, budget_sent = time.monotonic(), 0
                    self.send(dest, data)
                if len(pending) >= MAX_PENDING:
                    time.sleep(TICK)
                    continue
                wait = TICK if not pending else \
                    max(0.0, min(TICK, pending[0][0] - time.monotonic()))
                readable, _, _ = select.select([source], [], [], wait)
                if not readable:
                    continue
                size = min(CHUNK, max(1024, fault.bandwidth // 20)) if fault.bandwidth \
                    else CHUNK
                if not armed and fault.after_bytes:
                    size = min(size, max(1, fault.after_bytes - self.crossed))  # stop there
                try:
                    data = source.recv(size)
                except BlockingIOError:
                    continue
                if not data:
                    while pending:
                        self.send(dest, pending.popleft()[1])
                    dest.shutdown(socket.SHUT_WR)
                    self.direction_done()
                    return
                fault, armed = self.fault()  # it may have changed during select
                self.count(len(data))
                self.proxy.add_bytes(direction, len(data))
                if armed and fault.blackhole:
                    continue  # dropped
                pending.append((time.monotonic() + fault.latency, data))
        except (OSError, ValueError):  # ValueError: select on a socket closed meanwhile
            self.reset()  # one side went away: so does the other, as abruptly

    def live(self) -> bool:
        """Whether to keep forwarding."""
        return not self.closed and not self.proxy.stopped.is_set()

    def send(self, dest: socket.socket, data: bytes) -> None:
        """All of `data` to a non-blocking socket, giving up when the connection or
        the proxy closes (a stalled peer must not pin the thread)."""
        view = memoryview(data)
        while view:
            if not self.live():
                raise OSError("connection closed")
            _, writable, _ = select.select([], [dest], [], TICK)
            if writable:
                try:
                    view = view[dest.send(view):]
                except BlockingIOError:
                    continue


class FaultProxy:
    """A TCP proxy on `listen_host` (an ephemeral port unless `port`) forwarding to
    `target` ("HOST:PORT"), with a switchable `Fault`."""

    def __init__(self, target: str, listen_host: str = "127.0.0.1", port: int = 0,
                 lifetime: float = 600.0) -> None:
        host, _, target_port = target.rpartition(":")
        self.target = (host.strip("[]"), int(target_port))
        self.lifetime = lifetime
        self.stopped = threading.Event()
        self._listener = socket.create_server((listen_host, port))
        self._listener.settimeout(TICK)
        self._lock = threading.Lock()
        self._fault = NO_FAULT
        self._generation = 0
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self.bytes = {"up": 0, "down": 0}
        self.accepted = 0

    @property
    def address(self) -> str:
        """HOST:PORT clients connect to instead of the daemon."""
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def set_fault(self, fault: Fault = NO_FAULT) -> None:
        """Apply `fault` from now on, to open and new connections."""
        with self._lock:
            self._fault = fault
            self._generation += 1
        log.info("fault proxy %s: %s", self.address, fault)

    def clear(self) -> None:
        """Back to faithful forwarding."""
        self.set_fault(NO_FAULT)

    def current(self) -> tuple[Fault, int]:
        """The fault in force and its generation (bumped by every `set_fault`)."""
        with self._lock:
            return self._fault, self._generation

    def add_bytes(self, direction: Direction, size: int) -> None:
        """Count bytes read from one side (dropped ones included)."""
        with self._lock:
            self.bytes[direction] += size

    def reset_all(self) -> None:
        """RST every open connection now."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.reset()

    def start(self) -> FaultProxy:
        """Begin accepting connections (in a daemon thread)."""
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        """Stop accepting, reset every connection, and wait (bounded) for the threads."""
        self.stopped.set()
        self._listener.close()
        self.reset_all()
        for thread in list(self._threads):
            thread.join(timeout=2)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., object], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="faultproxy")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self.stopped.is_set():
            if time.monotonic() > deadline:
                log.warning("fault proxy %s: lifetime over, stopping", self.address)
                self.stopped.set()
                self.reset_all()
                return
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError as err:
                log.warning("fault proxy: cannot reach %s: %s", self.target, err)
                client.close()
                continue
            client.setblocking(False)
            server.setblocking(False)
            connection = _Connection(self, client, server)
            with self._lock:
                self._connections = [c for c in self._connections if not c.closed]
                self._connections.append(connection)
                self.accepted += 1
                self._threads = [t for t in self._threads if t.is_alive()]
            self._spawn(connection.pump, "up")
            self._spawn(connection.pump, "down")
