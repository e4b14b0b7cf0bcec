"""`dominator mdb ...`: the machine database, through the running dominator."""

from __future__ import annotations

from pathlib import Path

import click
import grpc

from dominator.cli.options import dominator_option, json_option
from dominator.client import DominatorClient
from fleetlib.cli.display import echo_json
from fleetlib.cli.options import security_options
from fleetlib.errors import FleetError
from fleetlib.rpc.tls import Security


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
    client = DominatorClient(dominator, security)
    patch: dict[str, object] = {key: value for key, value in (
        ("RequiredImage", required_image), ("PlannedImage", planned_image),
        ("IpAddress", address), ("OwnerGroup", owner_group),
        ("DisableUpdates", disable_updates)) if value is not None}
    if tags:
        try:
            current = client.get_machine(host)
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
    echo_json(client.set_machine(host, patch))


@mdb.command(name="get")
@click.argument("host")
@dominator_option
@security_options
def get_command(host: str, dominator: str, security: Security) -> None:
    """One host's record (JSON)."""
    echo_json(DominatorClient(dominator, security).get_machine(host))


@mdb.command(name="list")
@json_option
@dominator_option
@security_options
def list_command(as_json: bool, dominator: str, security: Security) -> None:
    """Every host's record."""
    machines = DominatorClient(dominator, security).list_machines()
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
    added, changed, removed = DominatorClient(dominator, security).import_machines(
        file.read_text(), replace)
    click.echo(f"imported: {added} added, {changed} changed, {removed} removed")


@mdb.command(name="export")
@dominator_option
@security_options
def export_command(dominator: str, security: Security) -> None:
    """Print every record as Dominator's JSON array."""
    click.echo(DominatorClient(dominator, security).export_machines())
