"""Watching the shard lease table of several dominators for a whole test.

`LeaseSampler(url)` reads the table every 100 ms in a thread (riding out a database
that goes away) and checks, sample against sample, that there is one row per shard
once the first dominator made them, that tokens never go down and that a new owner
always comes with a new token. Sampling can miss a change between two samples, so
it also puts a trigger on the table that records every change of owner as the
database makes it: at `stop`, no shard was ever granted while another dominator's
lease on it was unexpired by the database clock (expired or given back first), and
every grant has a higher token than the one before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from fleetlib.sql.engine import open_engine
from fleetlib.testing.fleet import wait_for

log = logging.getLogger(__name__)

SHARDS = 256
SAMPLE_EVERY = 0.1

Rows = dict[int, tuple[int | None, int, bool]]  # shard -> (owner id, token, unexpired)

# The record of every change of a shard's owner or token, written by the database.
HISTORY = """
CREATE TABLE IF NOT EXISTS test_lease_history (
    id bigserial PRIMARY KEY, shard integer NOT NULL, at timestamptz NOT NULL,
    old_owner integer, old_token bigint, old_expires timestamptz,
    new_owner integer, new_token bigint, new_granted timestamptz);
CREATE OR REPLACE FUNCTION test_lease_history() RETURNS trigger AS $$
BEGIN
    IF NEW.owner IS DISTINCT FROM OLD.owner OR NEW.token IS DISTINCT FROM OLD.token THEN
        INSERT INTO test_lease_history (shard, at, old_owner, old_token, old_expires,
                                        new_owner, new_token, new_granted)
        VALUES (NEW.shard, now(), OLD.owner, OLD.token, OLD.expires_at,
                NEW.owner, NEW.token, NEW.granted);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS test_lease_history ON shard_leases;
CREATE TRIGGER test_lease_history AFTER UPDATE ON shard_leases
    FOR EACH ROW EXECUTE FUNCTION test_lease_history();
"""


def read_rows(connection: sa.Connection) -> Rows:
    """shard -> (owner, token, unexpired) as the database sees it now."""
    return {int(shard): (owner, int(token), bool(live)) for shard, owner, token, live in
            connection.execute(sa.text(
                "SELECT shard, owner, token, coalesce(expires_at > now(), false) "
                "FROM shard_leases"))}


def double_grants(connection: sa.Connection) -> list[str]:
    """From the history trigger: grants made while another owner's lease on the
    shard was unexpired (by the database clock), and grants whose token did not grow."""
    found = []
    for row in connection.execute(sa.text(
            "SELECT shard, at, old_owner, old_token, old_expires, new_owner, new_token, "
            "new_granted FROM test_lease_history WHERE new_owner IS NOT NULL "
            "AND new_token IS DISTINCT FROM old_token ORDER BY id")):
        if row.new_token <= row.old_token:
            found.append(f"shard {row.shard}: granted to {row.new_owner} with token "
                         f"{row.new_token} after {row.old_token}")
        if row.old_owner is not None and row.old_expires is not None \
                and row.old_expires > row.new_granted:
            found.append(f"shard {row.shard}: granted to {row.new_owner} at {row.new_granted} "
                         f"while {row.old_owner}'s lease ran until {row.old_expires}")
    return found


@dataclass
class LeaseSampler:
    """The lease table of the database at `url` (migrated to the MDB schema before
    `start`), sampled every `every` seconds."""

    url: str
    shards: int = SHARDS
    every: float = SAMPLE_EVERY
    samples: list[tuple[float, Rows]] = field(default_factory=list)  # (monotonic, rows)
    names: dict[int, str] = field(default_factory=dict)  # dominator id -> name, as seen
    errors: list[str] = field(default_factory=list)
    failed_reads: int = 0  # samples the database did not answer (stopped, say)
    stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> LeaseSampler:
        """Put the history trigger on the table and start sampling."""
        engine = open_engine(self.url)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql(HISTORY)
        finally:
            engine.dispose()
        self.thread = threading.Thread(target=self._sample, name="lease sampler", daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        engine = open_engine(self.url)
        previous: Rows = {}
        try:
            while not self.stopped.is_set():
                try:
                    with engine.connect() as connection:
                        current = read_rows(connection)
                        self.names.update({int(id_): name for id_, name in connection.execute(
                            sa.text("SELECT id, name FROM dominators"))})
                except SQLAlchemyError as err:
                    self.failed_reads += 1
                    log.debug("lease sample failed: %s", err)
                    self.stopped.wait(self.every)
                    continue
                self._check(previous, current)
                self.samples.append((time.monotonic(), current))
                previous = current
                self.stopped.wait(self.every)
        finally:
            engine.dispose()

    def _check(self, previous: Rows, current: Rows) -> None:
        if (current or previous) and set(current) != set(range(self.shards)):
            self.errors.append(f"{len(current)} rows for {self.shards} shards")
        for shard, (owner, token, _) in current.items():
            if shard not in previous:
                continue
            old_owner, old_token, _ = previous[shard]
            if token < old_token:
                self.errors.append(f"shard {shard}: token {old_token} -> {token}")
            if owner is not None and owner != old_owner and token == old_token:
                self.errors.append(f"shard {shard}: owner {old_owner} -> {owner} "
                                   f"with the same token {token}")

    def latest(self) -> Rows:
        """A sample taken after this call."""
        count = len(self.samples)
        wait_for(lambda: len(self.samples) > count, "a fresh lease sample", 10)
        return self.samples[-1][1]

    def owners(self) -> dict[int, set[int]]:
        """dominator id -> the shards it holds unexpired, in a fresh sample."""
        owners: dict[int, set[int]] = {}
        for shard, (owner, _, live) in self.latest().items():
            if owner is not None and live:
                owners.setdefault(owner, set()).add(shard)
        return owners

    def shares(self) -> dict[str, int]:
        """dominator name -> how many shards it holds unexpired, in a fresh sample."""
        return {self.names.get(owner, str(owner)): len(shards)
                for owner, shards in self.owners().items()}

    def all_owned_at(self, since: float, timeout: float) -> float:
        """The monotonic time of the first sample after `since` in which every shard
        had an unexpired owner (waiting up to `timeout` for one)."""
        def first() -> float | None:
            return next((at for at, rows in list(self.samples) if at > since and rows and
                         all(owner is not None and live for owner, _, live in rows.values())),
                        None)
        return wait_for(first, "every shard owned", timeout)

    def owned_by(self, names: Sequence[str]) -> dict[str, int] | None:
        """The shares when the dominators `names` hold every shard between them, none
        beyond its fair share; else None."""
        held = self.shares()
        fair = -(-self.shards // len(names))
        if sorted(held) == sorted(names) and sum(held.values()) == self.shards \
                and max(held.values()) <= fair:
            return held
        return None

    def stop(self) -> None:
        """Stop sampling and check the record: AssertionError on a violation."""
        self.stopped.set()
        self.thread.join(10)
        assert self.samples, "the sampler never read the table"
        engine = open_engine(self.url)
        try:
            with engine.connect() as connection:
                doubles = double_grants(connection)
        finally:
            engine.dispose()
        assert self.errors == [] and doubles == [], [*self.errors, *doubles]
