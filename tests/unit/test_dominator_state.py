"""The dominator's state: host pauses and disruption allowances outlive a restart, a
pause with an expiry runs out on its own (in the state file, and shared in a PostgreSQL
MDB when FLEET_TEST_POSTGRES_URL is set), and an old state file gains the new columns."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from dominator.herd.state import DominatorState
from tests import old_runner


@pytest.fixture(params=["file", "postgresql"])
def shared(request: pytest.FixtureRequest) -> str | None:
    """Where the state is kept: the state file (None), or a fresh PostgreSQL database."""
    return None if request.param == "file" else str(request.getfixturevalue("postgres_url"))


def test_pause_and_disruption_allowance_survive_a_restart(tmp_path: Path,
                                                          shared: str | None) -> None:
    state = DominatorState(tmp_path / "state.sqlite", shared)
    state.pause_host("web-1", "alice", "kernel bug", 0)
    state.allow_disruption("web-2")
    state.close()

    again = DominatorState(tmp_path / "state.sqlite", shared)
    paused = again.host_paused("web-1")
    assert paused is not None and (paused.by, paused.reason) == ("alice", "kernel bug")
    assert again.host_paused("web-2") is None
    assert again.disruption_allowed("web-2") and not again.disruption_allowed("web-1")

    again.consume_disruption("web-2")
    again.resume_host("web-1")
    again.close()
    third = DominatorState(tmp_path / "state.sqlite", shared)
    assert third.host_paused("web-1") is None and not third.disruption_allowed("web-2")
    third.close()


def test_pauses_with_an_expiry_run_out(tmp_path: Path, shared: str | None) -> None:
    state = DominatorState(tmp_path / "state.sqlite", shared)
    state.pause_host("web-1", "alice", "short", int(time.time()) - 1)
    state.pause_host("web-2", "alice", "long", int(time.time()) + 3600)
    assert state.host_paused("web-1") is None
    assert state.host_paused("web-2") is not None
    state.disable_updates("bob", "window", int(time.time()) - 1)
    assert state.updates_disabled() is None
    state.disable_updates("bob", "forever")
    assert state.updates_disabled() is not None
    state.close()


def test_a_version_2_state_file_keeps_its_hosts(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}")
    old_runner.migrate(engine, old_runner.STATE)  # the release before host switches
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO hosts (hostname, safety_cleared) VALUES ('a', 1)"))
    engine.dispose()
    state = DominatorState(path)
    assert state.safety_cleared("a") and state.host_paused("a") is None
    assert not state.disruption_allowed("a")
