"""`dominator image replicas`: the master and every image server replicating from it,
directly or through another replica (the tree ImageServer.ListReplicas reports, walked
as the dominator walks it to rank them: dominator/herd/replicas.py)."""

from __future__ import annotations

import click
import grpc

from dominator.cli.options import imageserver_option, json_option
from dominator.herd.replicas import ReplicaTree, not_replication_aware, unaware_error, walk_servers
from fleetlib.cli.display import ago, echo_json, echo_table, format_bytes
from fleetlib.cli.options import security_options
from fleetlib.rpc.tls import Security


def tree_json(tree: ReplicaTree) -> dict[str, object]:
    """The walk for --json: `servers` (the master first) and `unreachable` (replicas
    listed whose own replicas could not be asked, with why)."""
    return {"servers": [row.to_json() for row in tree.rows],
            "unreachable": [{"address": address, "error": error}
                            for address, error in sorted(tree.unreachable.items())]}


@click.command(name="replicas")
@json_option
@imageserver_option
@security_options
def replicas_command(as_json: bool, imageserver: str, security: Security) -> None:
    """List the image server (the master) and every replica of it, replicas of replicas
    too: where each stands, what it follows, how far behind it is (events and bytes it
    still lacks), bytes it replicated, its state (syncing, in sync, diverged, alarm,
    disconnected) and when its upstream last heard from it."""
    try:
        tree = walk_servers(imageserver, security)
    except grpc.RpcError as err:
        if not_replication_aware(err):
            raise unaware_error(imageserver) from None
        raise
    if as_json:
        echo_json(tree_json(tree))
        return
    echo_table(["address", "location", "upstream", "state", "lag", "pending", "replicated",
                "last seen"],
               [[row.address, row.location, row.upstream, row.state,
                 "" if row.is_root else row.lag_events,
                 "" if row.is_root else format_bytes(row.bytes_pending),
                 "" if row.is_root else format_bytes(row.bytes_replicated),
                 "" if row.is_root else ago(row.last_seen_unix)] for row in tree.rows])
    for address, error in sorted(tree.unreachable.items()):
        click.echo(f"note: cannot list the replicas of {address}: {error}", err=True)
