"""`dominator mdb ...`: the machine database, through the running dominator.

Records are Dominator's MDB JSON (CamelCase keys). `mdb get` and `mdb list --json` add
one key beside them, "pause": the dominator's own pause of the host ({"by", "reason",
"since_unix", "until_unix"}) or null. A pause lives in the dominator's state, not in the
MDB, so an `mdb import` never lifts it; `mdb export` writes the MDB alone (what `mdb
import` reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import grpc

from dominator.cli.options import dominator_option, json_option
from dominator.client import DominatorClient
from fleetlib.cli.display import ago, echo_json, echo_table
from fleetlib.cli.options import Duration, security_options
from fleetlib.rpc.tls import Security
from fleetlib.wire import dominator_pb2


@click.group(name="mdb")
def mdb() -> None:
    """The machine database: which image each host must run."""


def parse_tags(tags: tuple[str, ...], untags: tuple[str, ...]) -> dict[str, str]:
    """--tag K=V values as a dict, checked against --untag (a key in both is refused)."""
    wanted: dict[str, str] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{tag!r}: use KEY=VALUE (KEY= for an empty value; "
                                     "--untag KEY removes a tag)", param_hint="--tag")
        wanted[key] = value
    for key in untags:
        if not key or "=" in key:
            raise click.BadParameter(f"{key!r}: give the tag's KEY alone", param_hint="--untag")
        if key in wanted:
            raise click.UsageError(f"--tag {key}=... and --untag {key}: set it or remove it")
    return wanted


@mdb.command(name="set")
@click.argument("host")
@click.option("--required-image", metavar="IMAGE", help="The image HOST must run.")
@click.option("--planned-image", metavar="IMAGE",
              help="The image HOST will run next (pre-fetched); '' clears it.")
@click.option("--address", help="HOST:PORT of its subd. Needed to add a host the MDB does not "
              "know (a typo never adds one).")
@click.option("--owner-group", help="Who owns the host.")
@click.option("--location", metavar="REGION/DC[/RACK]",
              help="Where HOST stands (ranks the image servers it fetches from); '' clears it.")
@click.option("--disable-updates/--enable-updates", default=None,
              help="Pause this host's updates, in the dominator's own state (an `mdb import` "
              "never lifts it); or resume them: lift the pause and the MDB's DisableUpdates.")
@click.option("--reason", help="Why the host is paused (with --disable-updates).")
@click.option("--expires-in", type=Duration(), metavar="DURATION",
              help="The pause lifts itself after DURATION: 90, 30m, 12h, 7d "
              "(with --disable-updates; default: until --enable-updates).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Set a tag (repeatable); KEY= sets an empty value.")
@click.option("--untag", "untags", multiple=True, metavar="KEY",
              help="Remove a tag (repeatable); removing a tag HOST lacks changes nothing.")
@click.option("--force", is_flag=True,
              help="Set an image the image server does not hold (yet), unchecked.")
@dominator_option
@security_options
def set_command(host: str, required_image: str | None, planned_image: str | None,
                address: str | None, owner_group: str | None, location: str | None,
                disable_updates: bool | None,
                reason: str | None, expires_in: int | None, tags: tuple[str, ...],
                untags: tuple[str, ...], force: bool, dominator: str,
                security: Security) -> None:
    """Change the fields given of HOST, or add HOST (with --address).

    An image the image server does not hold is refused (exit 2, naming similar images)
    unless --force; so is an unknown HOST without --address (naming close hostnames).
    When the dominator cannot reach the image server to check, exit 3. A refused
    change changes nothing."""
    if (reason is not None or expires_in is not None) and disable_updates is not True:
        raise click.UsageError("--reason and --expires-in go with --disable-updates")
    wanted = parse_tags(tags, untags)
    patch: dict[str, object] = {key: value for key, value in (
        ("RequiredImage", required_image), ("PlannedImage", planned_image),
        ("IpAddress", address), ("OwnerGroup", owner_group), ("Location", location))
        if value is not None}
    if not patch and not wanted and not untags and disable_updates is None:
        raise click.UsageError("nothing to change: give a field to set (see --help)")
    client = DominatorClient(dominator, security)
    if wanted or untags:
        try:
            current = client.get_machine(host)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            current = {}  # a new host has no tags yet (the set says if it may be added)
        merged = dict(current.get("Tags") or {})
        for key in untags:
            if merged.pop(key, None) is None and current:
                click.echo(f"warning: {host} has no tag {key}: nothing to remove", err=True)
        patch["Tags"] = {**merged, **wanted}
    pause = dominator_pb2.PauseSpec(reason=reason or "", expires_in_seconds=expires_in or 0) \
        if disable_updates else None
    echo_json(client.set_machine(host, patch, force=force, pause=pause,
                                 resume=disable_updates is False, with_pause=True))


@mdb.command(name="get")
@click.argument("host")
@dominator_option
@security_options
def get_command(host: str, dominator: str, security: Security) -> None:
    """One host's record (JSON), with the dominator's pause of it under "pause"."""
    echo_json(DominatorClient(dominator, security).get_machine(host, with_pause=True))


def updates_cell(record: dict[str, Any]) -> str:
    """What holds the host's updates, for people: its pause, the MDB's DisableUpdates."""
    held = []
    pause = record.get("pause")
    if pause:
        until = f" (lifts {ago(pause['until_unix'])})" if pause["until_unix"] else ""
        held.append(f"paused by {pause['by']}{until}: {pause['reason'] or 'no reason given'}")
    if record["DisableUpdates"]:
        held.append("disabled in the MDB")
    return "; ".join(held)


@mdb.command(name="list")
@json_option
@dominator_option
@security_options
def list_command(as_json: bool, dominator: str, security: Security) -> None:
    """Every host's record: images, address, location, what holds its updates, tags."""
    machines = DominatorClient(dominator, security).list_machines(with_pause=True)
    if as_json:
        echo_json(machines)
        return
    echo_table(["host", "required", "planned", "address", "location", "updates", "tags"],
               [[m["Hostname"], m["RequiredImage"], m["PlannedImage"], m["IpAddress"],
                 m["Location"], updates_cell(m),
                 ",".join(f"{key}={value}" for key, value in sorted(m["Tags"].items()))]
                for m in machines])


@mdb.command(name="delete")
@click.argument("host")
@json_option
@dominator_option
@security_options
def delete_command(host: str, as_json: bool, dominator: str, security: Security) -> None:
    """Remove HOST's record: the dominator stops following it. An unknown HOST exits 1,
    naming close hostnames. A pause of HOST stays (it holds HOST if it comes back)."""
    record = DominatorClient(dominator, security).delete_machine(host)
    if as_json:
        echo_json(record)
    else:
        click.echo(f"deleted {host} from the MDB")


@mdb.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Remove hosts the file does not name.")
@click.option("--force", is_flag=True,
              help="Set images the image server does not hold (yet), unchecked.")
@dominator_option
@security_options
def import_command(file: Path, replace: bool, force: bool, dominator: str,
                   security: Security) -> None:
    """Load FILE (Dominator's JSON array) in one transaction: a bad file changes nothing.

    An image the file sets that the image server does not hold refuses the whole file
    (exit 2, naming similar images) unless --force; exit 3 when the dominator cannot
    reach the image server to check. The file's DisableUpdates never lifts a pause made
    with `mdb set --disable-updates`."""
    added, changed, removed = DominatorClient(dominator, security).import_machines(
        file.read_text(), replace, force)
    click.echo(f"imported: {added} added, {changed} changed, {removed} removed")


@mdb.command(name="export")
@dominator_option
@security_options
def export_command(dominator: str, security: Security) -> None:
    """Print every record as Dominator's JSON array (what `mdb import` reads)."""
    click.echo(DominatorClient(dominator, security).export_machines())
