"""`dominator fleet ...` and `dominator mdb ...`: operate the running dominator."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import grpc

from dominator.herd.status import SubReport
from dominator.image_cli import json_option
from fleetlib.cli.display import echo_json
from fleetlib.cli.options import address_option, security_options
from fleetlib.errors import FleetError
from fleetlib.rpc.tls import Security, open_channel, parse_address
from fleetlib.wire import dominator_pb2, dominator_pb2_grpc

DEFAULT_PORT = 6970
dominator_option = address_option("dominator", "DOMINATOR_ADDRESS", "localhost:6970",
                                  "The dominator's admin API.")


def connect(address: str, security: Security) -> dominator_pb2_grpc.DominatorStub:
    """A stub for the dominator at HOST[:PORT]."""
    channel = open_channel(parse_address(address, DEFAULT_PORT), security, "dominator")
    return dominator_pb2_grpc.DominatorStub(channel)


def when(unix: int) -> str:
    """A readable UTC time, or '-' for never."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) if unix else "-"


def info_json(info: dominator_pb2.SubInfo) -> dict:
    """One sub as plain data."""
    return SubReport.from_wire(info).to_json()


@click.group(name="fleet")
def fleet() -> None:
    """The fleet as the running dominator sees it, and its safety switches."""


@fleet.command(name="status")
@json_option
@dominator_option
@security_options
def status_command(as_json: bool, dominator: str, security: Security) -> None:
    """Counts of hosts by status, and whether updates are switched off."""
    reply = connect(dominator, security).GetFleetStatus(dominator_pb2.GetFleetStatusRequest())
    data = {"hosts": reply.hosts, "by_status": dict(reply.hosts_by_status),
            "updates_disabled": reply.updates_disabled, "disabled_by": reply.disabled_by,
            "disabled_reason": reply.disabled_reason, "disabled_unix": reply.disabled_unix,
            "diff_cache_hits": reply.diff_cache_hits,
            "diff_cache_misses": reply.diff_cache_misses}
    if as_json:
        echo_json(data)
        return
    click.echo(f"{reply.hosts} hosts: " + ", ".join(
        f"{count} {status}" for status, count in sorted(reply.hosts_by_status.items())))
    if reply.updates_disabled:
        click.echo(f"UPDATES DISABLED by {reply.disabled_by} at {when(reply.disabled_unix)}: "
                   f"{reply.disabled_reason}")


@fleet.command(name="list")
@json_option
@dominator_option
@security_options
def list_command(as_json: bool, dominator: str, security: Security) -> None:
    """Every host: status, image, last sync, last error."""
    subs = connect(dominator, security).ListSubs(dominator_pb2.ListSubsRequest()).subs
    if as_json:
        echo_json([info_json(info) for info in subs])
        return
    for info in subs:
        flag = f" INTRUSION({len(info.intrusion_paths)})" if info.intrusion_paths else ""
        click.echo(f"{info.hostname:24} {info.status:22} {info.required_image or '-':24} "
                   f"synced {when(info.last_sync_unix)}{flag}"
                   + (f"  {info.last_error}" if info.last_error else ""))


@fleet.command(name="show")
@click.argument("host")
@json_option
@dominator_option
@security_options
def show_command(host: str, as_json: bool, dominator: str, security: Security) -> None:
    """One host in detail: status history, intrusion report, last update."""
    info = connect(dominator, security).GetSubInfo(dominator_pb2.HostRequest(hostname=host))
    data = info_json(info)
    if as_json:
        echo_json(data)
        return
    for key, value in data.items():
        click.echo(f"{key}: {value}")


@fleet.command(name="disable-updates")
@click.option("--reason", required=True, help="Why (shown to every operator).")
@dominator_option
@security_options
def disable_command(reason: str, dominator: str, security: Security) -> None:
    """Stop every update fleet-wide (persists across dominator restarts)."""
    reply = connect(dominator, security).DisableUpdates(
        dominator_pb2.DisableUpdatesRequest(reason=reason))
    click.echo(f"updates disabled by {reply.disabled_by}: {reply.disabled_reason}")


@fleet.command(name="enable-updates")
@dominator_option
@security_options
def enable_command(dominator: str, security: Security) -> None:
    """Allow updates again."""
    connect(dominator, security).EnableUpdates(dominator_pb2.EnableUpdatesRequest())
    click.echo("updates enabled")


@fleet.command(name="clear-safety")
@click.argument("host")
@dominator_option
@security_options
def clear_safety_command(host: str, dominator: str, security: Security) -> None:
    """Let HOST's next update delete more than half of it (once)."""
    connect(dominator, security).ClearSafetyShutoff(dominator_pb2.HostRequest(hostname=host))
    click.echo(f"{host}: safety check cleared for its next update")


@fleet.command(name="acknowledge")
@click.argument("host")
@dominator_option
@security_options
def acknowledge_command(host: str, dominator: str, security: Security) -> None:
    """Acknowledge HOST's intrusion report (it stays visible until then)."""
    connect(dominator, security).AcknowledgeIntrusion(dominator_pb2.HostRequest(hostname=host))
    click.echo(f"{host}: intrusion report acknowledged")


@fleet.command(name="fast-update")
@click.argument("host")
@dominator_option
@security_options
def fast_update_command(host: str, dominator: str, security: Security) -> None:
    """Converge HOST now, showing each step; exit 0 when it is synced."""
    progress = connect(dominator, security).FastUpdate(dominator_pb2.HostRequest(hostname=host))
    success = False
    for step in progress:
        click.echo(f"{host}: {step.status}" + (f" ({step.message})" if step.message else ""))
        if step.done:
            success = step.success
    sys.exit(0 if success else 1)


@click.group(name="mdb")
def mdb() -> None:
    """The machine database: which image each host must run."""


@mdb.command(name="set")
@click.argument("host")
@click.option("--required-image", help="The image HOST must run.")
@click.option("--planned-image", help="The image HOST will run next (pre-fetched).")
@click.option("--address", help="HOST:PORT of its subd, when HOST does not resolve.")
@click.option("--owner-group", help="Who owns the host.")
@click.option("--disable-updates/--enable-updates", default=None,
              help="Switch updates off (or on) for this host only.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Set a tag (repeatable).")
@dominator_option
@security_options
def set_command(host: str, required_image: str | None, planned_image: str | None,
                address: str | None, owner_group: str | None, disable_updates: bool | None,
                tags: tuple[str, ...], dominator: str, security: Security) -> None:
    """Create HOST or change the fields given."""
    stub = connect(dominator, security)
    patch: dict[str, object] = {key: value for key, value in (
        ("RequiredImage", required_image), ("PlannedImage", planned_image),
        ("IpAddress", address), ("OwnerGroup", owner_group),
        ("DisableUpdates", disable_updates)) if value is not None}
    if tags:
        try:
            current = json.loads(stub.GetMachine(dominator_pb2.HostRequest(hostname=host)).json)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            current = {}  # a new host has no tags yet
        merged = dict(current.get("Tags") or {})
        for tag in tags:
            key, sep, value = tag.partition("=")
            if not sep or not key:
                raise FleetError(f"--tag {tag!r}: use KEY=VALUE")
            merged[key] = value
        patch["Tags"] = merged
    reply = stub.SetMachine(dominator_pb2.SetMachineRequest(hostname=host,
                                                            patch_json=json.dumps(patch)))
    echo_json(json.loads(reply.json))


@mdb.command(name="get")
@click.argument("host")
@dominator_option
@security_options
def get_command(host: str, dominator: str, security: Security) -> None:
    """One host's record (JSON)."""
    reply = connect(dominator, security).GetMachine(dominator_pb2.HostRequest(hostname=host))
    echo_json(json.loads(reply.json))


@mdb.command(name="list")
@json_option
@dominator_option
@security_options
def mdb_list_command(as_json: bool, dominator: str, security: Security) -> None:
    """Every host's record."""
    machines = json.loads(connect(dominator, security).ListMachines(
        dominator_pb2.ListMachinesRequest()).json)
    if as_json:
        echo_json(machines)
        return
    for m in machines:
        click.echo(f"{m['Hostname']:24} {m['RequiredImage'] or '-':24} "
                   f"{m['PlannedImage'] or '-':24} {m['IpAddress'] or ''}"
                   + ("  updates disabled" if m["DisableUpdates"] else ""))


@mdb.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Remove hosts the file does not name.")
@dominator_option
@security_options
def import_command(file: Path, replace: bool, dominator: str, security: Security) -> None:
    """Load FILE (Dominator's JSON array) in one transaction: a bad file changes nothing."""
    reply = connect(dominator, security).ImportMachines(
        dominator_pb2.ImportMachinesRequest(json=file.read_text(), replace=replace))
    click.echo(f"imported: {reply.added} added, {reply.changed} changed, "
               f"{reply.removed} removed")


@mdb.command(name="export")
@dominator_option
@security_options
def export_command(dominator: str, security: Security) -> None:
    """Print every record as Dominator's JSON array."""
    click.echo(connect(dominator, security).ListMachines(
        dominator_pb2.ListMachinesRequest()).json)
