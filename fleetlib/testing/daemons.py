"""Real daemons and real CLI runs for integration tests (and the benchmarks and
`dominator quickstart`): each daemon is started as its own process on a loopback
port, exactly as an operator would run it."""

from __future__ import annotations

import collections
import fcntl
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.rpc.health import wait_serving
from fleetlib.rpc.tls import Security

PROJECT = Path(__file__).resolve().parents[2]


class DidNotStart(FleetError):
    """A daemon exited or never became healthy (its log is attached as a note)."""


PORT_LOCKS = Path(tempfile.gettempdir()) / "fleet-test-ports"
RECENT_CLAIMS = 256  # ports whose claim this process holds: it outlives a daemon's start
_handed_out: set[int] = set()
_claims: collections.deque[int] = collections.deque()  # lock fds, oldest first


def _candidate_ports() -> range:
    """Ports below the kernel's ephemeral range: bind(0) and outgoing connections (of any
    process) never take those, so a port stays free between handing it out and its
    daemon binding it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, low) if low > 11000 else range(low + 1000, 65535)


def _claim(port: int) -> bool:
    """Hold an advisory lock on `port` shared by every process on this machine (pytest
    workers, other test runs): True if nobody else holds it."""
    PORT_LOCKS.mkdir(mode=0o1777, parents=True, exist_ok=True)
    fd = os.open(PORT_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _claims.append(fd)
    if len(_claims) > RECENT_CLAIMS:
        os.close(_claims.popleft())
    return True


def free_port() -> int:
    """A TCP port nobody listens on right now, not handed out before by this process and
    claimed for it against every other process that uses free_port (two pytest-xdist
    workers, or two test runs, never get the same port at the same time)."""
    candidates = _candidate_ports()
    while True:
        port = random.choice(candidates)
        if port in _handed_out or not _claim(port):
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:  # in use by something else: keep the claim, look again
                continue
        _handed_out.add(port)
        return port


@dataclass
class Daemon:
    """One daemon process started from its console entry module."""

    module: str
    args: list[str]
    role: str
    port: int
    security: Security
    log_path: Path
    state_dir: Path | None = None
    user: int | None = None  # run as this uid instead of root (see tests/run_as.py)
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    new_session: bool = False  # its own session: a terminal's Ctrl-C reaches only its starter
    start_timeout: float = 20.0

    @property
    def address(self) -> str:
        """HOST:PORT to reach it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        """Start the process and wait until it is healthy."""
        log = open(self.log_path, "ab")
        program = [self.module] if self.user is None else [
            "fleetlib.testing.run_as", str(self.user), self.module]
        self.process = subprocess.Popen(
            [sys.executable, "-m", *program, *self.args, "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT,
            env={**os.environ, **self.env}, start_new_session=self.new_session)
        log.close()
        try:
            wait_serving(self.address, self.security, self.role, timeout=self.start_timeout,
                         alive=lambda: self.process is not None and self.process.poll() is None)
        except FleetError as err:
            self.stop()
            failed = DidNotStart(f"{self.module} did not start: {err} (log: {self.log_path})")
            failed.add_note(self.log())
            raise failed from None
        return self

    def kill(self) -> None:
        """SIGKILL: the crash every daemon must survive."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")


def imageserver_daemon(state: Path, ca: Path, log: Path, *extra: str) -> Daemon:
    """An image server (not yet started) over mutual TLS with the identities of CA (as
    `certs init` makes them): STATE its state folder, LOG its log, EXTRA more flags."""
    return Daemon("imageserver.main",
                  ["--state-dir", str(state), "--tls-dir", str(ca / "imageserver"), *extra],
                  "imageserver", free_port(),
                  Security.from_options(str(ca / "admin"), insecure=False), log,
                  state_dir=state)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the `dominator` CLI as a user would, capturing its output."""
    result = subprocess.run(
        [sys.executable, "-m", "dominator.cli", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout, cwd=PROJECT)
    if check and result.returncode != 0:
        raise AssertionError(f"dominator {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


TRACEBACK_RE = re.compile(r"Traceback \(most recent call last\)")


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str,
                          code: int = 2) -> None:
    """A refused command: exit CODE (2: usage or bad input, see fleetlib/cli/run.py), one
    line on stderr holding every fragment (case-insensitive), no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert not TRACEBACK_RE.search(result.stderr), result.stderr
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith("TLS is OFF")]  # --insecure's warning
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
