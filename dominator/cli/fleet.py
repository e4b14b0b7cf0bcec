"""`dominator fleet ...`: the fleet as the running dominator sees it."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from dominator.cli.dominators import dominators_command
from dominator.cli.options import dominator_option, json_option
from dominator.client import DominatorClient
from dominator.deploy.selector import parse_selector, selects
from dominator.herd.records import Disabled
from dominator.herd.status import Status, SubReport
from fleetlib.cli.display import ago, echo_json, echo_table, table, utc
from fleetlib.cli.options import Duration, security_options
from fleetlib.cli.run import EXIT_NEGATIVE, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE
from fleetlib.errors import NotFoundError
from fleetlib.rpc.tls import Security

STATUSES = [status.value for status in Status]
FAST_UPDATE_EXITS = {Status.UNSAFE.value: EXIT_REFUSED,
                     Status.DISRUPTION_DENIED.value: EXIT_REFUSED,
                     Status.UPDATES_DISABLED.value: EXIT_REFUSED,
                     Status.UNREACHABLE.value: EXIT_UNAVAILABLE,
                     Status.NO_SPACE.value: EXIT_UNAVAILABLE}


def when(unix: float) -> str:
    """A point in time for people: '2 min ago (2026-01-02 03:04:05 UTC)', '-' for never."""
    if not unix:
        return "-"
    return f"{ago(unix)} ({utc(unix)})"


def describe_switch(switch: Disabled) -> str:
    """Who set a pause or the fleet-wide switch, when, why, and until when."""
    until = f", until {when(switch.until_unix)}" if switch.until_unix else ""
    return f"by {switch.by or '?'} {when(switch.unix)}{until}: {switch.reason}"


def check_statuses(ctx: click.Context, param: click.Parameter,
                   values: Sequence[str]) -> list[str]:
    """--status values as the herd spells them ('updates-disabled' is 'updates disabled');
    a usage error (exit 2) naming the valid ones otherwise."""
    statuses = []
    for value in values:
        for part in value.split(","):
            name = " ".join(part.replace("-", " ").replace("_", " ").split()).lower()
            if name not in STATUSES:
                raise click.BadParameter(f"unknown status {part!r}; valid: "
                                         + ", ".join(STATUSES), ctx, param)
            statuses.append(name)
    return statuses


def select_reports(reports: list[SubReport], selector: str) -> list[SubReport]:
    """The reports a deploy selector takes (`all`, `tags:K=V,...`, host names); a host
    name the dominator does not know is NotFoundError."""
    select = parse_selector(selector)
    if "hosts" in select:
        known = {report.hostname for report in reports}
        unknown = [name for name in select["hosts"] if name not in known]
        if unknown:
            raise NotFoundError(f"unknown host{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(unknown)} (the dominator does not know it)")
        return [report for report in reports if report.hostname in select["hosts"]]
    return [report for report in reports if selects(select, report.tags)]


def problem(report: SubReport) -> str:
    """The ERROR/INTRUSION cell: an intrusion report first, else the last error."""
    paths = report.intrusion_paths
    if paths:
        return (f"intrusion: {len(paths)} path{'s' if len(paths) > 1 else ''} ({paths[0]}"
                f"{', ...' if len(paths) > 1 else ''})")
    return report.last_error


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
            "disabled_until_unix": reply.disabled_until_unix,
            "diff_cache_hits": reply.diff_cache_hits,
            "diff_cache_misses": reply.diff_cache_misses, "mdb_error": reply.mdb_error}
    if as_json:
        echo_json(data)
        return
    click.echo(f"{reply.hosts} hosts" + (": " if reply.hosts_by_status else "") + ", ".join(
        f"{count} {status}" for status, count in sorted(reply.hosts_by_status.items())))
    if reply.updates_disabled:
        click.echo("UPDATES DISABLED fleet-wide " + describe_switch(Disabled(
            reply.disabled_by, reply.disabled_reason, reply.disabled_unix,
            reply.disabled_until_unix)))
    if reply.mdb_error:
        click.echo(f"MDB UNREADABLE (hosts keep the last view read): {reply.mdb_error}")
    click.echo(f"diff cache: {reply.diff_cache_hits} hits, {reply.diff_cache_misses} misses")


@fleet.command(name="list")
@click.option("--status", "statuses", multiple=True, callback=check_statuses,
              metavar="STATUS", help="Only hosts in this status (repeat or comma-separate for "
              "several): " + ", ".join(STATUSES) + ".")
@click.option("--select", "selector", metavar="SELECTOR",
              help="Only these hosts, as `deploy start` selects them: `all`, "
                   "`tags:KEY=VALUE,...` (every tag must match) or `HOST,HOST,...`.")
@json_option
@dominator_option
@security_options
def list_command(statuses: list[str], selector: str | None, as_json: bool, dominator: str,
                 security: Security) -> None:
    """Every host: status, image, last sync, last error or intrusion report."""
    subs = DominatorClient(dominator, security).list_subs()
    if selector is not None:
        subs = select_reports(subs, selector)
    if statuses:
        subs = [report for report in subs if report.status in statuses]
    if as_json:
        echo_json([report.to_json() for report in subs])
        return
    shared = len({report.owner for report in subs}) > 1  # several dominators: say whose
    echo_table(["host", "status", "image", "last sync", *(["managed by"] if shared else []),
                "error/intrusion"],
               [[report.hostname, report.status, report.required_image,
                 ago(report.last_sync_unix), *([report.owner] if shared else []),
                 problem(report)] for report in subs])


def echo_fields(fields: list[tuple[str, object]]) -> None:
    """`name:  value` lines, values aligned; an empty value shows '-'."""
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        click.echo(f"  {name + ':':{width}}  {value if value not in ('', None) else '-'}")


def echo_paths(title: str, paths: Sequence[str]) -> None:
    """A titled section of paths, one a line (nothing when there are none)."""
    if paths:
        click.echo(f"\n{title}:")
        for path in paths:
            click.echo(f"  {path}")


def allowances(report: SubReport) -> list[tuple[str, object]]:
    """The switches that hold or let through the host's next update."""
    updates = "enabled"
    if report.pause is not None:
        updates = "paused " + describe_switch(report.pause)
    elif report.updates_disabled:
        updates = "disabled in the MDB (DisableUpdates)"
    return [
        ("updates", updates),
        ("safety check", "cleared for the next update (once)" if report.safety_cleared
         else "on (an update deleting more than half the host waits for "
              f"`dominator fleet clear-safety {report.hostname}`)"),
        ("disruption", "allowed for the next update (once)" if report.disruption_allowed
         else "refused (HighImpact triggers wait for "
              f"`dominator fleet allow-disruption {report.hostname}`)"),
    ]


def show_report(report: SubReport) -> None:
    """`fleet show`: one host in readable sections."""
    click.echo(f"{report.hostname}: {report.status}")
    window = f"change window {report.change_window_ns / 1e6:.1f} ms" \
        if report.change_window_ns else ""
    echo_fields([
        ("address", report.address),
        ("managed by", report.owner),
        ("tags", ", ".join(f"{key}={value}" for key, value in sorted(report.tags.items()))),
        ("required image", report.required_image),
        ("planned image", report.planned_image),
        ("current image", report.current_image),
        ("last sync", when(report.last_sync_unix)),
        ("last poll", when(report.last_poll_unix)),
        ("last scan", when(report.last_scan_unix)),
        ("last update", window),
        ("last error", report.last_error),
        *allowances(report),
    ])
    if report.intrusion_paths:
        echo_paths(f"Intrusion report ({when(report.intrusion_unix)}; "
                   f"`dominator fleet acknowledge {report.hostname}` drops it)",
                   report.intrusion_paths)
    echo_paths("Kept directories (not in the image, they hold filtered content)",
               report.kept_paths)
    if report.history_entries:
        click.echo("\nHistory (oldest first):")
        lines = table(["when", "status", "message"],
                      [[when(entry.time_unix), entry.status, entry.message]
                       for entry in report.history_entries])
        click.echo("\n".join(f"  {line}" for line in lines.splitlines()))


@fleet.command(name="show")
@click.argument("host")
@json_option
@dominator_option
@security_options
def show_command(host: str, as_json: bool, dominator: str, security: Security) -> None:
    """One host in detail: status history, image, intrusion report, its switches."""
    report = DominatorClient(dominator, security).sub(host)
    if as_json:
        echo_json(report.to_json())
        return
    show_report(report)


@fleet.command(name="disable-updates")
@click.option("--reason", required=True, help="Why (shown to every operator).")
@click.option("--expires-in", type=Duration(), metavar="DURATION",
              help="Updates come back on their own after DURATION: 90, 30m, 12h, 7d "
              "(default: until enable-updates).")
@dominator_option
@security_options
def disable_command(reason: str, expires_in: int | None, dominator: str,
                    security: Security) -> None:
    """Stop every update fleet-wide (persists across dominator restarts)."""
    reply = DominatorClient(dominator, security).disable_updates(reason, expires_in or 0)
    until = reply.disabled_until_unix
    lifts = f" until {utc(until)} ({ago(until)})" if until else ""
    click.echo(f"updates disabled by {reply.disabled_by}{lifts}: {reply.disabled_reason}")


@fleet.command(name="enable-updates")
@dominator_option
@security_options
def enable_command(dominator: str, security: Security) -> None:
    """Allow updates again."""
    DominatorClient(dominator, security).enable_updates()
    click.echo("updates enabled")


def echo_switched(report: SubReport, as_json: bool, done: str) -> None:
    """The host's report as JSON, or the one line saying what was done."""
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(f"{report.hostname}: {done}")


@fleet.command(name="clear-safety")
@click.argument("host")
@json_option
@dominator_option
@security_options
def clear_safety_command(host: str, as_json: bool, dominator: str, security: Security) -> None:
    """Let HOST's next update delete more than half of it (once)."""
    report = DominatorClient(dominator, security).clear_safety(host)
    echo_switched(report, as_json, "safety check cleared for its next update")


@fleet.command(name="allow-disruption")
@click.argument("host")
@json_option
@dominator_option
@security_options
def allow_disruption_command(host: str, as_json: bool, dominator: str,
                             security: Security) -> None:
    """Let HOST's next update run HighImpact triggers (a reboot, ...), once.

    Without it, an update that would fire a HighImpact trigger waits in status
    'disruption denied'. The allowance is spent by the first update that fires one."""
    report = DominatorClient(dominator, security).allow_disruption(host)
    echo_switched(report, as_json, "its next update may run HighImpact triggers (once)")


@fleet.command(name="acknowledge")
@click.argument("host")
@json_option
@dominator_option
@security_options
def acknowledge_command(host: str, as_json: bool, dominator: str, security: Security) -> None:
    """Acknowledge HOST's intrusion report (it stays visible until then)."""
    report = DominatorClient(dominator, security).acknowledge_intrusion(host)
    echo_switched(report, as_json, "intrusion report acknowledged")


@fleet.command(name="fast-update")
@click.argument("host")
@dominator_option
@security_options
def fast_update_command(host: str, dominator: str, security: Security) -> None:
    """Converge HOST now, showing each step. Exit 0 when it is synced, 4 when a safety
    rule holds it (unsafe update, disruption denied, updates disabled), 3 when it is
    unreachable or short of space, 1 otherwise."""
    code = EXIT_NEGATIVE
    for step in DominatorClient(dominator, security).fast_update(host):
        click.echo(f"{host}: {step.status}" + (f" ({step.message})" if step.message else ""))
        if step.done:
            code = EXIT_OK if step.success else FAST_UPDATE_EXITS.get(step.status,
                                                                      EXIT_NEGATIVE)
    sys.exit(code)


fleet.add_command(dominators_command)
