"""Fixtures the multi-dominator tests share (the others are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dominator.herd.state import DominatorState, shared_url
from fleetlib.testing.daemons import Daemon
from fleetlib.testing.dominators import Dominators
from mdb.store import Mdb


@pytest.fixture
def two_states(tmp_path: Path, postgres_url: str) -> Iterator[tuple[DominatorState,
                                                                   DominatorState]]:
    """Two dominators' state stores on one PostgreSQL MDB."""
    with Mdb(postgres_url):  # the MDB at head, as `dominator serve` opens it first
        pass
    states = (DominatorState(tmp_path / "a" / "dominator.sqlite", shared_url(postgres_url)),
              DominatorState(tmp_path / "b" / "dominator.sqlite", shared_url(postgres_url)))
    yield states
    for state in states:
        state.close()


@pytest.fixture
def two_dominators(tmp_path: Path, ca: Path, postgres_url: str, imageserver: Daemon
                   ) -> Iterator[Dominators]:
    """dom-a and dom-b on one PostgreSQL MDB with a 3 s lease (not yet started)."""
    started = Dominators(tmp_path, ca, postgres_url, imageserver, ["dom-a", "dom-b"], "3")
    yield started
    started.stop()
