"""Issue 2's figures, on the debootstrap minbase tree with a warm page cache:
`image add` (fresh and again) vs `tar -cf - DIR | sha256sum`, and `image get`
vs `tar -x` of the same tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.timing import Report, fresh_dir, shell, timed
from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import PROJECT, Daemon, free_port
from fleetlib.testing.debootstrap import debootstrap_tree


def dominator(env: dict[str, str], *args: str) -> None:
    """Run one CLI command as a user would."""
    subprocess.run([sys.executable, "-m", "dominator.cli", *args], check=True, cwd=PROJECT,
                   env={**os.environ, **env}, stdout=subprocess.DEVNULL)


def run(work: Path) -> Report:
    """Measure and return the report."""
    tree = debootstrap_tree("minbase")
    init_ca(work / "ca")
    env = {"DOMINATOR_TLS_DIR": str(work / "ca/admin")}
    subprocess.run(["tar", "-cf", "-", "-C", str(tree), "."], check=True,
                   stdout=subprocess.DEVNULL)  # warm the page cache
    report = Report("image")
    peer_hash = timed(shell(f"tar -cf - -C {tree} . | sha256sum"))
    added: list[str] = []

    def add_image() -> None:
        added.append(f"img{len(added)}")
        dominator(env, "image", "add", added[-1], str(tree))

    servers: list[Daemon] = []

    def new_server() -> None:
        for old in servers:
            old.stop()
        state = work / f"state{len(servers)}"
        daemon = Daemon("imageserver.main", ["--state-dir", str(state), "--tls-dir",
                                             str(work / "ca/imageserver")],
                        "imageserver", free_port(),
                        Security.from_options(str(work / "ca/admin"), False),
                        work / "imageserver.log", state_dir=state)
        servers.append(daemon.start())
        env["DOMINATOR_IMAGESERVER"] = daemon.address

    try:
        fresh = timed(add_image, reset=new_server)
        report.add("image add, fresh server", fresh, "tar|sha256sum", peer_hash, 2.0)
        again = timed(add_image)
        report.add("image add, same tree again", again, "fresh image add", fresh, 0.3)
        tarball = work / "tree.tar"
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-cpf", str(tarball), "-C",
                        str(tree), "."], check=True)
        dest = work / "dest"
        peer_x = timed(shell(f"tar --xattrs --xattrs-include='*' -xpf {tarball} -C {dest}"),
                       reset=fresh_dir(dest))
        get = timed(lambda: dominator(env, "image", "get", added[-1], str(dest)),
                    reset=lambda: shutil.rmtree(dest, ignore_errors=True))
        report.add("image get", get, "tar -x", peer_x, 1.5)
    finally:
        for daemon in servers:
            daemon.stop()
    return report


def main() -> None:
    """Entry point: `python -m bench.image_bench`."""
    with tempfile.TemporaryDirectory(prefix="bench-image-", dir="/var/tmp") as work:
        run(Path(work)).print()


if __name__ == "__main__":
    main()
