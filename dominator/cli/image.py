"""`dominator image ...`: the image group. Here, the commands that need only the image
server's catalogue (names, times, sizes): list, check, wait, latest, set-expiry and
delete; the commands that read or write an image's content (add, show, cat, diff,
filter, triggers, get) are in image_content.py, and `image replicas` in replicas.py,
each imported only when it runs, so `image list` starts without the tree library.

In `--json` output a point in time is `<what>_unix` (0: never).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import grpc

from dominator.cli.options import dominator_option, imageserver_option, json_option
from fleetlib.cli.display import ago, echo_json, echo_table, format_bytes, utc
from fleetlib.cli.endpoints import explain
from fleetlib.cli.lazy import Lazy, LazyGroup
from fleetlib.cli.options import Duration, parse_duration, security_options
from fleetlib.cli.run import EXIT_NEGATIVE, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, rpc_exit_code
from fleetlib.errors import FleetError, NotFoundError, PreconditionError, UnavailableError
from fleetlib.fstree.imagename import check_image_name
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security
from fleetlib.wire import imageserver_pb2
from imageserver.client import ImageServerClient

HOSTS_NAMED = 10  # hosts a refused delete names before "and N more"
NEVER = "never"

CONTENT = "dominator.cli.image_content"
LAZY_COMMANDS = {
    "add": Lazy(f"{CONTENT}:add_command",
                "Add image NAME from SOURCE: a directory, or a .tar, .tar.gz, .tar.zst, "
                ".tar.xz or .tar.bz2 file; or from a container image with --from-oci FILE."),
    "cat": Lazy(f"{CONTENT}:cat_command",
                "Print file PATH of image NAME on stdout, byte for byte (verified against its "
                "hash before any of it is printed)."),
    "diff": Lazy(f"{CONTENT}:diff_command",
                 "Compare images FIRST and SECOND: what turning FIRST into SECOND changes."),
    "filter": Lazy(f"{CONTENT}:filter_command",
                   "Print the filter of image NAME, one regex per line, as `image add --filter "
                   "FILE` reads it."),
    "get": Lazy(f"{CONTENT}:get_command",
                "Unpack image NAME into DIRECTORY (missing or empty) exactly: owners, modes, "
                "mtimes, extended attributes, hard links, symlinks and device nodes."),
    "replicas": Lazy("dominator.cli.replicas:replicas_command",
                     "List the image server (the master) and every replica of it, replicas of "
                     "replicas too: where each stands, what it follows, how far behind it is "
                     "(events and bytes it still lacks), bytes it replicated, its state "
                     "(syncing, in sync, diverged, alarm, disconnected) and when its upstream "
                     "last heard from it."),
    "show": Lazy(f"{CONTENT}:show_command",
                 "List image NAME like `ls -l`: mode, links, uid, gid, size, mtime, path."),
    "triggers": Lazy(f"{CONTENT}:triggers_command",
                     "Print the triggers of image NAME as Dominator's triggers JSON, as `image "
                     "add --triggers FILE` reads it ([] when it has none)."),
}


@click.group(name="image", cls=LazyGroup, lazy=LAZY_COMMANDS)
def image() -> None:
    """Images: immutable trees (plus filter, triggers, computed files) on the image server."""


@image.command(name="list")
@click.option("--prefix", default="", help="Only images whose names start with this.")
@click.option("--quarantined", "only_quarantined", is_flag=True,
              help="List instead the names a replica quarantined: its copy's content differs "
                   "from its upstream's, so it serves the name only once the upstream's copy "
                   "is in (`image delete NAME --replica-only` drops the copy).")
@json_option
@imageserver_option
@security_options
def list_command(prefix: str, only_quarantined: bool, as_json: bool, imageserver: str,
                 security: Security) -> None:
    """List images on the image server, by name: when each was created, when it expires
    ('-': never), its inodes and bytes. Nothing at all when there are none.

    On a replica, each quarantined name also gets a line on stderr (QUARANTINED ...).
    """
    with ImageServerClient(imageserver, security) as client:
        reply = client.listing(prefix)
    if only_quarantined:
        list_quarantined(list(reply.quarantined), as_json)
        return
    for entry in reply.quarantined:
        click.echo(f"QUARANTINED {entry.name}: local copy {entry.local_digest.hex()[:12]} "
                   f"differs from upstream's {entry.upstream_digest.hex()[:12]} (since "
                   f"{utc(entry.since_unix)})", err=True)
    images = list(reply.images)
    if as_json:
        echo_json([summary_json(info) for info in images])
        return
    if images:
        echo_table(["name", "created", "expires", "inodes", "size"],
                   [[info.name, ago(info.created_unix), ago(info.expires_unix), info.inodes,
                     format_bytes(info.total_bytes)] for info in images])


def list_quarantined(entries: list[imageserver_pb2.QuarantinedImage], as_json: bool) -> None:
    """`image list --quarantined`: a table, or a JSON list with each digest in hex."""
    if as_json:
        echo_json([{"name": e.name, "local_digest": e.local_digest.hex(),
                    "upstream_digest": e.upstream_digest.hex(), "since_unix": e.since_unix}
                   for e in entries])
    elif entries:
        echo_table(["name", "local copy", "upstream's", "since"],
                   [[e.name, e.local_digest.hex()[:12], e.upstream_digest.hex()[:12],
                     ago(e.since_unix)] for e in entries])


def summary_json(info: imageserver_pb2.ImageSummary) -> dict[str, Any]:
    """An image summary for --json (`created`/`expires` are the older spellings of
    `created_unix`/`expires_unix`)."""
    return {"name": info.name, "created": info.created_unix, "expires": info.expires_unix,
            "created_unix": info.created_unix, "expires_unix": info.expires_unix,
            "inodes": info.inodes, "bytes": info.total_bytes}


@image.command(name="check")
@click.argument("name")
@json_option
@imageserver_option
@security_options
def check_command(name: str, as_json: bool, imageserver: str, security: Security) -> None:
    """Whether image NAME exists: one line saying which; exit 0 when it does, 1 when not."""
    check_image_name(name)
    with ImageServerClient(imageserver, security) as client:
        exists = client.image_exists(name)
    if as_json:
        echo_json({"name": name, "exists": exists})
    else:
        click.echo(f"image {name} exists" if exists else f"image {name} does not exist")
    sys.exit(EXIT_OK if exists else EXIT_NEGATIVE)


@image.command(name="wait")
@click.argument("name")
@click.option("--timeout", type=Duration(), default=None,
              help="Give up after this long (e.g. 90, 30m, 2h).  [default: no limit]")
@imageserver_option
@security_options
def wait_command(name: str, timeout: int | None, imageserver: str, security: Security) -> None:
    """Wait until image NAME exists (e.g. while a build uploads it): exit 0 once it does,
    1 when --timeout passes first, 3 when the image server cannot be reached.

    It follows the image server's stream of changes: no polling.
    """
    check_image_name(name)
    with ImageServerClient(imageserver, security) as client:
        if not client.wait_for_image(name, timeout):
            raise NotFoundError(f"timed out after {timeout} s: image {name} does not exist")
    click.echo(f"image {name} exists")


@image.command(name="latest")
@click.argument("prefix")
@json_option
@imageserver_option
@security_options
def latest_command(prefix: str, as_json: bool, imageserver: str, security: Security) -> None:
    """Print the name of the newest image whose name starts with PREFIX (by creation
    time; of those created in the same second, the last by name). Exit 1 when none does.

    For example: dominator mdb set web-1 --required-image "$(dominator image latest web/)"
    """
    with ImageServerClient(imageserver, security) as client:
        images = client.list_images(prefix)
    if not images:
        raise NotFoundError(f"no image name starts with {prefix!r}")
    newest = max(images, key=lambda info: (info.created_unix, info.name))
    if as_json:
        echo_json(summary_json(newest))
    else:
        click.echo(newest.name)


@image.command(name="set-expiry")
@click.argument("name")
@click.argument("when", metavar="DURATION|never")
@json_option
@imageserver_option
@security_options
def set_expiry_command(name: str, when: str, as_json: bool, imageserver: str,
                       security: Security) -> None:
    """Make image NAME expire DURATION from now (90, 30m, 12h, 7d, ...) or never.

    The image server deletes an image once it expires, as after `image add
    --expires-in`; the change goes to its audit log. Exit 1 when there is no such image.
    """
    check_image_name(name)
    expires = 0 if when.strip().lower() == NEVER else int(time.time()) + parse_duration(when)
    with ImageServerClient(imageserver, security) as client:
        reply = client.set_expiry(name, expires)
    if as_json:
        echo_json({**summary_json(reply.image),
                   "previous_expires_unix": reply.previous_expires_unix})
    elif reply.image.expires_unix:
        click.echo(f"image {name} now expires {ago(reply.image.expires_unix)} "
                   f"({utc(reply.image.expires_unix)})")
    else:
        click.echo(f"image {name} now never expires")


@image.command(name="delete")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Delete even while hosts require or plan the image: the dominator is not "
                   "asked.")
@click.option("--replica-only", is_flag=True,
              help="On a replica (--imageserver REPLICA): delete only that server's copy "
                   "(its quarantined copy if it has one, which clears the alarm); the master "
                   "keeps the image and the dominator is not asked. A replica refuses a "
                   "plain delete.")
@json_option
@imageserver_option
@dominator_option
@security_options
def delete_command(name: str, force: bool, replica_only: bool, as_json: bool, imageserver: str,
                   dominator: str, security: Security) -> None:
    """Delete image NAME; objects no other image uses are freed.

    The dominator is asked first (the image server does not know the MDB): while hosts
    require or plan the image the delete is refused (exit 4) naming them, and when the
    dominator cannot be reached it is refused too (exit 3). --force deletes without
    asking. Deletes are made on the master (replicas follow it); --replica-only drops
    one replica's copy.
    """
    check_image_name(name)
    with ImageServerClient(imageserver, security) as client:
        if not force and not replica_only:
            listed = client.listing(name)
            if not listed.upstream:  # a replica refuses by itself, naming its master
                if name not in {info.name for info in listed.images}:
                    raise NotFoundError(f"unknown image {name}")
                check_unused(name, dominator, security)
        reply = client.delete_image(name, replica_only)
    if as_json:
        echo_json({"name": name, "objects_freed": reply.objects_freed,
                   "bytes_freed": reply.bytes_freed})
        return
    what = f"this replica's copy of image {name}" if replica_only else f"image {name}"
    click.echo(f"deleted {what}, freed {reply.objects_freed} objects "
               f"({format_bytes(reply.bytes_freed)})")


def some(names: list[str]) -> str:
    """Up to HOSTS_NAMED names, then how many more."""
    shown = ", ".join(names[:HOSTS_NAMED])
    return shown + (f" and {len(names) - HOSTS_NAMED} more" if len(names) > HOSTS_NAMED else "")


def check_unused(name: str, dominator: str, security: Security) -> None:
    """Refuse (PreconditionError) when MDB hosts require or plan image NAME; refuse too,
    as the failure's kind, when the dominator cannot say."""
    # Imported here: the dominator's client loads SQLAlchemy (seconds), which no other
    # image command needs.
    from dominator.client import DominatorClient

    try:
        with DominatorClient(dominator, security) as client:
            records = client.list_machines()
    except grpc.RpcError as err:
        kind = {EXIT_UNAVAILABLE: UnavailableError,
                EXIT_REFUSED: PreconditionError}.get(rpc_exit_code(err), FleetError)
        why = explain(err) or f"cannot ask the dominator at {dominator} which hosts use it " \
            f"({describe_rpc_error(err)})"
        raise kind(f"not deleting image {name} unchecked: {why}; --force deletes without "
                   "asking") from None
    uses = [(what, sorted(str(r.get("Hostname")) for r in records if r.get(key) == name))
            for what, key in (("required", "RequiredImage"), ("planned", "PlannedImage"))]
    named = [f"{what} by {some(hosts)}" for what, hosts in uses if hosts]
    if named:
        raise PreconditionError(f"not deleting image {name}: it is {' and '.join(named)}; "
                                "change their MDB records first, or --force deletes it anyway")
