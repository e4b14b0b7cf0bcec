"""Issue 13's container-image figure: `dominator image add NAME --from-oci LAYOUT` of a
generated three-layer OCI image of --files small files, against doing it by hand in the
same run: `tar -x` of each layer in order into a folder, then `dominator image add NAME
DIR` (which gets no whiteouts right: the peer's tree keeps what they delete).

Layer 1: --files files of 200-400 bytes in directories of 250, gzip; layer 2: every
tenth directory's files rewritten, one directory whited out and one made opaque, zstd;
layer 3: a few files, plain. Both add into a fresh image server (TLS) each run: wall
time and the adding CLI's peak memory (max RSS of that process; the peer's tar is
smaller). Ours and the peer run in turns, medians of --runs. The goals are this
benchmark's own: no slower than by hand, at most 1.5x its memory.

`python -m bench.oci_bench [--files 100000] [--runs 3] [--json]`
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import click

from bench.timing import Report
from fleetlib.rpc.certs import init_ca
from fleetlib.testing.daemons import PROJECT, Daemon, imageserver_daemon
from fleetlib.testing.oci import image_manifest, python_tar_layer, write_manifest

PER_DIR = 250
POLL = 0.05  # seconds between two reads of the adding process's peak memory
NAME = "oci_bench"


def layers(files: int) -> list[bytes]:
    """The three uncompressed layers."""
    rng = random.Random(13)
    dirs = max(1, files // PER_DIR)

    def member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.mtime = 1_700_000_000
        return info, data

    def content() -> bytes:
        return rng.randbytes(rng.randint(100, 200)).hex().encode()

    lower = [member(f"d{d:04}/f{f:03}", content()) for d in range(dirs) for f in range(PER_DIR)]
    upper = [member(f"d{d:04}/f{f:03}", content())
             for d in range(0, dirs, 10) for f in range(PER_DIR)]
    upper += [member(f"d{dirs - 1:04}/.wh..wh..opq", b""), member(".wh.d0001", b"")]
    top = [member(f"etc/f{f}", content()) for f in range(10)]
    return [python_tar_layer(*lower), python_tar_layer(*upper), python_tar_layer(*top)]


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `dominator` run, which must succeed. The
    peak is the process's VmHWM, read while it runs: its rusage would also count this
    process's memory at the fork."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "dominator.cli", *args], cwd=PROJECT,
                             env=env, stdout=subprocess.DEVNULL)
    peak_kib = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            continue  # just exited
        peak_kib = max([peak_kib, *(int(line.split()[1]) for line in status.splitlines()
                                    if line.startswith("VmHWM:"))])
        time.sleep(POLL)
    if child.returncode:
        raise RuntimeError(f"dominator {' '.join(args)} failed ({child.returncode})")
    return time.perf_counter() - started, peak_kib / 1024


def fresh_server(work: Path) -> Daemon:
    """An empty image server (the last one's state dropped)."""
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    return imageserver_daemon(state, work / "ca", work / "imageserver.log").start()


@click.command()
@click.option("--files", default=100_000, show_default=True, help="Files in layer 1.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 9),
              help="Runs of ours and of the peer, in turns; medians are shown.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--work-dir", default="/var/tmp", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the scratch folder (image, servers' state, unpacked layers) goes.")
def main(files: int, runs: int, as_json: bool, work_dir: Path) -> None:
    """Print the figures (also saved to bench/results/oci_bench.json)."""
    with tempfile.TemporaryDirectory(prefix="oci-bench-", dir=work_dir) as scratch:
        work = Path(scratch)
        init_ca(work / "ca")
        env = {**os.environ, "DOMINATOR_TLS_DIR": str(work / "ca/admin")}
        layout = work / "layout"
        manifest = image_manifest(layout, layers(files), ["gzip", "zstd", "plain"])
        write_manifest(layout, manifest)
        blobs = [layout / "blobs/sha256" / layer["digest"].removeprefix("sha256:")
                 for layer in manifest["layers"]]
        unpacked = work / "unpacked"
        peer = [f"tar -xzf {blobs[0]} -C {unpacked}", f"tar --zstd -xf {blobs[1]} -C {unpacked}",
                f"tar -xf {blobs[2]} -C {unpacked}"]
        ours_times, ours_rss, peer_times, peer_rss = [], [], [], []
        for _ in range(runs):
            server = fresh_server(work)
            subprocess.run(["sync"], check=True)
            shutil.rmtree(unpacked, ignore_errors=True)
            unpacked.mkdir()
            started = time.perf_counter()
            for command in peer:
                subprocess.run(["bash", "-c", command], check=True)
            wall, rss = run_cli(["image", "add", "by-hand", str(unpacked)],
                                {**env, "DOMINATOR_IMAGESERVER": server.address})
            peer_times.append(time.perf_counter() - started)
            peer_rss.append(rss)
            server.stop()
            server = fresh_server(work)
            subprocess.run(["sync"], check=True)
            wall, rss = run_cli(["image", "add", "oci", "--from-oci", str(layout)],
                                {**env, "DOMINATOR_IMAGESERVER": server.address})
            ours_times.append(wall)
            ours_rss.append(rss)
            server.stop()
    report = Report(NAME)
    label = f"{files:,} files, 3 layers"
    report.add(f"{label}: image add --from-oci", statistics.median(ours_times),
               "tar -x layers + image add DIR", statistics.median(peer_times), 1.0)
    report.add(f"{label}: peak memory", statistics.median(ours_rss), "image add DIR's",
               statistics.median(peer_rss), 1.5, unit="MiB")
    if as_json:
        print(json.dumps(report.rows, indent=2))
    else:
        report.print()


if __name__ == "__main__":
    main()
