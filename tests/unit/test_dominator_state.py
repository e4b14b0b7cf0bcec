"""The dominator's state file: host pauses and disruption allowances outlive a restart,
a pause with an expiry runs out on its own, and an old state file gains the new columns."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from dominator.herd.state import DominatorState
from tests import old_runner


def test_pause_and_disruption_allowance_survive_a_restart(tmp_path: Path) -> None:
    state = DominatorState(tmp_path / "state.sqlite")
    state.pause_host("web-1", "alice", "kernel bug", 0)
    state.allow_disruption("web-2")
    state.engine.dispose()

    again = DominatorState(tmp_path / "state.sqlite")
    paused = again.host_paused("web-1")
    assert paused is not None and (paused.by, paused.reason) == ("alice", "kernel bug")
    assert again.host_paused("web-2") is None
    assert again.disruption_allowed("web-2") and not again.disruption_allowed("web-1")

    again.consume_disruption("web-2")
    again.resume_host("web-1")
    again.engine.dispose()
    third = DominatorState(tmp_path / "state.sqlite")
    assert third.host_paused("web-1") is None and not third.disruption_allowed("web-2")


def test_pauses_with_an_expiry_run_out(tmp_path: Path) -> None:
    state = DominatorState(tmp_path / "state.sqlite")
    state.pause_host("web-1", "alice", "short", int(time.time()) - 1)
    state.pause_host("web-2", "alice", "long", int(time.time()) + 3600)
    assert state.host_paused("web-1") is None
    assert state.host_paused("web-2") is not None
    state.disable_updates("bob", "window", int(time.time()) - 1)
    assert state.updates_disabled() is None
    state.disable_updates("bob", "forever")
    assert state.updates_disabled() is not None


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
