"""Issue 3's and issue 13's figures, warm cache, each against its peer in the same run.

Scans (issue 13), on each of `--trees`: the debootstrap minbase tree and the generated
tree of 120,000 small files (`image_bench.files_tree`: 400 directories of 300 files of
300-500 bytes, where per-file costs are all there is). The scanner runs in this
process with its limits off (`limited=False`), after one untimed pass that fills its
change cache; ours and the peer run in turns (`paired`), medians of `--runs`:

- full verification scan (every inode read again) vs `find DIR -type f -print0 |
  xargs -0 sha256sum` (goal 1.3x)
- fast pass with nothing changed vs `find DIR -printf '%i %s %T@ %m\\n'` (goal 2.0x)

Then, unless `--scans-only`, issue 3's figures on the debootstrap trees (A: minbase,
B: minbase + nginx-light, curl, python3-minimal, openssh-server):

- subd's own CPU over 60 s on an idle machine with default limits
- `sub push-image` A to B vs `rsync -aHAX --delete --numeric-ids -z` from an rsync
  daemon on loopback: wall time and bytes on the wire (loopback counters, which
  include TLS, polls and the image itself on our side)
- the change window of that push

`python -m bench.subd_bench [--trees minbase,files] [--runs 3] [--scans-only] [--json]`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench.image_bench import TREES, tree_of
from bench.imageservers import warm
from bench.replication import save
from bench.timing import Report, paired, shell
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


def scans(report: Report, name: str, tree: Path, work: Path, runs: int) -> dict[str, float]:
    """Scanner passes in-process (limits off), in turns with find/sha256sum; the
    first pass (empty change cache, untimed in the rows) in the raw figures."""
    warm(tree)
    scanner = Scanner(tree, ScanConfig(), work / f"scan-state-{name}")
    started = time.perf_counter()
    scanner.scan_once(limited=False)
    first = time.perf_counter() - started
    full, peer_hash = paired(lambda: scanner.scan_once(verify_all=True, limited=False),
                             shell(f"find {tree} -type f -print0 | xargs -0 sha256sum"), runs)
    report.add(f"{name}: full verification scan", full, "find|xargs sha256sum", peer_hash,
               1.3)
    fast, peer_list = paired(lambda: scanner.scan_once(limited=False),
                             shell(f"find {tree} -printf '%i %s %T@ %m\\n'"), runs)
    report.add(f"{name}: fast pass, nothing changed", fast, "find -printf", peer_list, 2.0)
    tree_now = scanner.tree
    assert tree_now is not None
    return {"inodes": len(tree_now.inodes), "first_pass_seconds": round(first, 3)}


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


def push_and_idle(report: Report, work: Path) -> None:
    """Issue 3's figures: subd's idle CPU with default limits, and push-image A->B
    against rsync."""
    tree_a, tree_b = debootstrap_tree("minbase"), debootstrap_tree("minbase-nginx")
    warm(tree_a, tree_b)
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


@click.command()
@click.option("--trees", default=",".join(TREES), show_default=True,
              help="Trees to scan, comma-separated: minbase (debootstrap), files (120,000 "
                   "small files).")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 9),
              help="Passes of ours and runs of the peer, in turns; medians are shown.")
@click.option("--scans-only", is_flag=True,
              help="Only the scans (skips idle CPU and push-image, about two minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--work-dir", default="/var/tmp", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the scratch folder (scanner state, the host, rsync copy) goes.")
def main(trees: str, runs: int, scans_only: bool, as_json: bool, work_dir: Path) -> None:
    """subd's scans against find and sha256sum; push-image against rsync; idle CPU."""
    names = [t.strip() for t in trees.split(",") if t.strip()]
    if unknown := set(names) - set(TREES):
        raise click.BadParameter(f"unknown tree(s) {', '.join(sorted(unknown))}",
                                 param_hint="--trees")
    report = Report("subd")
    raw: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-subd-", dir=work_dir) as work:
        for name in names:
            raw[name] = scans(report, name, tree_of(name), Path(work), runs)
        if not scans_only:
            push_and_idle(report, Path(work))
    raw["load"] = os.getloadavg()
    save(report, raw, as_json)
    if not as_json:
        load = os.getloadavg()
        click.echo(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
