"""Issue 13's figures, each against its peer in the same run, on two trees with a warm
page cache: the debootstrap minbase tree (a real root filesystem: 6,800 inodes, 200 MB,
large and small files, hard links, devices, xattrs) and a generated tree of 120,000
small files (400 directories of 300 files of 300-500 bytes; per-file costs dominate).

- fresh `image add` vs `tar -cf - DIR | sha256sum` (goal 2.0x);
- `image add` of the same tree again vs the fresh add (goal 0.2x);
- `image get` vs `tar -xpf` (with xattrs) of a tarball of the tree (goal 1.5x).

Ours and the peer run in turns (`paired`), medians of `--runs`. Every figure is a whole
CLI run, start-up included, against a real image server over TLS.

`python -m bench.image_bench [--trees minbase,files] [--runs 3] [--json]`
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from bench.timing import RESULTS, Report, fresh_dir, paired, shell
from fleetlib.rpc.certs import init_ca
from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import PROJECT, Daemon, free_port
from fleetlib.testing.debootstrap import CACHE, debootstrap_tree

TREES = ("minbase", "files")
FILES_DIRS, FILES_PER_DIR = 400, 300


def files_tree() -> Path:
    """The generated small-file tree, built once (by rename, so whole) in the test cache:
    distinct content per file, half of it compressible (hex of random bytes)."""
    target = CACHE / f"bench-files-{FILES_DIRS}x{FILES_PER_DIR}"
    if target.is_dir():
        return target
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    rng = random.Random(13)
    for d in range(FILES_DIRS):
        folder = building / f"d{d:03}"
        folder.mkdir(parents=True)
        for f in range(FILES_PER_DIR):
            (folder / f"f{f:03}.conf").write_bytes(rng.randbytes(rng.randint(150, 250)).hex()
                                                   .encode())
    building.rename(target)
    return target


def tree_of(name: str) -> Path:
    """The tree a name in --trees stands for."""
    return debootstrap_tree("minbase") if name == "minbase" else files_tree()


class Bench:
    """Image servers (a fresh one per fresh add) and the CLI, in one scratch folder."""

    def __init__(self, work: Path) -> None:
        self.work = work
        init_ca(work / "ca")
        self.env = {**os.environ, "DOMINATOR_TLS_DIR": str(work / "ca/admin")}
        self.server: Daemon | None = None
        self.count = 0
        self.last = ""

    def dominator(self, *args: str) -> None:
        """Run one CLI command as a user would."""
        subprocess.run([sys.executable, "-m", "dominator.cli", *args], check=True, cwd=PROJECT,
                       env=self.env, stdout=subprocess.DEVNULL)

    def new_server(self) -> None:
        """Stop the current image server and start an empty one."""
        self.stop()
        state = self.work / f"state{self.count}"
        self.server = Daemon("imageserver.main", ["--state-dir", str(state), "--tls-dir",
                                                  str(self.work / "ca/imageserver")],
                             "imageserver", free_port(),
                             Security.from_options(str(self.work / "ca/admin"), False),
                             self.work / "imageserver.log", state_dir=state).start()
        self.env["DOMINATOR_IMAGESERVER"] = self.server.address

    def stop(self) -> None:
        """Stop the image server. Its state stays until the end: removing 120,000 files
        takes minutes on this disk (it discards every freed block), and its I/O would
        fall on the next measurement."""
        if self.server is not None:
            self.server.stop()
            self.count += 1
            self.server = None

    def add(self, tree: Path) -> Callable[[], None]:
        """An action adding `tree` under a new name."""
        def action() -> None:
            self.last = f"img{self.count}-{os.urandom(3).hex()}"
            self.dominator("image", "add", self.last, str(tree))
        return action


def measure(bench: Bench, report: Report, name: str, tree: Path, runs: int) -> None:
    """The three rows of one tree."""
    subprocess.run(["tar", "-cf", "-", "-C", str(tree), "."], check=True,
                   stdout=subprocess.DEVNULL)  # warm the page cache
    fresh, peer_hash = paired(bench.add(tree), shell(f"tar -cf - -C {tree} . | sha256sum"),
                              runs, reset_ours=bench.new_server)
    report.add(f"{name}: image add, fresh server", fresh, "tar|sha256sum", peer_hash, 2.0)
    again, fresh_again = paired(bench.add(tree), bench.add(tree), runs,
                                reset_peer=bench.new_server)
    report.add(f"{name}: image add, same tree again", again, "fresh image add", fresh_again,
               0.2)
    tarball = bench.work / "tree.tar"
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-cpf", str(tarball), "-C",
                    str(tree), "."], check=True)
    dest = bench.work / "dest"
    get, peer_x = paired(
        lambda: bench.dominator("image", "get", bench.last, str(dest)),
        shell(f"tar --xattrs --xattrs-include='*' -xpf {tarball} -C {dest}"), runs,
        reset_ours=lambda: shutil.rmtree(dest, ignore_errors=True), reset_peer=fresh_dir(dest))
    report.add(f"{name}: image get", get, "tar -x", peer_x, 1.5)
    shutil.rmtree(dest, ignore_errors=True)
    tarball.unlink()


@click.command()
@click.option("--trees", default=",".join(TREES), show_default=True,
              help="Which trees, comma-separated: minbase (debootstrap), files (120,000 "
                   "small files).")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 9),
              help="Runs of ours and of the peer, in turns; medians are shown.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--work-dir", default="/var/tmp", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the scratch folder (servers' state, unpacked trees) goes.")
def main(trees: str, runs: int, as_json: bool, work_dir: Path) -> None:
    """image add and image get against tar and sha256sum."""
    names = [t.strip() for t in trees.split(",") if t.strip()]
    if unknown := set(names) - set(TREES):
        raise click.BadParameter(f"unknown tree(s) {', '.join(sorted(unknown))}",
                                 param_hint="--trees")
    report = Report("image")
    with tempfile.TemporaryDirectory(prefix="bench-image-", dir=work_dir) as work:
        bench = Bench(Path(work))
        try:
            for name in names:
                measure(bench, report, name, tree_of(name), runs)
        finally:
            bench.stop()
        show(report, as_json)  # before the scratch folder goes: that takes minutes


def show(report: Report, as_json: bool) -> None:
    """The table (or JSON) on stdout with the load average; JSON in bench/results/."""
    load = os.getloadavg()
    if as_json:
        RESULTS.mkdir(exist_ok=True)
        figures = json.dumps({"rows": report.rows, "load": load}, indent=2)
        (RESULTS / f"{report.name}.json").write_text(figures)
        click.echo(figures)
    else:
        report.print()
        click.echo(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
