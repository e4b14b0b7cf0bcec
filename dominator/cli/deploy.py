"""`dominator deploy ...`: the deploy stage from a terminal (the same HTTP API a
pipeline calls): start a rollout in waves, watch it, cancel it, or plan it."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import click
import httpx

from dominator.cli.options import json_option
from fleetlib.cli.display import echo_json
from fleetlib.errors import FleetError

POLL_SECONDS = 1.0


def url_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--url and --token, from DOMINATOR_URL and DOMINATOR_TOKEN."""
    func = click.option("--token", envvar="DOMINATOR_TOKEN", show_envvar=True,
                        help="Bearer token of the dominator's HTTP API.")(func)
    return click.option("--url", envvar="DOMINATOR_URL", show_envvar=True,
                        default="http://localhost:6980", show_default=True,
                        help="The dominator's HTTP API.")(func)


def parse_selector(text: str) -> dict[str, Any]:
    """`all`, `tags:K=V,K2=V2`, or `host-1,host-2` -> the API's `select` object."""
    text = text.strip()
    if text == "all":
        return {"all": True}
    if text.startswith("tags:"):
        tags = {}
        for pair in text[len("tags:"):].split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise FleetError(f"--select {text!r}: tags are KEY=VALUE pairs")
            tags[key.strip()] = value.strip()
        return {"tags": tags}
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise FleetError("--select: give `all`, `tags:K=V,...` or host names")
    return {"hosts": hosts}


class DeployApi:
    """The deploy stage API over HTTP; FleetError carries the server's message."""

    def __init__(self, url: str, token: str | None) -> None:
        if not token:
            raise FleetError("no API token: pass --token or set DOMINATOR_TOKEN")
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=30,
                                   headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; FleetError for transport failures and error statuses."""
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise FleetError(f"cannot reach {self.client.base_url}: {err}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise FleetError(f"HTTP {response.status_code}: {message}")
        return response

    def start(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        """POST a deploy; its {"id", "status", "statusUrl"}."""
        started: dict[str, Any] = self.call("POST", "/v1/deploys", json=body,
                                            headers={"Idempotency-Key": key}).json()
        return started

    def status(self, deploy_id: str) -> dict[str, Any]:
        """GET a deploy's state."""
        state: dict[str, Any] = self.call("GET", f"/v1/deploys/{deploy_id}").json()
        return state


def deploy_body(image: str, select: str, waves: str | None, max_failures: int,
                health_url: str | None, health_check: str | None, timeout: float | None,
                retries: int | None, dry_run: bool) -> dict[str, Any]:
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
    return body


@click.group(name="deploy")
def deploy() -> None:
    """Roll images out in waves with health gates (the pipeline deploy stage)."""


def rollout_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `start` and `plan` share."""
    for option in reversed([
        click.argument("image"),
        click.option("--select", "select", required=True,
                     help="Hosts: `all`, `tags:KEY=VALUE,...`, or `host-1,host-2`."),
    ]):
        func = option(func)
    return func


def wait_for(api: DeployApi, deploy_id: str) -> dict[str, Any]:
    """Follow a deploy with a progress bar per wave until it ends; its last state."""
    bar = None
    wave_shown = -1
    try:
        while True:
            state = api.status(deploy_id)
            waves = state.get("waves") or []
            current = next((i for i, w in enumerate(waves)
                            if w.get("status") not in ("SUCCEEDED", "DONE")), len(waves) - 1)
            if waves and current != wave_shown and sys.stderr.isatty():
                if bar is not None:
                    bar.render_finish()
                wave = waves[current]
                bar = click.progressbar(length=max(len(wave.get("hosts", [])), 1),
                                        label=f"wave {current + 1}/{len(waves)}",
                                        file=sys.stderr)
                wave_shown = current
            if bar is not None and waves:
                done = sum(1 for h in waves[current].get("hosts", [])
                           if (state.get("hosts", {}).get(h, {}) or {}).get("status")
                           in ("synced", "healthy", "succeeded"))
                bar.pos = done
                bar.render_progress()
            if not sys.stderr.isatty():
                click.echo(f"{state['status']}: {state.get('progress', '')}", err=True)
            if state["status"] != "RUNNING":
                return state
            time.sleep(POLL_SECONDS)
    finally:
        if bar is not None:
            bar.render_finish()


@deploy.command(name="start")
@rollout_options
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
@click.option("--wait", is_flag=True, help="Follow it; exit 0 only when it SUCCEEDED.")
@json_option
@url_options
def start_command(image: str, select: str, waves: str | None, max_failures: int,
                  health_url: str | None, health_check: str | None, timeout: float | None,
                  retries: int | None, idempotency_key: str | None, wait: bool,
                  as_json: bool, url: str, token: str | None) -> None:
    """Roll IMAGE out to the selected hosts, wave by wave."""
    api = DeployApi(url, token)
    body = deploy_body(image, select, waves, max_failures, health_url, health_check,
                       timeout, retries, dry_run=False)
    started = api.start(body, idempotency_key or str(uuid.uuid4()))
    if not wait:
        echo_json(started) if as_json else click.echo(f"deploy {started['id']} started")
        return
    final = wait_for(api, started["id"])
    if as_json:
        echo_json(final)
    else:
        click.echo(f"deploy {started['id']}: {final['status']}: {final.get('progress', '')}"
                   + (f" ({final['reason']})" if final.get("reason") else ""))
    sys.exit(0 if final["status"] == "SUCCEEDED" else 1)


@deploy.command(name="plan")
@rollout_options
@json_option
@url_options
def plan_command(image: str, select: str, as_json: bool, url: str, token: str | None) -> None:
    """What deploying IMAGE would change on each selected host (nothing is changed)."""
    api = DeployApi(url, token)
    body = deploy_body(image, select, None, 0, None, None, None, None, dry_run=True)
    started = api.start(body, str(uuid.uuid4()))
    final = api.status(started["id"])
    while final["status"] == "RUNNING":
        time.sleep(POLL_SECONDS / 4)
        final = api.status(started["id"])
    if as_json:
        echo_json(final.get("hosts", {}))
        return
    for host, detail in sorted(final.get("hosts", {}).items()):
        plan = detail.get("plan", detail)
        click.echo(f"{host}: {json.dumps(plan, sort_keys=True)}")


@deploy.command(name="status")
@click.argument("deploy_id", metavar="ID")
@json_option
@url_options
def status_command(deploy_id: str, as_json: bool, url: str, token: str | None) -> None:
    """A deploy's status, progress and per-host detail."""
    state = DeployApi(url, token).status(deploy_id)
    if as_json:
        echo_json(state)
        return
    click.echo(f"{state['status']}: {state.get('progress', '')}"
               + (f" ({state['reason']})" if state.get("reason") else ""))
    for host, detail in sorted(state.get("hosts", {}).items()):
        click.echo(f"  {host}: {detail.get('status', '')}")


@deploy.command(name="cancel")
@click.argument("deploy_id", metavar="ID")
@click.option("--rollback", is_flag=True, help="Also put touched hosts back on their image.")
@url_options
def cancel_command(deploy_id: str, rollback: bool, url: str, token: str | None) -> None:
    """Stop a deploy after the hosts in flight; the rest stay untouched."""
    DeployApi(url, token).call("POST", f"/v1/deploys/{deploy_id}/cancel",
                               json={"rollback": rollback})
    click.echo(f"deploy {deploy_id}: cancel requested")
