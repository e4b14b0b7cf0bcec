"""Acceptance on real Debian trees: a host holding minbase (image A) is pushed to
minbase plus nginx-light, curl, python3-minimal and openssh-server (image B)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fleetlib.fstree.exclusions import DEFAULT_EXCLUSIONS
from fleetlib.testing.daemons import Daemon, cli
from fleetlib.testing.debootstrap import debootstrap_tree
from fleetlib.testing.trees import rsync_differences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trees() -> tuple[Path, Path]:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt-get install rsync)")
    try:
        return debootstrap_tree("minbase"), debootstrap_tree("minbase-nginx")
    except RuntimeError as err:
        pytest.skip(f"no debootstrap tree: {err}")


def rsync_excludes() -> list[str]:
    """The sub's default scan exclusions as rsync patterns: they count as filtered."""
    return [pattern.replace(".*", "*") for pattern in DEFAULT_EXCLUSIONS]


def test_push_minbase_to_nginx_image(trees: tuple[Path, Path], tmp_path: Path,
                                     cli_env: dict[str, str], trigger_log: Path,
                                     start_subd: Callable[..., Daemon]) -> None:
    image_a, image_b = trees
    (tmp_path / "triggers.json").write_text(json.dumps([
        {"MatchLines": ["/etc/nginx/.*", "/usr/sbin/nginx"], "Service": "nginx"},
        {"MatchLines": ["/etc/debian_version"], "Service": "untouched"}]))
    cli("image", "add", "debian/b", str(image_b), "--triggers", str(tmp_path / "triggers.json"),
        env=cli_env, check=True)
    root = tmp_path / "host"
    subprocess.run(["cp", "-a", str(image_a), str(root)], check=True)
    sub = start_subd(root)  # default scan exclusions
    pushed = cli("sub", "push-image", sub.address, "debian/b", "--json", env=cli_env)
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    assert report["success"] and report["change_window_ms"] > 0
    assert rsync_differences(image_b, root, "/.subd", *rsync_excludes()) == ""
    log = trigger_log.read_text().splitlines()
    assert "stop nginx" in log and "start nginx" in log
    assert not any("untouched" in line for line in log)
