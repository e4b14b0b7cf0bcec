"""Issue 3's figures on the debootstrap trees (A: minbase, B: minbase + nginx-light,
curl, python3-minimal, openssh-server), warm cache, each against its peer in the
same run:

- full verification scan, limits off, vs `find | xargs -0 sha256sum`
- fast pass with nothing changed vs `find -printf '%i %s %T@ %m\\n'`
- subd's own CPU over 60 s on an idle machine with default limits
- `sub push-image` A to B vs `rsync -aHAX --delete --numeric-ids -z` from an rsync
  daemon on loopback: wall time and bytes on the wire (loopback counters, which
  include TLS, polls and the image itself on our side)
- the change window of that push
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import Report, shell, timed
from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import PROJECT, Daemon, free_port
from fleetlib.testing.debootstrap import debootstrap_tree
from subd.scanner import ScanConfig, Scanner

CPU_SECONDS = 60
TICKS = os.sysconf("SC_CLK_TCK")


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (each byte is counted once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmit bytes
    raise RuntimeError("no loopback interface in /proc/net/dev")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def copy_tree(source: Path, dest: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)


def dominator(env: dict[str, str], *args: str) -> str:
    """Run one CLI command; its stdout."""
    return subprocess.run([sys.executable, "-m", "dominator.cli", *args], check=True,
                          cwd=PROJECT, env={**os.environ, **env}, capture_output=True,
                          text=True).stdout


def scans(report: Report, tree_a: Path, work: Path) -> None:
    """Scanner passes in-process, against find/sha256sum."""
    scanner = Scanner(tree_a, ScanConfig(), work / "scan-state")
    peer_hash = timed(shell(f"find {tree_a} -type f -print0 | xargs -0 sha256sum"))
    full = timed(lambda: scanner.scan_once(verify_all=True, limited=False))
    report.add("full verification scan (limits off)", full, "find|xargs sha256sum", peer_hash,
               1.3)
    peer_list = timed(shell(f"find {tree_a} -printf '%i %s %T@ %m\\n'"))
    fast = timed(lambda: scanner.scan_once(limited=False))
    report.add("fast pass, nothing changed", fast, "find -printf", peer_list, 2.0)


def rsync_push(tree_a: Path, tree_b: Path, work: Path) -> tuple[float, int]:
    """rsync daemon on loopback serving B, pulled over a copy of A: (seconds, bytes)."""
    port = free_port()
    config = work / "rsyncd.conf"
    config.write_text(f"port = {port}\nuse chroot = no\n[b]\npath = {tree_b}\nread only = yes\n"
                      "uid = root\ngid = root\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={config}"])
    dest = work / "rsync-dest"
    try:
        time.sleep(0.5)
        copy_tree(tree_a, dest)
        subprocess.run(["sync"], check=True)
        before = loopback_bytes()
        started = time.perf_counter()
        subprocess.run(["rsync", "-aHAX", "--delete", "--numeric-ids", "-z",
                        f"rsync://127.0.0.1:{port}/b/", f"{dest}/"], check=True)
        return time.perf_counter() - started, loopback_bytes() - before
    finally:
        daemon.terminate()
        daemon.wait()


def run(work: Path) -> Report:
    """Measure and return the report."""
    tree_a, tree_b = debootstrap_tree("minbase"), debootstrap_tree("minbase-nginx")
    for tree in (tree_a, tree_b):
        subprocess.run(["tar", "-cf", "/dev/null", str(tree)], check=True)  # warm the cache
    report = Report("subd")
    scans(report, tree_a, work)
    init_ca(work / "ca")
    admin = Security.from_options(str(work / "ca/admin"), False)
    state = work / "imageserver"
    server = Daemon("imageserver.main", ["--state-dir", str(state), "--tls-dir",
                                         str(work / "ca/imageserver")],
                    "imageserver", free_port(), admin, work / "imageserver.log").start()
    root = work / "host"
    copy_tree(tree_a, root)
    sub = Daemon("subd.main", ["--root", str(root), "--tls-dir", str(work / "ca/subd"),
                               "--trigger-command", "true {action} {service}"],
                 "subd", free_port(), admin, work / "subd.log")
    env = {"DOMINATOR_TLS_DIR": str(work / "ca/admin"),
           "DOMINATOR_IMAGESERVER": server.address}
    try:
        dominator(env, "image", "add", "b", str(tree_b))
        sub.start()
        assert sub.process is not None
        time.sleep(15)  # first scan, with default limits
        before = cpu_seconds(sub.process.pid)
        time.sleep(CPU_SECONDS)
        idle_cpu = (cpu_seconds(sub.process.pid) - before) / CPU_SECONDS * 100
        rsync_seconds, rsync_bytes = rsync_push(tree_a, tree_b, work)
        wire_before = loopback_bytes()
        started = time.perf_counter()
        pushed = json.loads(dominator(env, "sub", "push-image", sub.address, "b", "--json"))
        push_seconds = time.perf_counter() - started
        push_bytes = loopback_bytes() - wire_before
    finally:
        sub.stop()
        server.stop()
    report.add("push-image A->B (wall)", push_seconds, "rsync -z daemon", rsync_seconds, 1.0)
    report.add("push-image A->B, bytes on the wire", push_bytes / 1e6, "rsync -z daemon",
               rsync_bytes / 1e6, 1.0, "MB")
    report.add("subd idle CPU, share of a core (60 s)", idle_cpu, "goal", 2.0, 1.0, "%")
    report.add("change window A->B", pushed["change_window_ms"], "goal", 250.0, 1.0, "ms")
    return report


def main() -> None:
    """Entry point: `python -m bench.subd_bench`."""
    with tempfile.TemporaryDirectory(prefix="bench-subd-", dir="/var/tmp") as work:
        run(Path(work)).print()


if __name__ == "__main__":
    main()
