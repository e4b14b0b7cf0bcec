"""`dominator quickstart`, the README's first command, brings a system up, points
the CLI at it, and stops everything it started on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.daemons import PROJECT, cli, free_port


def test_quickstart_serves_then_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dominator.cli", "quickstart", "--state-dir", str(tmp_path),
         "--imageserver-port", str(port)],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    exports: dict[str, str] = {}
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    while len(exports) < 2 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("export "):
            key, _, value = line[len("export "):].strip().partition("=")
            exports[key] = value
    assert set(exports) == {"DOMINATOR_TLS_DIR", "DOMINATOR_IMAGESERVER"}, process.stderr.read()
    listed = cli("image", "list", env=exports, check=True)
    assert listed.stdout.startswith("sample/")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
    refused = cli("image", "list", env={**exports, **os.environ, **exports})
    assert refused.returncode == 2 and "unavailable" in refused.stderr
