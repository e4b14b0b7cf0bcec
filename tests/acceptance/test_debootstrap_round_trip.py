"""Acceptance: a real Debian root filesystem survives `image add` + `image get`
exactly (rsync -naHAXOJ --checksum sees no difference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleetlib.testing.daemons import cli
from fleetlib.testing.debootstrap import debootstrap_tree
from fleetlib.testing.trees import rsync_differences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minbase() -> Path:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt-get install rsync)")
    try:
        return debootstrap_tree("minbase")
    except RuntimeError as err:
        pytest.skip(f"no debootstrap tree: {err}")


def test_minbase_round_trip_is_exact(minbase: Path, tmp_path: Path,
                                     cli_env: dict[str, str]) -> None:
    cli("image", "add", "debian/minbase", str(minbase), env=cli_env, check=True)
    dest = tmp_path / "unpacked"
    cli("image", "get", "debian/minbase", str(dest), env=cli_env, check=True)
    assert rsync_differences(minbase, dest) == ""
