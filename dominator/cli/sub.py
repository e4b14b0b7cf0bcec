"""`dominator sub ...`: talk to one subd directly, no dominator needed: poll it,
show what an image would change, fetch, update, push an image end to end, read a file,
show or change its limits.

HOST is a name or address, with an optional :PORT. A name DNS does not know is looked
up in the MDB through the dominator (its IpAddress), so MDB hostnames work too.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import click
import grpc

from dominator.cli.options import (
    dominator_option,
    imageserver_option,
    imageservers_option,
    json_option,
)
from dominator.client import DominatorClient
from dominator.herd.convergence import (
    describe_entries,
    objects_to_fetch,
    plan_update,
    summarize,
    unreachable_for,
)
from fleetlib.cli.display import echo_json, format_bytes, progress_bar
from fleetlib.cli.endpoints import check_not_url, explain, origin_of, remember
from fleetlib.cli.options import Duration, security_options
from fleetlib.cli.run import EXIT_REFUSED, EXIT_UNAVAILABLE, rpc_exit_code
from fleetlib.errors import (
    FleetError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)
from fleetlib.fstree.image import Image
from fleetlib.fstree.objectstore import write_file_atomically
from fleetlib.fstree.tree import Tree, check_clean_path
from fleetlib.rpc.ports import SUBD_PORT
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security, parse_address
from fleetlib.wire import subd_pb2
from imageserver.client import ImageServerClient
from subd.changes import UpdatePlan
from subd.client import SubClient
from subd.configuration import (
    EXCLUSIONS,
    SETTINGS,
    check_configuration,
    configuration_json,
    describe,
    parse_assignments,
)
from subd.fetcher import PIN_SECONDS

ARGUMENT_ORIGIN = "the HOST argument"


@dataclass(frozen=True)
class SubHost:
    """The HOST argument as given, and the dominator whose MDB names hosts DNS does not."""

    text: str
    dominator: str
    dominator_origin: str


def host_argument(func: Callable[..., Any]) -> Callable[..., Any]:
    """The HOST argument (and --dominator, to look MDB hostnames up), handed to the
    command as one `host: SubHost`; open it with `connect`. Apply where
    `@click.argument("host")` would go."""

    @click.argument("host")
    @dominator_option
    @functools.wraps(func)
    def wrapper(*args: Any, host: str, dominator: str, **kwargs: Any) -> Any:
        source = click.get_current_context().get_parameter_source("dominator")
        origin = origin_of("--dominator", "DOMINATOR_ADDRESS", source)
        return func(*args, host=SubHost(host, dominator, origin), **kwargs)

    return wrapper


def resolves(name: str) -> bool:
    """Whether `name` is an IP address or DNS (or /etc/hosts) knows it."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    try:
        socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def from_mdb(host: SubHost, name: str, port: int, security: Security) -> str:
    """The address of MDB host `name` (its IpAddress; `port` when the HOST argument
    named one); a FleetError of the kind the failure stands for when there is none."""
    asked = f"asked the dominator at {host.dominator}, {host.dominator_origin}"
    try:
        with DominatorClient(host.dominator, security) as dominator:
            record = dominator.get_machine(name)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            raise FleetError(f"{name} does not resolve and the MDB has no such host "
                             f"({asked})") from None
        kind = {EXIT_UNAVAILABLE: UnavailableError,
                EXIT_REFUSED: PreconditionError}.get(rpc_exit_code(err), FleetError)
        why = explain(err) or f"{asked}: {describe_rpc_error(err)}"
        raise kind(f"{name} does not resolve, and the MDB could not be asked: {why}") from None
    address = record.get("IpAddress") or ""
    if not isinstance(address, str) or not address:
        raise FleetError(f"{name} does not resolve and its MDB record has no IpAddress "
                         f"({asked})")
    target = parse_address(address, SUBD_PORT)
    return f"{target.rpartition(':')[0]}:{port}" if port else target


def resolve(host: SubHost, security: Security) -> tuple[str, str]:
    """(gRPC target, where it came from) for HOST: as given when it is an address or
    DNS knows the name, else from the MDB record of that name (said on stderr)."""
    check_not_url(host.text)
    target = parse_address(host.text, 0)  # port 0: the argument named none
    name, port = target.rpartition(":")[0], int(target.rpartition(":")[2])
    if resolves(name.strip("[]")):
        return parse_address(host.text, SUBD_PORT), ARGUMENT_ORIGIN
    address = from_mdb(host, name, port, security)
    click.echo(f"{name} does not resolve: using {address} from its MDB record (the "
               f"dominator at {host.dominator})", err=True)
    return address, f"from the MDB record of {name}"


def connect(host: SubHost, security: Security) -> SubClient:
    """A client of HOST's subd (see `resolve`); a failed connection names the address
    and where it came from."""
    address, origin = resolve(host, security)
    remember("subd", address, origin)
    return SubClient(address, security)


def status_json(status: subd_pb2.SubStatus) -> dict[str, Any]:
    """Poll status as plain data."""
    update = status.last_update
    return {
        "generation": status.generation, "fingerprint": status.fingerprint.hex(),
        "scan_count": status.scan_count, "last_scan_seconds": status.last_scan_ns / 1e9,
        "last_scan_unix": status.last_scan_unix, "free_bytes": status.free_bytes,
        "inodes": status.inodes, "cached_objects": status.cached_objects,
        "pinned_objects": status.pinned_objects,
        "is_root": status.is_root, "last_successful_image": status.last_successful_image,
        "fetch": {"in_progress": status.fetch.in_progress, "error": status.fetch.error,
                  "objects_done": status.fetch.objects_done,
                  "objects_total": status.fetch.objects_total,
                  "bytes_done": status.fetch.bytes_done,
                  "bytes_copied_locally": status.fetch.bytes_copied_locally},
        "last_update": {"image": update.image_name, "success": update.success,
                        "error": update.error, "in_progress": update.in_progress,
                        "finished_unix": update.finished_unix,
                        "change_window_ms": update.change_window_ns / 1e6,
                        "paths_changed": update.paths_changed,
                        "triggers_run": list(update.triggers_run),
                        "warnings": list(update.warnings)},
        "scan_exclusions": list(status.scan_exclusions),
        "fence": {"owner": status.fence.owner, "token": status.fence.token,
                  "error": status.fence_error},  # the highest lease token accepted
    }


@click.group(name="sub")
def sub() -> None:
    """One host's subd, directly: poll, diff, fetch, update, push-image, get-file, config.

    HOST is `HOST` or `HOST:PORT` (default port 6969). A name DNS does not know is
    looked up in the MDB through --dominator (its IpAddress). What `sub fetch` brings
    stays in the host's cache for 15 minutes, even on a host a dominator manages, so
    `sub update` can follow.
    """


@sub.command(name="poll")
@host_argument
@json_option
@security_options
def poll_command(host: SubHost, as_json: bool, security: Security) -> None:
    """Show a sub's status: scans, fetch and update state, free space."""
    with connect(host, security) as client:
        status, _ = client.poll(short=True)
    data = status_json(status)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{client.address}: generation {data['generation']}, {data['inodes']} inodes, "
               f"{data['scan_count']} scans (last {data['last_scan_seconds']:.2f} s), "
               f"{format_bytes(data['free_bytes'])} free, {data['cached_objects']} cached objects"
               + (f" ({data['pinned_objects']} kept for an update: fetched in the last "
                  f"{PIN_SECONDS // 60} min)" if data["pinned_objects"] else ""))
    click.echo(f"image: {data['last_successful_image'] or '(none yet)'}")
    update = data["last_update"]
    if update["image"]:
        outcome = "succeeded" if update["success"] else f"failed: {update['error']}"
        click.echo(f"last update to {update['image']} {outcome}, {update['paths_changed']} "
                   f"paths in a {update['change_window_ms']:.1f} ms change window")
    if data["fetch"]["error"]:
        click.echo(f"last fetch failed: {data['fetch']['error']}")


@dataclass
class Target:
    """Everything a push needs to know about one host and its image."""

    status: subd_pb2.SubStatus
    tree: Tree
    image: Image
    plan: UpdatePlan


def prepare(client: SubClient, images: ImageServerClient, image_name: str,
            disable_safety_check: bool = False, allow_disruption: bool = False) -> Target:
    """Poll the sub (full tree), read the image (and the previous one, for its
    triggers), and plan the update."""
    status, tree = client.poll()
    if tree is None:  # just started: wait for its first scan
        client.wait_for_scan(0)
        status, tree = client.poll()
    if tree is None:
        raise FleetError(f"{client.address} has no scan to report")
    image = images.get_image(image_name)
    old = None
    previous = status.last_successful_image
    if previous and previous != image_name:
        try:
            old = images.get_image(previous)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
    plan = plan_update(tree, image, list(status.scan_exclusions), old, disable_safety_check,
                       allow_disruption)
    return Target(status, tree, image, plan)


@sub.command(name="diff")
@host_argument
@click.argument("image_name", metavar="IMAGE")
@json_option
@imageserver_option
@security_options
def diff_command(host: SubHost, image_name: str, as_json: bool, imageserver: str,
                 security: Security) -> None:
    """What pushing IMAGE to HOST would change (the plan; nothing is applied).

    Exit 0 when HOST already matches, 1 when it would change.
    """
    with connect(host, security) as client, \
            ImageServerClient(imageserver, security) as images:
        target = prepare(client, images, image_name)
    summary = summarize(target.plan, target.tree)
    if as_json:
        echo_json({**summary.to_json(), "changes": describe_entries(target.plan)})
    else:
        for line in describe_entries(target.plan):
            click.echo(line)
        click.echo(f"{summary.added} to add, {summary.replaced} to replace, {summary.metadata} "
                   f"metadata changes, {summary.deleted} to delete; fetch "
                   f"{summary.objects_to_fetch} objects ({format_bytes(summary.bytes_to_fetch)})"
                   f"; triggers: {', '.join(summary.triggers) or 'none'}"
                   + ("; UNSAFE: deletes more than half the host" if summary.unsafe else ""))
    raise SystemExit(1 if target.plan.diff else 0)


def fetch_objects(client: SubClient, imageservers: str | Sequence[str],
                  plan: UpdatePlan) -> None:
    """Have the sub fetch what the plan needs (from the servers in order), showing progress."""
    needed = objects_to_fetch(plan)
    if not needed:
        return
    client.fetch(imageservers, list(needed), plan.image_name)
    with progress_bar(sum(needed.values()), f"fetching {len(needed)} objects") as advance:
        shown = 0

        def show(fetch: subd_pb2.FetchStatus) -> None:
            nonlocal shown
            advance(fetch.bytes_done - shown)
            shown = fetch.bytes_done

        client.wait_fetch(show)


@sub.command(name="fetch")
@host_argument
@click.argument("image_name", metavar="IMAGE")
@imageserver_option
@security_options
def fetch_command(host: SubHost, image_name: str, imageserver: str, security: Security) -> None:
    """Have HOST fetch into its cache what updating to IMAGE needs (changes nothing else)."""
    with connect(host, security) as client, \
            ImageServerClient(imageserver, security) as images:
        target = prepare(client, images, image_name)
        fetch_objects(client, imageserver, target.plan)
        status, _ = client.poll(short=True)
    click.echo(f"fetched: {status.fetch.objects_done} objects "
               f"({format_bytes(status.fetch.bytes_done)}, "
               f"{format_bytes(status.fetch.bytes_copied_locally)} copied from local files); "
               f"the cache keeps them {PIN_SECONDS // 60} min for `sub update`")


def report_update(result: subd_pb2.UpdateResult, as_json: bool, seconds: float) -> None:
    """Print an update's outcome."""
    if as_json:
        echo_json({"image": result.image_name, "success": result.success,
                   "change_window_ms": result.change_window_ns / 1e6,
                   "paths_changed": result.paths_changed,
                   "triggers_run": list(result.triggers_run),
                   "warnings": list(result.warnings), "seconds": round(seconds, 3)})
        return
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    for action in result.triggers_run:
        click.echo(f"trigger: {action}")
    click.echo(f"updated to {result.image_name}: {result.paths_changed} paths changed in a "
               f"{result.change_window_ns / 1e6:.1f} ms change window ({seconds:.2f} s in all)")


update_options = [
    click.option("--disable-safety-check", is_flag=True,
                 help="Allow an update that deletes more than half the host's inodes."),
    click.option("--allow-disruption", is_flag=True,
                 help="Allow HighImpact triggers (e.g. reboots) to fire."),
]


def with_update_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options every updating command shares."""
    for option in reversed(update_options):
        func = option(func)
    return func


@sub.command(name="update")
@host_argument
@click.argument("image_name", metavar="IMAGE")
@with_update_options
@json_option
@imageserver_option
@security_options
def update_command(host: SubHost, image_name: str, disable_safety_check: bool,
                   allow_disruption: bool, as_json: bool, imageserver: str,
                   security: Security) -> None:
    """Apply IMAGE on HOST from what its cache already holds (run `sub fetch` first)."""
    started = time.monotonic()
    with connect(host, security) as client, \
            ImageServerClient(imageserver, security) as images:
        target = prepare(client, images, image_name, disable_safety_check, allow_disruption)
        result = client.update(replace(target.plan, servers=[imageserver]))
    report_update(result, as_json, time.monotonic() - started)


@sub.command(name="push-image")
@host_argument
@click.argument("image_name", metavar="IMAGE")
@with_update_options
@json_option
@imageservers_option
@security_options
def push_image_command(host: SubHost, image_name: str, disable_safety_check: bool,
                       allow_disruption: bool, as_json: bool, imageserver: tuple[str, ...],
                       security: Security) -> None:
    """Converge HOST onto IMAGE without a dominator: poll, diff, fetch, update, then
    wait for the next scan and check the host matches. With --imageserver given more
    than once, the image comes from the first and HOST fetches each object from the
    first server that has it and sends it whole, in the order given."""
    started = time.monotonic()
    with connect(host, security) as client, \
            ImageServerClient(imageserver[0], security) as images:
        target = prepare(client, images, image_name, disable_safety_check, allow_disruption)
        if not target.plan.diff:
            if not as_json:
                click.echo(f"{client.address} already matches {image_name}")
            return
        fetch_objects(client, imageserver, target.plan)
        result = client.update(replace(target.plan, servers=list(imageserver)))
        status, _ = client.poll(short=True)
        client.wait_for_scan(status.scan_count)  # subd pauses scans during updates, so
        # the next pass to end began after this one
        status, tree = client.poll(target.status.generation)
        if tree is None:
            raise FleetError(f"{client.address} reported no tree after the update")
        after = plan_update(tree, target.image, list(status.scan_exclusions))
    report_update(result, as_json, time.monotonic() - started)
    cannot_fix = unreachable_for(status.is_root)
    left = [e for e in after.diff.entries if not cannot_fix(e)]
    if left:
        raise FleetError(f"{client.address} still differs from {image_name} after the update: "
                         f"{len(left)} paths, e.g. {left[0].change.value} {left[0].path}")


def write_pieces(pieces: Iterator[bytes], out: IO[bytes]) -> None:
    """Copy pieces to a binary stream as they arrive."""
    for data in pieces:
        out.write(data)
    out.flush()


def file_pieces(client: SubClient, path: str) -> Iterator[bytes]:
    """The content of the file at `path` on the host, piece by piece; NotFoundError
    (before any piece) when the host has no such file."""
    for _, data, last in client.stream_files([path]):
        if data is None:
            raise NotFoundError(f"{path}: no such file on {client.address}")
        yield data
        if last:
            return


@sub.command(name="get-file")
@host_argument
@click.argument("path")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE",
              help="Write the content to FILE (crash-safely: a temp name, fsync, rename) "
                   "instead of stdout.")
@security_options
def get_file_command(host: SubHost, path: str, output: Path | None,
                     security: Security) -> None:
    """Print the file at PATH on HOST (the bytes as they are), or write it to FILE.

    PATH is absolute, within the host's root. Exit 1 when HOST has no such file,
    2 when PATH is a directory, a symlink or a device.
    """
    check_clean_path(path)
    with connect(host, security) as client:
        pieces = file_pieces(client, path)
        first = next(pieces, b"")  # a missing file fails here, before FILE is created
        content = itertools.chain([first], pieces)
        if output is None:
            write_pieces(content, sys.stdout.buffer)
        else:
            write_file_atomically(output, content, mode=0o600)  # host files may be secret


SET_HELP = ("Change a setting, KEY=VALUE, repeatable: " + ", ".join(
    f"{key} ({setting.low}-{setting.high})" if setting.high <= 100 else f"{key} (>= 1)"
    for key, setting in SETTINGS.items()) + f", {EXCLUSIONS} (a path regex; each adds one, "
    "the list replaces subd's). Lasts until subd restarts: its flags are the defaults.")


@sub.command(name="config")
@host_argument
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--for", "for_seconds", type=Duration(), metavar="DURATION",
              help="With --set: a boost, undone after DURATION (90, 30m, 12h, up to 7d).")
@json_option
@security_options
def config_command(host: SubHost, assignments: tuple[str, ...], for_seconds: int | None,
                   as_json: bool, security: Security) -> None:
    """Show HOST's scan, CPU and network limits and scan exclusions, or change them
    with --set, for a while with --for (the reference's get-config, set-config and
    boost commands)."""
    if for_seconds is not None and not assignments:
        raise click.UsageError("--for needs --set KEY=VALUE: what to boost")
    changes = parse_assignments(assignments) if assignments else None
    if changes is not None and for_seconds is not None:
        changes.for_seconds = for_seconds
        check_configuration(changes)
    with connect(host, security) as client:
        config = client.get_configuration() if changes is None \
            else client.set_configuration(changes)
    if as_json:
        echo_json(configuration_json(config))
    else:
        for line in describe(config):
            click.echo(line)
    if changes is not None and not changes.for_seconds:
        click.echo(f"changed on {client.address} until subd restarts (its flags are the "
                   "defaults)", err=True)
