"""`dominator sub ...`: talk to one subd directly, no dominator needed: poll it,
show what an image would change, fetch, update, or push an image end to end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import grpc

from dominator.cli.options import imageserver_option, json_option
from dominator.herd.convergence import (
    describe_entries,
    objects_to_fetch,
    plan_update,
    summarize,
    unreachable_for,
)
from fleetlib.cli.display import echo_json, format_bytes, progress_bar
from fleetlib.cli.options import security_options
from fleetlib.errors import FleetError
from fleetlib.fstree.image import Image
from fleetlib.fstree.tree import Tree
from fleetlib.rpc.tls import Security
from fleetlib.wire import subd_pb2
from imageserver.client import ImageServerClient
from subd.changes import UpdatePlan
from subd.client import SubClient


def status_json(status: subd_pb2.SubStatus) -> dict[str, Any]:
    """Poll status as plain data."""
    update = status.last_update
    return {
        "generation": status.generation, "fingerprint": status.fingerprint.hex(),
        "scan_count": status.scan_count, "last_scan_seconds": status.last_scan_ns / 1e9,
        "last_scan_unix": status.last_scan_unix, "free_bytes": status.free_bytes,
        "inodes": status.inodes, "cached_objects": status.cached_objects,
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
    }


@click.group(name="sub")
def sub() -> None:
    """One host's subd, directly: poll, diff, fetch, update, push-image.

    HOST is `HOST` or `HOST:PORT` (default port 6969).
    """


@sub.command(name="poll")
@click.argument("host")
@json_option
@security_options
def poll_command(host: str, as_json: bool, security: Security) -> None:
    """Show a sub's status: scans, fetch and update state, free space."""
    with SubClient(host, security) as client:
        status, _ = client.poll(short=True)
    data = status_json(status)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{client.address}: generation {data['generation']}, {data['inodes']} inodes, "
               f"{data['scan_count']} scans (last {data['last_scan_seconds']:.2f} s), "
               f"{format_bytes(data['free_bytes'])} free, {data['cached_objects']} cached objects")
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
@click.argument("host")
@click.argument("image_name", metavar="IMAGE")
@json_option
@imageserver_option
@security_options
def diff_command(host: str, image_name: str, as_json: bool, imageserver: str,
                 security: Security) -> None:
    """What pushing IMAGE to HOST would change (the plan; nothing is applied).

    Exit 0 when HOST already matches, 1 when it would change.
    """
    with SubClient(host, security) as client, \
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


def fetch_objects(client: SubClient, imageserver: str, plan: UpdatePlan) -> None:
    """Have the sub fetch what the plan needs, showing progress."""
    needed = objects_to_fetch(plan)
    if not needed:
        return
    client.fetch(imageserver, list(needed))
    with progress_bar(sum(needed.values()), f"fetching {len(needed)} objects") as advance:
        shown = 0

        def show(fetch: subd_pb2.FetchStatus) -> None:
            nonlocal shown
            advance(fetch.bytes_done - shown)
            shown = fetch.bytes_done

        client.wait_fetch(show)


@sub.command(name="fetch")
@click.argument("host")
@click.argument("image_name", metavar="IMAGE")
@imageserver_option
@security_options
def fetch_command(host: str, image_name: str, imageserver: str, security: Security) -> None:
    """Have HOST fetch into its cache what updating to IMAGE needs (changes nothing else)."""
    with SubClient(host, security) as client, \
            ImageServerClient(imageserver, security) as images:
        target = prepare(client, images, image_name)
        fetch_objects(client, imageserver, target.plan)
        status, _ = client.poll(short=True)
    click.echo(f"fetched: {status.fetch.objects_done} objects "
               f"({format_bytes(status.fetch.bytes_done)}, "
               f"{format_bytes(status.fetch.bytes_copied_locally)} copied from local files)")


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
@click.argument("host")
@click.argument("image_name", metavar="IMAGE")
@with_update_options
@json_option
@imageserver_option
@security_options
def update_command(host: str, image_name: str, disable_safety_check: bool,
                   allow_disruption: bool, as_json: bool, imageserver: str,
                   security: Security) -> None:
    """Apply IMAGE on HOST from what its cache already holds (run `sub fetch` first)."""
    started = time.monotonic()
    with SubClient(host, security) as client, \
            ImageServerClient(imageserver, security) as images:
        target = prepare(client, images, image_name, disable_safety_check, allow_disruption)
        result = client.update(target.plan)
    report_update(result, as_json, time.monotonic() - started)


@sub.command(name="push-image")
@click.argument("host")
@click.argument("image_name", metavar="IMAGE")
@with_update_options
@json_option
@imageserver_option
@security_options
def push_image_command(host: str, image_name: str, disable_safety_check: bool,
                       allow_disruption: bool, as_json: bool, imageserver: str,
                       security: Security) -> None:
    """Converge HOST onto IMAGE without a dominator: poll, diff, fetch, update, then
    wait for the next scan and check the host matches."""
    started = time.monotonic()
    with SubClient(host, security) as client, \
            ImageServerClient(imageserver, security) as images:
        target = prepare(client, images, image_name, disable_safety_check, allow_disruption)
        if not target.plan.diff:
            if not as_json:
                click.echo(f"{client.address} already matches {image_name}")
            return
        fetch_objects(client, imageserver, target.plan)
        result = client.update(target.plan)
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
