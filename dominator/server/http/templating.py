"""The dashboard's templates (dominator/templates, found relative to this package)
and the jinja2 filters they format values with."""

from __future__ import annotations

import time
from pathlib import Path

import jinja2
from fastapi.responses import HTMLResponse

from dominator.herd.status import Status

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"  # dominator/templates
REFRESH_SECONDS = 2


def when(unix: float) -> str:
    """UTC date and time, or '-' for never."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) if unix else "-"


def ago(unix: float, now: float | None = None) -> str:
    """How long ago, shortly: '4 s ago', '3 min ago', '2 h ago', '5 d ago'; '-' for never."""
    if not unix:
        return "-"
    seconds = max(0, int((time.time() if now is None else now) - unix))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def size(count: float) -> str:
    """Bytes, readably: '512 B', '4.0 KiB', '1.5 GiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


OK_STATES = {Status.SYNCED.value, "succeeded", "planned", "in sync", "master"}
BUSY_STATES = {Status.POLLING.value, Status.FETCHING.value, Status.UPDATING.value, "running",
               "pending", "checking", "rollingback", "syncing", Status.ELSEWHERE.value}
WARN_STATES = {Status.UPDATES_DISABLED.value, Status.NO_IMAGE.value, Status.LEASE_LOST.value,
               Status.IMAGE_NOT_READY.value, "canceled", "skipped", "rolledback"}


def status_class(status: str) -> str:
    """CSS class of a status badge (a host's, a deploy's, wave's or deploy host's, or an
    image server's replication state):
    its severity, ok, busy, warn or bad."""
    status = status.lower()
    for css, states in (("ok", OK_STATES), ("busy", BUSY_STATES), ("warn", WARN_STATES)):
        if status in states:
            return css
    return "bad"


def make_environment() -> jinja2.Environment:
    """The dashboard's jinja2 environment: every template autoescaped."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(when=when, ago=ago, size=size, status_class=status_class)
    env.globals.update(refresh_seconds=REFRESH_SECONDS, statuses=[s.value for s in Status])
    return env


def render_page(env: jinja2.Environment, request: object, template: str, json_url: str,
                title: str, status_code: int = 200, **values: object) -> HTMLResponse:
    """A dashboard page: `template` in base.html's frame (its nav tab is the
    template's name), never cached."""
    html = env.get_template(template).render(
        request=request, title=title, json_url=json_url, now=time.time(),
        nav=template.split(".")[0], **values)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})
