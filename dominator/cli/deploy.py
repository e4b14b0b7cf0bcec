"""`dominator deploy ...`: the deploy stage from a terminal (the same HTTP API a
pipeline calls): start a rollout in waves, watch it, list, cancel or plan them.

Exit codes as everywhere (fleetlib/cli/run.py): `status` and `start --wait` give 0
for a deploy that SUCCEEDED or still runs, 1 for one that ended TERMINAL or
CANCELED (and for an unknown id); `plan` gives 3 when a host cannot be planned
(unreachable, no scan yet) and 4 when the herd would refuse a host's update. An
HTTP error of the API is 1 (404), 2 (400, 422), 4 (401, 403, 409) or 3 (429, 5xx,
no connection, no answer), in one line naming the URL and the setting that chose it."""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import click
import httpx
from click.core import ParameterSource

from dominator.cli.options import json_option
from dominator.deploy.selector import parse_selector
from dominator.herd.status import Status
from fleetlib.cli.display import ago, echo_json, echo_table, format_bytes
from fleetlib.cli.run import EXIT_NEGATIVE, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE
from fleetlib.errors import FleetError, NotFoundError, PreconditionError, UnavailableError
from fleetlib.rpc.ports import DEPLOY_HTTP_PORT

POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 30.0
DEFAULT_URL = f"http://localhost:{DEPLOY_HTTP_PORT}"
STATUSES = ("RUNNING", "SUCCEEDED", "TERMINAL", "CANCELED")
DONE_HOSTS = ("succeeded", "failed", "rolledBack", "rollbackFailed", "skipped")
URL_SETTINGS = {ParameterSource.COMMANDLINE: "set by --url",
                ParameterSource.ENVIRONMENT: "set by DOMINATOR_URL"}
# HTTP status -> the kind of error (the exit code) it stands for; other 4xx: usage (2),
# 429 and 5xx: unavailable (3).
HTTP_ERRORS: dict[int, type[FleetError]] = {404: NotFoundError, 401: PreconditionError,
                                            403: PreconditionError, 409: PreconditionError}


def url_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--url and --token, from DOMINATOR_URL and DOMINATOR_TOKEN."""
    func = click.option("--token", envvar="DOMINATOR_TOKEN", show_envvar=True,
                        help="Bearer token of the dominator's HTTP API.")(func)
    return click.option("--url", envvar="DOMINATOR_URL", show_envvar=True,
                        default=DEFAULT_URL, show_default=True,
                        help="The dominator's HTTP API (`dominator serve --http-port`).")(func)


def url_setting() -> str:
    """Which setting chose --url: the option, DOMINATOR_URL or the default."""
    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source("url") if ctx is not None else None
    return URL_SETTINGS.get(source, "the default of --url") if source else "the default of --url"


def reason_of(err: httpx.TransportError) -> str:
    """A transport error in a few words ('Connection refused', not '[Errno 111] ...')."""
    text = str(err).strip() or type(err).__name__
    return re.sub(r"^\[Errno -?\d+\]\s*", "", text.splitlines()[-1])


class DeployApi:
    """The deploy stage API over HTTP. Errors are FleetErrors of the kind (so the
    exit code) the HTTP status stands for, each naming the URL and its setting."""

    def __init__(self, url: str, token: str | None, setting: str | None = None) -> None:
        self.setting = setting or url_setting()
        parsed = httpx.URL(url) if "://" in url else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise FleetError(f"--url {url!r} ({self.setting}) is not an http:// or "
                             f"https:// URL; e.g. {DEFAULT_URL}")
        if not token:
            raise FleetError("no API token: pass --token or set DOMINATOR_TOKEN")
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=TIMEOUT_SECONDS,
                                   headers={"Authorization": f"Bearer {token}"})

    def where(self) -> str:
        return f"{self.url} ({self.setting})"

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a FleetError of the right kind for failures."""
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise UnavailableError(f"the deploy API at {self.where()} did not answer within "
                                   f"{TIMEOUT_SECONDS:g} s; try again") from None
        except httpx.ConnectError as err:
            raise UnavailableError(
                f"cannot connect to the deploy API at {self.where()}: {reason_of(err)}; is "
                f"`dominator serve` running there with --http-port (default "
                f"{DEPLOY_HTTP_PORT})?") from None
        except httpx.TransportError as err:
            raise UnavailableError(
                f"the deploy API at {self.where()} answered no HTTP ({reason_of(err)}); is "
                f"that the dominator's --http-port (default {DEPLOY_HTTP_PORT}), not its "
                "gRPC port?") from None
        if response.status_code >= 400:
            raise self.refusal(response)
        return response

    def refusal(self, response: httpx.Response) -> FleetError:
        """The error an HTTP error status stands for, in one line."""
        code = response.status_code
        try:
            body = response.json()
            message = str(body.get("error") or body.get("detail") or "")
        except (ValueError, AttributeError):
            message = ""
        message = " ".join((message or response.reason_phrase or "error").split())
        hint = "; check --token or DOMINATOR_TOKEN" if code == 401 else ""
        text = f"{message} (HTTP {code} from {self.where()}{hint})"
        if code in HTTP_ERRORS:
            return HTTP_ERRORS[code](text)
        if code == 429 or code >= 500:
            return UnavailableError(text + "; try again later")
        return FleetError(text)

    def start(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        """POST a deploy; its {"id", "status", "statusUrl"}."""
        started: dict[str, Any] = self.call("POST", "/v1/deploys", json=body,
                                            headers={"Idempotency-Key": key}).json()
        return started

    def status(self, deploy_id: str) -> dict[str, Any]:
        """GET a deploy's state."""
        state: dict[str, Any] = self.call("GET", f"/v1/deploys/{deploy_id}").json()
        return state

    def list(self, status: str | None, dry_run: bool | None, limit: int
             ) -> list[dict[str, Any]]:
        """GET the deploys, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if dry_run is not None:
            params["dry_run"] = str(dry_run).lower()
        deploys: list[dict[str, Any]] = self.call("GET", "/v1/deploys",
                                                  params=params).json()["deploys"]
        return deploys


def deploy_body(image: str, select: str, waves: str | None, max_failures: int,
                health_url: str | None, health_check: str | None, timeout: float | None,
                retries: int | None, dry_run: bool, allow_disruption: bool = False,
                max_disruptions: int | None = None) -> dict[str, Any]:
    """The request body of POST /v1/deploys."""
    body: dict[str, Any] = {"image": image, "select": parse_selector(select),
                            "maxFailures": max_failures, "dryRun": dry_run}
    if waves:
        body["waves"] = [w.strip() for w in waves.split(",") if w.strip()]
    if health_url and health_check:
        raise FleetError("--health-url and --health-check exclude each other")
    if health_url or health_check:
        check: dict[str, Any] = {"url": health_url} if health_url else {"check": health_check}
        if timeout is not None:
            check["timeoutSeconds"] = timeout
        if retries is not None:
            check["retries"] = retries
        body["healthCheck"] = check
    if max_disruptions is not None and not allow_disruption:
        raise click.UsageError("--max-disruptions needs --allow-disruption")
    if allow_disruption:
        body["allowDisruption"] = True
    if max_disruptions is not None:
        body["maxDisruptions"] = max_disruptions
    return body


def outcome_code(state: dict[str, Any]) -> int:
    """0 for a deploy that SUCCEEDED or still runs, 1 for one that ended otherwise."""
    return EXIT_OK if state["status"] in ("SUCCEEDED", "RUNNING") else EXIT_NEGATIVE


def outcome_line(deploy_id: str, state: dict[str, Any]) -> str:
    """`deploy ID: STATUS: progress (reason)`, saying so when it still runs."""
    still = " (still running)" if state["status"] == "RUNNING" else ""
    return (f"deploy {deploy_id}: {state['status']}{still}: {state.get('progress', '')}"
            + (f" ({state['reason']})" if state.get("reason") else ""))


@click.group(name="deploy")
def deploy() -> None:
    """Roll images out in waves with health gates (the pipeline deploy stage)."""


def rollout_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `start` and `plan` share."""
    for option in reversed([
        click.argument("image"),
        click.option("--select", "select", required=True,
                     help="Hosts: `all`, `tags:KEY=VALUE,...`, or `host-1,host-2`."),
        click.option("--allow-disruption", is_flag=True,
                     help="Each host the deploy updates may run HighImpact triggers (reboots, "
                          "...): it is allowed once, just before its update (for `plan`: "
                          "plan as if so)."),
    ]):
        func = option(func)
    return func


def current_wave(state: dict[str, Any]) -> int:
    """Index of the wave in progress (the last one once every wave is done)."""
    waves = state.get("waves") or []
    return next((i for i, w in enumerate(waves)
                 if w.get("status") in ("PENDING", "RUNNING")), max(len(waves) - 1, 0))


def host_counts(state: dict[str, Any], names: list[str] | None = None) -> dict[str, int]:
    """How many hosts (of `names`, default all) are in each state."""
    hosts = state.get("hosts", {})
    counts: dict[str, int] = {}
    for name in hosts if names is None else names:
        status = (hosts.get(name) or {}).get("status", "")
        counts[status] = counts.get(status, 0) + 1
    return counts


def done_in(state: dict[str, Any], names: list[str]) -> int:
    """How many of these hosts are done (converged, failed, rolled back, skipped)."""
    counts = host_counts(state, names)
    return sum(counts.get(status, 0) for status in DONE_HOSTS)


def change_line(state: dict[str, Any]) -> str:
    """One line for a log: the wave, the status, the progress and the host counts."""
    waves = state.get("waves") or []
    where = f"wave {current_wave(state) + 1}/{len(waves)} " if waves else ""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(host_counts(state).items()))
    return (f"{time.strftime('%H:%M:%S')} {where}{state['status']}: "
            f"{state.get('progress', '')} [{counts}]")


def wait_for(api: DeployApi, deploy_id: str) -> dict[str, Any]:
    """Follow a deploy until it ends; its last state. On a terminal, a progress bar
    per wave (on stderr); otherwise a line on stderr each time the wave, the status
    or the host counts change (not on every poll)."""
    tty = sys.stderr.isatty()
    bar = None
    wave_shown = -1
    seen: tuple[Any, ...] | None = None
    try:
        while True:
            state = api.status(deploy_id)
            waves = state.get("waves") or []
            current = current_wave(state)
            if tty and waves:
                members = waves[current].get("hosts", [])
                if current != wave_shown:
                    if bar is not None:  # the wave it showed, as it ended
                        bar.pos = done_in(state, waves[wave_shown].get("hosts", []))
                        bar.render_progress()
                        bar.render_finish()
                    bar = click.progressbar(length=max(len(members), 1),
                                            label=f"wave {current + 1}/{len(waves)}",
                                            file=sys.stderr)
                    wave_shown = current
                assert bar is not None
                bar.pos = done_in(state, members)
                bar.render_progress()
            elif not tty:
                now = (state["status"], current, sorted(host_counts(state).items()),
                       state.get("reason"))
                if now != seen:
                    click.echo(change_line(state), err=True)
                    seen = now
            if state["status"] != "RUNNING":
                return state
            time.sleep(POLL_SECONDS)
    finally:
        if bar is not None:
            bar.render_finish()


@deploy.command(name="start")
@rollout_options
@click.option("--max-disruptions", type=click.IntRange(1), metavar="N",
              help="With --allow-disruption: at most N hosts of a wave are updating (so "
                   "possibly disrupted) at once. A host counts from when the deploy sets its "
                   "image until it is synced (its health check does not count); the wave's "
                   "other hosts wait for a free slot. A rollback is not limited. Default: "
                   "no limit.")
@click.option("--waves", help="Comma-separated wave sizes, e.g. `1,10%,50%,100%`.")
@click.option("--max-failures", default=0, show_default=True, type=click.IntRange(0),
              help="Hosts that may fail before the deploy stops and rolls back.")
@click.option("--health-url", help="Health gate URL template, e.g. http://{host}:8080/healthz.")
@click.option("--health-check", metavar="NAME",
              help="Health gate: a check the dominator allow-lists "
                   "(dominator serve --health-check NAME=COMMAND).")
@click.option("--timeout", type=click.FloatRange(0.1), help="Seconds per health check.")
@click.option("--retries", type=click.IntRange(0), help="Extra health check attempts.")
@click.option("--idempotency-key", help="Reuse to get the same deploy back (default: new).")
@click.option("--wait", is_flag=True,
              help="Follow it; exit 0 only when it SUCCEEDED, 1 when it ended TERMINAL or "
                   "CANCELED.")
@json_option
@url_options
def start_command(image: str, select: str, allow_disruption: bool,
                  max_disruptions: int | None, waves: str | None, max_failures: int,
                  health_url: str | None, health_check: str | None, timeout: float | None,
                  retries: int | None, idempotency_key: str | None, wait: bool,
                  as_json: bool, url: str, token: str | None) -> None:
    """Roll IMAGE out to the selected hosts, wave by wave."""
    body = deploy_body(image, select, waves, max_failures, health_url, health_check,
                       timeout, retries, False, allow_disruption, max_disruptions)
    api = DeployApi(url, token)
    started = api.start(body, idempotency_key or str(uuid.uuid4()))
    if not wait:
        echo_json(started) if as_json else click.echo(f"deploy {started['id']} started")
        return
    final = wait_for(api, started["id"])
    echo_json(final) if as_json else click.echo(outcome_line(started["id"], final))
    sys.exit(outcome_code(final))


def plan_rows(hosts: dict[str, Any]) -> list[list[object]]:
    """One row per host of a dry run: reachable, changes, bytes, triggers, verdict."""
    rows: list[list[object]] = []
    for name, detail in sorted(hosts.items()):
        plan = detail.get("plan")
        if plan is None:
            error = detail.get("error") or detail.get("status", "")
            reached = "no" if error.startswith(Status.UNREACHABLE.value) else "-"
            rows.append([name, reached, "-", "-", "-", "-", "-", "-", f"cannot plan: {error}"])
            continue
        rows.append([name, "yes", plan["added"], plan["replaced"] + plan["metadata"],
                     plan["deleted"], format_bytes(plan["bytesToFetch"]),
                     ",".join(plan["triggers"]) or "-",
                     "yes" if plan.get("disruptive") else "no",
                     f"refused: {plan['wouldStop']}" if plan["wouldStop"]
                     else ("no change" if not plan["changes"]["count"] else "ok")])
    return rows


def plan_code(hosts: dict[str, Any]) -> int:
    """4 when the herd would refuse a host's update, else 3 when a host cannot be
    planned, else 0 (a refusal wins: retrying would not help)."""
    if any((detail.get("plan") or {}).get("wouldStop") for detail in hosts.values()):
        return EXIT_REFUSED
    if any(detail.get("plan") is None for detail in hosts.values()):
        return EXIT_UNAVAILABLE
    return EXIT_OK


@deploy.command(name="plan")
@rollout_options
@json_option
@url_options
def plan_command(image: str, select: str, allow_disruption: bool, as_json: bool, url: str,
                 token: str | None) -> None:
    """What deploying IMAGE would change on each selected host (nothing is changed).

    Per host: whether it could be reached, files to add, change and delete, bytes to
    fetch, triggers to run, whether a HighImpact trigger would fire (disruptive), and
    whether the herd would refuse the update. Exit 0 when every host can be planned
    and none would be refused, 3 when a host cannot be planned (unreachable, no scan
    yet), 4 when a host's update would be refused (too many deletes, HighImpact
    triggers without --allow-disruption, updates disabled, no space)."""
    body = deploy_body(image, select, None, 0, None, None, None, None, True, allow_disruption)
    api = DeployApi(url, token)
    started = api.start(body, str(uuid.uuid4()))
    final = api.status(started["id"])
    while final["status"] == "RUNNING":
        time.sleep(POLL_SECONDS / 4)
        final = api.status(started["id"])
    hosts = final.get("hosts", {})
    if as_json:
        echo_json(hosts)
    else:
        echo_table(["HOST", "REACHABLE", "ADD", "CHANGE", "DELETE", "FETCH", "TRIGGERS",
                    "DISRUPTIVE", "VERDICT"], plan_rows(hosts))
    sys.exit(plan_code(hosts))


@deploy.command(name="list")
@click.option("--status", "status", metavar="S",
              type=click.Choice(STATUSES, case_sensitive=False),
              help="Only deploys of this status: " + ", ".join(STATUSES) + ".")
@click.option("--dry-runs", is_flag=True, help="Also list dry runs (`deploy plan`).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="At most this many, newest first.")
@json_option
@url_options
def list_command(status: str | None, dry_runs: bool, limit: int, as_json: bool, url: str,
                 token: str | None) -> None:
    """Deploys, newest first: id, image, status, wave, when and by whom started."""
    found = DeployApi(url, token).list(status.upper() if status else None,
                                       None if dry_runs else False, limit)
    if as_json:
        echo_json(found)
        return
    echo_table(["ID", "IMAGE", "STATUS", "WAVE", "STARTED", "BY"], [
        [d["id"], d["image"] + (" (dry run)" if d.get("dryRun") else ""), d["status"],
         f"{d.get('wave', '?')}/{d.get('wave_count', '?')}", ago(d.get("createdUnix", 0)),
         d.get("started_by", "")] for d in found])


@deploy.command(name="status")
@click.argument("deploy_id", metavar="ID")
@json_option
@url_options
def status_command(deploy_id: str, as_json: bool, url: str, token: str | None) -> None:
    """A deploy's status, progress and per-host detail. Exit 0 when it SUCCEEDED or
    still runs (it says so), 1 when it ended TERMINAL or CANCELED, or there is no
    deploy of that ID."""
    state = DeployApi(url, token).status(deploy_id)
    if as_json:
        echo_json(state)
    else:
        click.echo(outcome_line(deploy_id, state))
        for host, detail in sorted(state.get("hosts", {}).items()):
            note = detail.get("error") or ""
            click.echo(f"  {host}: {detail.get('status', '')}" + (f" ({note})" if note else ""))
    sys.exit(outcome_code(state))


@deploy.command(name="cancel")
@click.argument("deploy_id", metavar="ID")
@click.option("--rollback", is_flag=True, help="Also put touched hosts back on their image.")
@url_options
def cancel_command(deploy_id: str, rollback: bool, url: str, token: str | None) -> None:
    """Stop a deploy after the hosts in flight; the rest stay untouched."""
    DeployApi(url, token).call("POST", f"/v1/deploys/{deploy_id}/cancel",
                               json={"rollback": rollback})
    click.echo(f"deploy {deploy_id}: cancel requested")
