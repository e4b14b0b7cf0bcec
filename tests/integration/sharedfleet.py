"""A fleet on several `dominator serve` sharing one PostgreSQL MDB, as the
multi-dominator tests build it: the shards split between the dominators, hosts
named into each one's shards, and a subd per host with its MDB row."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

import sqlalchemy as sa

from dominator.herd.leases import DEFAULT_SHARDS, shard_of
from fleetlib.testing.daemons import Daemon
from fleetlib.testing.dominators import Dominators
from fleetlib.testing.fleet import wait_for
from mdb.machine import Machine
from mdb.store import Mdb


def held_shards(url: str) -> dict[str, set[int]]:
    """Shards under an unexpired lease, by owner name."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text(
                "SELECT d.name, s.shard FROM shard_leases s JOIN dominators d "
                "ON d.id = s.owner WHERE s.expires_at > now()")).all()
    finally:
        engine.dispose()
    held: dict[str, set[int]] = {}
    for name, shard in rows:
        held.setdefault(name, set()).add(shard)
    return held


def names_in(shards: set[int], count: int, prefix: str) -> list[str]:
    """`count` hostnames whose shard is among `shards`."""
    return list(itertools.islice((f"{prefix}-{i}" for i in itertools.count()
                                  if shard_of(f"{prefix}-{i}") in shards), count))


def start_sharing(doms: Dominators, url: str, per_dominator: int = 2,
                  prefix: Callable[[str], str] = str) -> dict[str, str]:
    """Start `doms` on the MDB at `url` (brought to head first, so they do not race to
    open it), wait until they hold every shard between them, and name `per_dominator`
    hosts in each one's shards (`prefix(name)-N`): host -> the dominator holding it."""
    with Mdb(url):
        pass
    doms.start()

    def shared() -> dict[str, set[int]] | None:
        found = held_shards(url)
        return found if len(found) == len(doms.daemons) and \
            sum(map(len, found.values())) == DEFAULT_SHARDS else None
    held = wait_for(shared, f"the shards shared by {len(doms.daemons)}", 30)
    return {host: name for name, shards in held.items()
            for host in names_in(shards, per_dominator, prefix(name))}


def start_hosts(url: str, folder: Path, start_subd: Callable[[Path], Daemon],
                hosts: Iterable[str], image: str = "v1") -> dict[str, Daemon]:
    """A subd per host (its root in `folder`/HOST) and its MDB row requiring `image`."""
    subs = {}
    with Mdb(url) as mdb:
        for host in hosts:
            (folder / host).mkdir()
            subs[host] = start_subd(folder / host)
            mdb.set(Machine(host, address=subs[host].address, required_image=image))
    return subs
