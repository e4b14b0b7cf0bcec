"""Real daemons and real CLI runs for integration tests (and the benchmarks and
`dominator quickstart`): each daemon is started as its own process on a loopback
port, exactly as an operator would run it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.rpc.health import wait_serving
from fleetlib.rpc.tls import Security

PROJECT = Path(__file__).resolve().parents[2]


class DidNotStart(FleetError):
    """A daemon exited or never became healthy (its log is attached as a note)."""


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on right now, and not handed out before by this
    process (the kernel may offer the same free port twice in a row)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
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


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A refused command: non-zero exit, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert not TRACEBACK_RE.search(result.stderr), result.stderr
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith("TLS is OFF")]  # --insecure's warning
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
