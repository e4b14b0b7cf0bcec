"""The herd's watch decisions (dominator/herd/watch.py) and subd's stream rules
(subd/watch.py), as pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from dominator.herd.status import Status
from dominator.herd.watch import (
    SETTLED,
    Reason,
    WatchConfig,
    cycle_delay,
    first_cycle_delay,
    wants_poll,
)
from fleetlib.wire import subd_pb2
from subd.watch import DEFAULT_HEARTBEAT_SECONDS, changed_since, heartbeat_seconds

CONFIG = WatchConfig(backstop_interval=300)


def event(**fields: Any) -> subd_pb2.WatchEvent:
    return subd_pb2.WatchEvent(**{"generation": 7, **fields})


def test_an_event_for_the_generation_held_asks_for_nothing() -> None:
    assert not wants_poll(event(), 7, Status.SYNCED, None)
    assert not wants_poll(event(heartbeat=True, scan_count=99), 7, Status.SYNCED, event())


@pytest.mark.parametrize("fields", [
    {"generation": 8},                     # the host changed
    {"fetch_in_progress": True},           # someone works on it
    {"update_in_progress": True},
    {"scan_error": "permission denied"},   # its scans started failing
])
def test_a_change_or_work_in_flight_asks_for_a_poll(fields: dict[str, Any]) -> None:
    assert wants_poll(event(**fields), 7, Status.SYNCED, None)


def test_an_update_that_ended_since_the_last_event_asks_for_a_poll() -> None:
    before = event(last_update_finished_unix=100)
    assert wants_poll(event(last_update_finished_unix=200), 7, Status.SYNCED, before)
    assert not wants_poll(event(last_update_finished_unix=100), 7, Status.SYNCED, before)


def test_a_failing_host_already_known_to_fail_is_not_polled_for_it_again() -> None:
    assert not wants_poll(event(scan_error="gone"), 7, Status.SCAN_FAILED, None)


def test_only_a_settled_watched_host_waits_for_the_backstop() -> None:
    for status in Status:
        delay, reason = cycle_delay(status, True, 5.0, CONFIG)
        if status in SETTLED:
            assert (delay, reason) == (300, Reason.BACKSTOP)
        else:
            assert (delay, reason) == (5.0, Reason.BUSY), status
        assert cycle_delay(status, False, 5.0, CONFIG) == (5.0, Reason.FALLBACK)


def test_first_cycles_spread_over_their_spread_within_a_poll_interval() -> None:
    spread = [first_cycle_delay(5.0, 0.5) for _ in range(2000)]
    assert max(spread) <= 0.5 and max(spread) > 0.4  # a thousand hosts moving in: 1 s
    assert max(first_cycle_delay(5.0, 60.0) for _ in range(2000)) <= 5.0
    assert max(first_cycle_delay(5.0, None) for _ in range(2000)) > 4.0


def test_heartbeat_intervals_are_bounded() -> None:
    assert heartbeat_seconds(0) == DEFAULT_HEARTBEAT_SECONDS
    assert heartbeat_seconds(1) == 1
    assert heartbeat_seconds(10**6) == 600


def test_subd_sends_what_changed_not_each_scan() -> None:
    sent = event(scan_count=1, last_scan_unix=10)
    assert not changed_since(sent, event(scan_count=2, last_scan_unix=11))
    assert changed_since(sent, event(generation=8))
    assert changed_since(sent, event(update_in_progress=True))
    assert changed_since(sent, event(scan_error="x"))
