"""Issue 11's dashboard figure: the host table of 10,000 hosts, one page at a time,
rendered in under 200 ms on the server. The herd's view is built in-process (real
Sub, Machine and HostRecord objects, `fleetlib/testing/herdview.py`) and every page
goes through the dominator's real HTTP application (httpx's ASGI transport: no
socket, the client's own overhead included). Against the old full table: every
host's view rendered into one page, as /hosts did before it paged."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import click
import httpx
from starlette.datastructures import QueryParams

from bench.timing import RESULTS, Report
from dominator.server.http.context import HttpContext
from dominator.server.http.dashboard import (
    PER_PAGE,
    fleet_entries,
    host_views,
    paging,
    sort_links,
    table_query,
)
from dominator.server.http.templating import make_environment, render_page
from fleetlib.testing.herdview import dashboard_app, many_hosts

GOAL_MS = 200.0


def percentiles(times: list[float]) -> dict[str, float]:
    """p50 and p95 of `times` (seconds), in ms."""
    ordered = sorted(times)
    return {"p50": statistics.median(ordered) * 1000,
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000}


def full_table(ctx: HttpContext) -> int:
    """The old /hosts: every host's view built and rendered in one page (its size)."""
    env = make_environment()
    query = table_query(QueryParams(), None)
    entries = fleet_entries(ctx)
    data = {"total": len(entries), "shown": len(entries), "query": query,
            "paging": paging(query, len(entries)), "hosts": host_views(entries)}
    page = render_page(env, None, "hosts.html", "/hosts.json", "Hosts", data=data,
                       sort_links=sort_links(query), page_links=[], per_page_choices=())
    return len(page.body)


async def measure(hosts: int, runs: int, peer_runs: int) -> tuple[Report, dict[str, object]]:
    """Time each page `runs` times (the full table `peer_runs` times)."""
    subs, records = many_hosts(hosts)
    app = dashboard_app(subs, records)
    ctx: HttpContext = app.state.context
    last = -(-hosts // PER_PAGE)
    cases = {
        "page 1": "/hosts",
        "filtered page": "/hosts?status=synced&q=web&page=2",
        "sorted last page": f"/hosts?sort=last_poll&desc=yes&page={last}",
        "overview": "/",
        "JSON page": "/hosts.json?page=2&sort=-status",
    }
    raw: dict[str, object] = {"hosts": hosts, "runs": runs, "urls": cases}
    figures: dict[str, dict[str, float]] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
        for what, url in cases.items():
            reply = await client.get(url)  # warm: templates compiled, search texts kept
            assert reply.status_code == 200, (url, reply.text[:300])
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                reply = await client.get(url)
                times.append(time.perf_counter() - started)
            figures[what] = {**percentiles(times), "bytes": len(reply.content)}
        started = time.perf_counter()
        everything = await client.get("/hosts.json")  # the twin's default: every host
        figures["JSON, every host"] = {"p50": (time.perf_counter() - started) * 1000,
                                       "p95": 0.0, "bytes": len(everything.content)}
    peer = []
    for _ in range(peer_runs):
        started = time.perf_counter()
        size = full_table(ctx)
        peer.append(time.perf_counter() - started)
    figures["old full table"] = {**percentiles(peer), "bytes": size}
    raw["figures"] = figures
    report = Report("dashboard")
    old = figures["old full table"]["p50"]
    for what in cases:
        report.add(f"{what} p95 (ms)", figures[what]["p95"], "goal", GOAL_MS, 1.0, "ms")
    for what in ("page 1", "sorted last page"):
        report.add(f"{what} p50 vs full table (ms)", figures[what]["p50"], "old full table",
                   old, 1.0, "ms")
    return report, raw


@click.command()
@click.option("--hosts", default=10_000, show_default=True, help="Hosts in the herd's view.")
@click.option("--runs", default=50, show_default=True, help="Requests per page timed.")
@click.option("--peer-runs", default=5, show_default=True,
              help="Renders of the old full table timed.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def main(hosts: int, runs: int, peer_runs: int, as_json: bool) -> None:
    """The dashboard's host table and overview at HOSTS hosts: p50/p95 per page."""
    report, raw = asyncio.run(measure(hosts, runs, peer_runs))
    figures = json.dumps({"rows": report.rows, "raw": raw}, indent=2)
    if as_json:
        click.echo(figures)
    else:
        print(f"\n{hosts:,} hosts, {runs} requests per page")
        print(f"{'page':22} {'p50 ms':>9} {'p95 ms':>9} {'bytes':>10}")
        for what, row in raw["figures"].items():  # type: ignore[union-attr]
            print(f"{what:22} {row['p50']:9.1f} {row['p95']:9.1f} {int(row['bytes']):10,}")
        report.print()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dashboard.json").write_text(figures)


if __name__ == "__main__":
    main()
