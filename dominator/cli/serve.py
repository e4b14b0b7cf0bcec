"""`dominator serve`: run the central daemon (dominator/server/daemon.py)."""

from __future__ import annotations

from pathlib import Path

import click

from dominator.cli.options import imageservers_option
from dominator.deploy.errors import DeployError
from dominator.deploy.health import NamedChecks
from dominator.herd.fetchslots import DEFAULT_BYTES, DEFAULT_FETCHES
from dominator.herd.herd import HerdConfig
from dominator.herd.leases import DEFAULT_LEASE_SECONDS, DEFAULT_SHARDS, MAX_SHARDS
from dominator.herd.watch import WatchConfig
from dominator.server.daemon import DEFAULT_HTTP_PORT, DEFAULT_PORT, DaemonConfig, api_token, run
from fleetlib.cli.options import security_options
from fleetlib.cli.run import setup_logging
from fleetlib.rpc.tls import Security
from fleetlib.signing import load_trusted_keys
from subd.client import DEFAULT_MAX_TREE_BYTES
from subd.fence import MAX_OWNER


def named_checks(specs: tuple[str, ...]) -> NamedChecks:
    """--health-check NAME=COMMAND..., parsed (a usage error says what is wrong)."""
    try:
        return NamedChecks.parse(specs)
    except DeployError as err:
        raise click.BadParameter(str(err), param_hint="--health-check") from None


def dominator_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """--name: printable, at most subd's limit for a fence's owner ("" for the default)."""
    if value is None:
        return ""
    if not value.strip() or not value.isprintable() or len(value) > MAX_OWNER:
        raise click.BadParameter(f"a dominator's name is 1 to {MAX_OWNER} printable "
                                 f"characters, not {value!r}", ctx, param)
    return value


@click.command(name="serve")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the dominator's own state (created if missing).")
@click.option("--mdb-url", envvar="DOMINATOR_MDB_URL", show_envvar=True,
              help="SQLAlchemy URL of the machine database (default: SQLite in the state dir; "
                   "postgresql+psycopg://... for large fleets).")
@imageservers_option
@click.option("--generators", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of computed-file generators (jinja2 templates or programs).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port of the admin API.")
@click.option("--http-port", default=DEFAULT_HTTP_PORT, show_default=True,
              type=click.IntRange(0, 65535),
              help="Port of the deploy stage API, the dashboard and /metrics.")
@click.option("--token", envvar="DOMINATOR_TOKEN", show_envvar=True,
              help="Bearer token of the HTTP API (default: made once, kept in the state dir).")
@click.option("--host", default="[::]", show_default=True, help="Address to listen on.")
@click.option("--poll-interval", default=5.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between two convergence cycles of one sub that is not settled, "
                   "or cannot be watched (an older subd).")
@click.option("--backstop-interval", default=300.0, show_default=True,
              type=click.FloatRange(1),
              help="Seconds between two polls of a settled (synced) sub whose Watch stream "
                   "is open: its changes are pushed, this poll is the safety net.")
@click.option("--mdb-backstop", default=30.0, show_default=True, type=click.FloatRange(1),
              help="PostgreSQL MDB: seconds between two reads of its revision that catch a "
                   "change its feed (LISTEN/NOTIFY) missed; changes are notified at once.")
@click.option("--watch-heartbeat", default=30, show_default=True, type=click.IntRange(1, 600),
              help="Seconds between two heartbeats of a Watch stream; two missed: the stream "
                   "counts as dead, the sub is polled and the stream reopened.")
@click.option("--poll-slots", default=200, show_default=True, type=click.IntRange(1),
              help="Polls in flight at once.")
@click.option("--fetch-slots", default=HerdConfig.fetch_slots, show_default=True,
              type=click.IntRange(1), help="Fetches in flight at once.")
@click.option("--fetches-per-imageserver", default=DEFAULT_FETCHES, show_default=True,
              type=click.IntRange(0),
              help="Fetches in flight at once per image server (the one ranked first for "
                   "the host); hosts beyond it wait. 0: no cap.")
@click.option("--fetch-bytes-per-imageserver", default=DEFAULT_BYTES, show_default=True,
              type=click.IntRange(0),
              help="Bytes those fetches may ask of one image server at once (a larger "
                   "fetch runs alone): small changes run many fetches at once, large "
                   "ones few. 0: no cap.")
@click.option("--update-slots", default=HerdConfig.update_slots, show_default=True,
              type=click.IntRange(1),
              help="Updates in flight at once.")
@click.option("--max-tree-bytes", default=DEFAULT_MAX_TREE_BYTES, show_default=True,
              type=click.IntRange(1),
              help="The most serialized tree taken from one sub per poll; a larger one makes "
                   "the host 'tree too large'.")
@click.option("--health-check", "health_checks", multiple=True, metavar="NAME=COMMAND",
              callback=lambda ctx, param, specs: named_checks(specs),
              help="Allow-list a health check deploys may name ({\"check\": \"NAME\"}): "
                   "COMMAND is split like a shell would (but run without one), {host} and "
                   "{address} fill one argument each; exit 0 is healthy. Repeatable.")
@click.option("--trusted-keys", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of *.pub signing keys: hosts converge only onto images signed by "
                   "one of them (others read 'image not trusted').")
@click.option("--name", callback=dominator_name,
              help="This dominator's name in shard leases and the fences subd checks "
                   "(default: this machine's hostname:PORT). Unique among the dominators "
                   "on one MDB.")
@click.option("--lease", "lease_seconds", default=DEFAULT_LEASE_SECONDS, show_default=True,
              type=click.FloatRange(0.3, 3600),
              help="Seconds a shard lease lasts (renewed every third of it); a dead "
                   "dominator's hosts move to the others about this long after it died.")
@click.option("--shards", default=DEFAULT_SHARDS, show_default=True,
              type=click.IntRange(1, MAX_SHARDS),
              help="Shards the hosts fall into (by a hash of the hostname); fixed by the "
                   "first dominator on the MDB: every other must give the same.")
# Testing only (the fencing tests): seconds between the lease check and each mutating call,
# as a process stopped right there would take.
@click.option("--test-mutation-delay", default=0.0, type=click.FloatRange(0), hidden=True)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@security_options
def serve_command(state_dir: Path, mdb_url: str | None, imageserver: tuple[str, ...],
                  generators: Path | None, port: int, http_port: int, token: str | None,
                  host: str, poll_interval: float, backstop_interval: float,
                  mdb_backstop: float, watch_heartbeat: int,
                  poll_slots: int, fetch_slots: int, fetches_per_imageserver: int,
                  fetch_bytes_per_imageserver: int,
                  update_slots: int, max_tree_bytes: int,
                  health_checks: NamedChecks, trusted_keys: Path | None, name: str,
                  lease_seconds: float, shards: int, test_mutation_delay: float,
                  verbose: bool, security: Security) -> None:
    """Run the dominator: keep every sub of the MDB on its required image.

    Reads the MDB, polls each sub, fetches and pushes what differs, restarts
    only what changed, and stops itself where an update looks unsafe. Hosts fetch
    from the nearest healthy replica of the master (learned from it) or of the
    servers given by hand, the master last.

    Several dominators on one PostgreSQL MDB share the hosts by shard leases; each
    manages the hosts of the shards it holds, and takes over a dead one's.
    """
    setup_logging(verbose)
    trusted = load_trusted_keys(trusted_keys) if trusted_keys else None
    state_dir.mkdir(parents=True, exist_ok=True)
    config = HerdConfig(imageserver=imageserver[0], extra_imageservers=imageserver[1:],
                        poll_interval=poll_interval, mdb_backstop_interval=mdb_backstop,
                        watch=WatchConfig(backstop_interval=backstop_interval,
                                          heartbeat_seconds=watch_heartbeat),
                        poll_slots=poll_slots, fetch_slots=fetch_slots,
                        fetches_per_imageserver=fetches_per_imageserver,
                        fetch_bytes_per_imageserver=fetch_bytes_per_imageserver,
                        update_slots=update_slots, max_tree_bytes=max_tree_bytes,
                        trusted_keys=trusted)
    url = mdb_url or f"sqlite:///{state_dir.resolve() / 'mdb.sqlite'}"
    run(DaemonConfig(state_dir, url, config, generators, port, http_port, host,
                     api_token(state_dir, token), security, health_checks, name=name,
                     lease_seconds=lease_seconds, shards=shards,
                     mutation_delay=test_mutation_delay))
