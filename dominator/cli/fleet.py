"""`dominator fleet ...`: the fleet as the running dominator sees it."""

from __future__ import annotations

import sys
import time

import click

from dominator.cli.options import dominator_option, json_option
from dominator.client import DominatorClient
from fleetlib.cli.display import echo_json
from fleetlib.cli.options import security_options
from fleetlib.rpc.tls import Security


def when(unix: int) -> str:
    """A readable UTC time, or '-' for never."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) if unix else "-"


@click.group(name="fleet")
def fleet() -> None:
    """The fleet as the running dominator sees it, and its safety switches."""


@fleet.command(name="status")
@json_option
@dominator_option
@security_options
def status_command(as_json: bool, dominator: str, security: Security) -> None:
    """Counts of hosts by status, and whether updates are switched off."""
    reply = DominatorClient(dominator, security).fleet_status()
    data = {"hosts": reply.hosts, "by_status": dict(reply.hosts_by_status),
            "updates_disabled": reply.updates_disabled, "disabled_by": reply.disabled_by,
            "disabled_reason": reply.disabled_reason, "disabled_unix": reply.disabled_unix,
            "diff_cache_hits": reply.diff_cache_hits,
            "diff_cache_misses": reply.diff_cache_misses, "mdb_error": reply.mdb_error}
    if as_json:
        echo_json(data)
        return
    click.echo(f"{reply.hosts} hosts: " + ", ".join(
        f"{count} {status}" for status, count in sorted(reply.hosts_by_status.items())))
    if reply.updates_disabled:
        click.echo(f"UPDATES DISABLED by {reply.disabled_by} at {when(reply.disabled_unix)}: "
                   f"{reply.disabled_reason}")
    if reply.mdb_error:
        click.echo(f"MDB UNREADABLE (hosts keep the last view read): {reply.mdb_error}")


@fleet.command(name="list")
@json_option
@dominator_option
@security_options
def list_command(as_json: bool, dominator: str, security: Security) -> None:
    """Every host: status, image, last sync, last error."""
    subs = DominatorClient(dominator, security).list_subs()
    if as_json:
        echo_json([report.to_json() for report in subs])
        return
    for report in subs:
        flag = f" INTRUSION({len(report.intrusion_paths)})" if report.intrusion_paths else ""
        click.echo(f"{report.hostname:24} {report.status:22} {report.required_image or '-':24} "
                   f"synced {when(report.last_sync_unix)}{flag}"
                   + (f"  {report.last_error}" if report.last_error else ""))


@fleet.command(name="show")
@click.argument("host")
@json_option
@dominator_option
@security_options
def show_command(host: str, as_json: bool, dominator: str, security: Security) -> None:
    """One host in detail: status history, intrusion report, last update."""
    data = DominatorClient(dominator, security).sub(host).to_json()
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
    reply = DominatorClient(dominator, security).disable_updates(reason)
    click.echo(f"updates disabled by {reply.disabled_by}: {reply.disabled_reason}")


@fleet.command(name="enable-updates")
@dominator_option
@security_options
def enable_command(dominator: str, security: Security) -> None:
    """Allow updates again."""
    DominatorClient(dominator, security).enable_updates()
    click.echo("updates enabled")


@fleet.command(name="clear-safety")
@click.argument("host")
@dominator_option
@security_options
def clear_safety_command(host: str, dominator: str, security: Security) -> None:
    """Let HOST's next update delete more than half of it (once)."""
    DominatorClient(dominator, security).clear_safety(host)
    click.echo(f"{host}: safety check cleared for its next update")


@fleet.command(name="acknowledge")
@click.argument("host")
@dominator_option
@security_options
def acknowledge_command(host: str, dominator: str, security: Security) -> None:
    """Acknowledge HOST's intrusion report (it stays visible until then)."""
    DominatorClient(dominator, security).acknowledge_intrusion(host)
    click.echo(f"{host}: intrusion report acknowledged")


@fleet.command(name="fast-update")
@click.argument("host")
@dominator_option
@security_options
def fast_update_command(host: str, dominator: str, security: Security) -> None:
    """Converge HOST now, showing each step; exit 0 when it is synced."""
    success = False
    for step in DominatorClient(dominator, security).fast_update(host):
        click.echo(f"{host}: {step.status}" + (f" ({step.message})" if step.message else ""))
        if step.done:
            success = step.success
    sys.exit(0 if success else 1)
