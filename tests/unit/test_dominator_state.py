"""The dominator's state: host pauses and disruption allowances outlive a restart, a
pause with an expiry runs out on its own (in the state file, and shared in a PostgreSQL
MDB when FLEET_TEST_POSTGRES_URL is set), an old state file gains the new columns, and
what a rollout asks of the database stays small: desired states stored at once and then
read from memory, last syncs stored together."""

from __future__ import annotations

import threading
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


def transactions(state: DominatorState) -> list[str]:
    """Every transaction the state's database ends from now on ("commit"/"rollback")."""
    ended: list[str] = []
    for kind in ("commit", "rollback"):
        sa.event.listen(state.database, kind, lambda conn, kind=kind: ended.append(kind))
    return ended


MOTD = {"/etc/motd": (b"\x01" * 32, 5)}


def test_desired_states_are_stored_at_once_and_read_from_memory(tmp_path: Path,
                                                                 shared: str | None) -> None:
    state = DominatorState(tmp_path / "state.sqlite", shared)
    ended = transactions(state)
    state.record_desired("web-1", "v1", MOTD)
    assert ended == ["commit"]  # stored before it returns: the intrusion signal needs it
    other = DominatorState(tmp_path / "state.sqlite", shared)  # a restart after a crash
    read = transactions(other)
    assert other.desired_images("web-1") == ["v1"]
    assert other.desired_computed("web-1") == {"/etc/motd": {b"\x01" * 32: 5}}
    assert read == ["commit"]  # one read of both tables, ended by a COMMIT
    other.close()

    assert state.desired_images("web-1") == ["v1"]
    assert ended == ["commit"]  # read with the write, in its transaction
    time.sleep(1.1)  # a later second: v2 is the most recent
    state.record_desired("web-1", "v2", {"/etc/motd": (b"\x02" * 32, 6)})
    for _ in range(3):
        assert state.desired_images("web-1") == ["v2", "v1"]
        assert state.desired_computed("web-1") == {
            "/etc/motd": {b"\x01" * 32: 5, b"\x02" * 32: 6}}
    assert ended == ["commit"] * 2  # the writes, and no read: memory holds the history
    state.close()


def test_a_host_supervised_anew_reads_what_others_asked_of_it(tmp_path: Path,
                                                               shared: str | None) -> None:
    state = DominatorState(tmp_path / "state.sqlite", shared)
    assert state.desired_images("web-1") == []
    peer = DominatorState(tmp_path / "state.sqlite", shared)  # another dominator
    peer.record_desired("web-1", "v1", MOTD)
    peer.close()
    assert state.desired_images("web-1") == []  # from memory until the host moves here
    state.forget_desired("web-1")
    assert state.desired_images("web-1") == ["v1"]
    state.close()


def test_hosts_moving_in_read_their_desired_states_together(tmp_path: Path,
                                                             shared: str | None) -> None:
    peer = DominatorState(tmp_path / "state.sqlite", shared)  # asked them first
    for n in range(1200):
        peer.record_desired(f"web-{n}", "v1", MOTD)
    time.sleep(1.1)  # a later second: v2 is the most recent of web-0's
    peer.record_desired("web-0", "v2", {"/etc/motd": (b"\x02" * 32, 6)})
    peer.close()
    state = DominatorState(tmp_path / "state.sqlite", shared)
    ended = transactions(state)
    state.preload_desired([f"web-{n}" for n in range(1200)] + ["new-1"])
    assert len(ended) == 3  # 1,201 hosts in chunks of 500
    assert state.desired_images("web-0") == ["v2", "v1"]
    assert state.desired_computed("web-0") == {"/etc/motd": {b"\x01" * 32: 5,
                                                             b"\x02" * 32: 6}}
    assert state.desired_images("web-1199") == ["v1"]
    assert state.desired_images("new-1") == []
    for n in range(1, 1200):  # what each already holds, as stored: nothing to write
        state.record_desired(f"web-{n}", "v1", MOTD)
    assert len(ended) == 3
    state.record_desired("web-0", "v1", MOTD)  # v1 again after v2: its time is news
    assert len(ended) == 4 and state.desired_images("web-0") == ["v1", "v2"]
    state.record_desired("web-1", "v1", {"/etc/motd": (b"\x03" * 32, 7)})  # a new version
    assert len(ended) == 5
    state.close()


def test_desired_states_recorded_at_once_share_commits(tmp_path: Path,
                                                        shared: str | None) -> None:
    state = DominatorState(tmp_path / "state.sqlite", shared)
    state.preload_desired([f"web-{n}" for n in range(40)])
    ended = transactions(state)
    start = threading.Barrier(40)

    def record(n: int) -> None:
        start.wait()
        state.record_desired(f"web-{n % 39}", "v1", {"/etc/motd": (bytes([n]) * 32, n)})

    threads = [threading.Thread(target=record, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ended) < 40  # callers waiting together are stored together
    assert set(ended) == {"commit"}
    state.close()
    again = DominatorState(tmp_path / "state.sqlite", shared)  # web-0 twice: one row
    assert again.desired_images("web-0") == ["v1"]
    assert again.desired_computed("web-0") == {"/etc/motd": {bytes(32): 0,
                                                             bytes([39]) * 32: 39}}
    assert all(again.desired_images(f"web-{n}") == ["v1"] for n in range(39))
    again.close()


@pytest.mark.timeout(30)
def test_a_due_sync_leaves_its_write_to_the_next_call_when_one_is_in_progress(
        tmp_path: Path, shared: str | None) -> None:
    state = DominatorState(tmp_path / "state.sqlite", shared)
    state.record_desired("web-0", "v1", {})
    state.record_sync("web-0", "v1", {})
    time.sleep(1.1)  # its sync is due now
    with state._write_lock:  # another thread is storing (a non-reentrant lock: it waited)
        state.record_sync("web-0", "v1", {})  # returns without waiting
    assert state.host("web-0").current_image == "v1"  # memory: at once
    state.record_sync("web-0", "v1", {})  # the next call stores it
    state.close()
    again = DominatorState(tmp_path / "state.sqlite", shared)
    assert again.host("web-0").last_sync_unix > 0
    again.close()


def test_last_syncs_share_one_transaction_and_survive_a_restart(tmp_path: Path,
                                                                 shared: str | None) -> None:
    state = DominatorState(tmp_path / "state.sqlite", shared)
    for n in range(20):
        state.record_desired(f"web-{n}", "v1", {})
    ended = transactions(state)
    for n in range(20):
        state.record_sync(f"web-{n}", "v1", {})
        assert state.host(f"web-{n}").current_image == "v1"  # memory: at once
    assert len(ended) <= 1  # due syncs wait SYNC_BATCH_SECONDS for the others
    time.sleep(1.1)
    state.record_sync("web-0", "v2", {})  # stores v2's desired state and every due sync
    assert len(ended) <= 3
    state.close()  # stores what is still due
    again = DominatorState(tmp_path / "state.sqlite", shared)
    assert [again.host(f"web-{n}").current_image for n in range(20)] == ["v2"] + ["v1"] * 19
    assert again.host("web-5").last_sync_unix > 0
    again.close()
