"""`dominator quickstart`, the README's first command, brings a fleet up, shows it
converge and correct a hand-made change, points the CLI at it, and stops
everything it started on Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fleetlib.testing.daemons import PROJECT, cli

SUBS = 3


def free_base_port() -> int:
    """A base port whose quickstart ports (base, +1, +10, +101..+103) are all free."""
    for base in range(20000, 60000, 397):
        ports = [base, base + 1, base + 10, *(base + 100 + i for i in range(1, SUBS + 1))]
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


def command_lines(state: Path) -> dict[int, bytes]:
    """By PID, the raw /proc/PID/cmdline of each process using the state directory."""
    found = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
    lines = {}
    for pid in map(int, found.stdout.split()):
        try:
            lines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass  # gone meanwhile (pgrep itself)
    return lines


def running_from(state: Path) -> list[str]:
    """Command lines of processes still using the state directory."""
    found = subprocess.run(["pgrep", "-af", str(state)], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def test_quickstart_runs_a_fleet_then_stops_cleanly(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dominator.cli", "quickstart", "--state-dir", str(tmp_path),
         "--base-port", str(free_base_port()), "--subs", str(SUBS)],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    exports: dict[str, str] = {}
    deadline = time.monotonic() + 240
    assert process.stdout is not None
    while len(exports) < 5 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("export "):
            key, _, value = line[len("export "):].strip().partition("=")
            exports[key] = value
    if len(exports) < 5:
        process.kill()
        raise AssertionError(process.stderr.read() if process.stderr else "no output")
    try:  # a failed check still stops the fleet (SIGINT: quickstart stops its daemons)
        assert set(exports) == {"DOMINATOR_TLS_DIR", "DOMINATOR_ADDRESS", "DOMINATOR_IMAGESERVER",
                                "DOMINATOR_URL", "DOMINATOR_TOKEN"}
        hosts = json.loads(cli("fleet", "list", "--json", env=exports, check=True).stdout)
        assert [h["hostname"] for h in hosts] == ["host-1", "host-2", "host-3"]
        assert hosts[0]["intrusion_paths"] == ["/etc/motd"]  # the demonstrated hand edit
        assert all(h["status"] == "synced" for h in hosts[1:])
        # Defect 9: the token never travels on a command line (where `ps` shows it).
        token = exports["DOMINATOR_TOKEN"].encode()
        lines = command_lines(tmp_path)
        assert any(b"\0serve\0" in line for line in lines.values()), lines
        assert not [line for line in lines.values() if token in line]
        assert (tmp_path / "dominator" / "http-token").read_bytes().strip() == token
        for index in (1, 2, 3):
            root = tmp_path / "subs" / f"host-{index}"
            assert (root / "etc/hostname").read_text() == f"host-{index}\n"
            assert "pwned" not in (root / "etc/motd").read_text()
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
    assert "coming with" not in err
    assert f"Dashboard (open, read-only): {exports['DOMINATOR_URL']}/" in err
    assert running_from(tmp_path) == []
