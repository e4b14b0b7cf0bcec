"""One shard lease manager in its own process, for the lease tests:
`python -m tests.integration.leaserunner URL NAME [--lease S] [--shards N] [--tick S]`.

It runs `LeaseManager.run` until SIGTERM (then gives its shards back) and writes JSON
lines to stdout: one per renewal round (`"event": "renewal"`) and every `--tick`
seconds what `may_mutate` allows (`"event": "tick"`, `"mutable"`: shard -> token),
each stamped with `time.monotonic()`, which on Linux every process shares. Its
database sessions carry NAME as application_name, so a test can find and end them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

from sqlalchemy.engine import make_url

from dominator.herd.leases import DEFAULT_SHARDS, LeaseManager, Renewal
from fleetlib.sql.engine import open_engine


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed (the test reads it while this runs), stamped
    now unless `fields` has its own "t"."""
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def report(manager: LeaseManager, renewal: Renewal | None) -> None:
    """A renewal round's outcome, or the manager's status when it failed."""
    if renewal is None:
        status = manager.status()
        emit("renewal", ok=False, state=status.state, reason=status.reason)
        return
    emit("renewal", ok=True, id=manager.status().dominator_id, began=renewal.began,
         live=renewal.live,
         share=renewal.share, held=renewal.held, taken=renewal.taken,
         released=renewal.released, lost=renewal.lost, mutable_before=renewal.mutable_before)


async def tick(manager: LeaseManager, stop: asyncio.Event, every: float) -> None:
    """What may be mutated, every `every` seconds until `stop`. Stamped before asking:
    were this process stopped in between, the answer would come after the stamp."""
    while not stop.is_set():
        stamp = time.monotonic()
        status = manager.status()
        emit("tick", t=stamp, mutable=manager.mutable(), state=status.state,
             reason=status.reason)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def serve(manager: LeaseManager, every: float) -> None:
    """Run the manager and the ticker until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    emit("started", name=manager.name)
    ticker = asyncio.create_task(tick(manager, stop, every))
    await manager.run(stop, lambda renewal: report(manager, renewal))
    await ticker
    emit("stopped", state=manager.status().state)


def main() -> None:
    """Parse the arguments, open the database, run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS)
    parser.add_argument("--tick", type=float, default=0.1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    url = make_url(args.url)
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"application_name": args.name})
    engine = open_engine(url.render_as_string(hide_password=False))
    manager = LeaseManager(engine, args.name, lease_seconds=args.lease, shards=args.shards)
    try:
        asyncio.run(serve(manager, args.tick))
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
