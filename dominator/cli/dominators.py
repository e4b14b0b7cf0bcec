"""`dominator fleet dominators`: the live dominators sharing one MDB, as any of them
reads them from the shared database."""

from __future__ import annotations

from typing import Any

import click

from dominator.cli.options import dominator_option, json_option
from dominator.client import DominatorClient
from fleetlib.cli.display import echo_json, echo_table
from fleetlib.cli.options import security_options
from fleetlib.rpc.tls import Security
from fleetlib.wire import dominator_pb2


def seconds(value: float) -> str:
    """An age for people: '4.2 s', '3 min', '2.0 h'."""
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def dominator_json(info: dominator_pb2.DominatorInfo) -> dict[str, Any]:
    """One dominator as plain data."""
    return {"name": info.name, "address": info.address, "shards": info.shards,
            "lease_age_seconds": None if info.lease_age_seconds < 0 else info.lease_age_seconds,
            "renewal_age_seconds": info.renewal_age_seconds, "started_unix": info.started_unix,
            "last_renewal_unix": info.last_renewal_unix, "answering": info.answering}


@click.command(name="dominators")
@json_option
@dominator_option
@security_options
def dominators_command(as_json: bool, dominator: str, security: Security) -> None:
    """The live dominators on this one's MDB: shards held, lease age, last renewal."""
    with DominatorClient(dominator, security) as client:
        reply = client.dominators()
    if as_json:
        echo_json({"shards": reply.shards, "lease_seconds": reply.lease_seconds,
                   "dominators": [dominator_json(info) for info in reply.dominators]})
        return
    echo_table(["name", "address", "shards", "lease age", "last renewal"],
               [[info.name + (" (this one)" if info.answering else ""), info.address,
                 f"{info.shards}/{reply.shards}",
                 "-" if info.lease_age_seconds < 0 else seconds(info.lease_age_seconds),
                 f"{seconds(info.renewal_age_seconds)} ago"] for info in reply.dominators])
