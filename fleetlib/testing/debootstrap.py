"""Real Debian root filesystems for tests and benchmarks, built once and cached.

`minbase` is `debootstrap --variant=minbase bookworm`; `minbase-nginx` adds
nginx-light, curl, python3-minimal and openssh-server. The cache lives in
$FLEET_TREE_CACHE (default /var/cache/fleet-tests); `.ci/run` builds both
before the tests. Where debootstrap is missing or cannot reach the Debian
archive, tests that need a tree skip with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("FLEET_TREE_CACHE", "/var/cache/fleet-tests"))
SUITE = "bookworm"
VARIANTS = {
    "minbase": [],
    "minbase-nginx": ["--include=nginx-light,curl,python3-minimal,openssh-server"],
}


def debootstrap_tree(variant: str) -> Path:
    """The cached tree, building it if needed; RuntimeError says why it cannot be had.
    Safe to call from several processes at once (pytest-xdist workers, a benchmark): one
    builds under a lock file while the others wait, and the tree appears whole, by rename."""
    target = CACHE / variant
    if target.is_dir():
        return target
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{variant}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not target.is_dir():  # another process built it while this one waited
            _build(variant, target)
    return target


def _build(variant: str, target: Path) -> None:
    """debootstrap into a scratch folder, then rename it to `target` (holding the lock)."""
    building = CACHE / f"{variant}.building"
    shutil.rmtree(building, ignore_errors=True)  # a build that died half-way
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", *VARIANTS[variant], SUITE, str(building)],
        capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"debootstrap failed: {last[0]}")
    building.rename(target)


if __name__ == "__main__":
    for name in VARIANTS:
        print(debootstrap_tree(name))
