"""Issue 11's dashboard figure: the host table of 10,000 hosts, one page at a time,
rendered in under 200 ms on the server. The herd's view is built in-process (real
Sub, Machine and HostRecord objects, `bench/herdview.py`) and every page
goes through the dominator's real HTTP application (httpx's ASGI transport: no
socket, the client's own overhead included), timed on the wall clock and in CPU
(this thread's: on a shared machine the wall clock also counts waiting for a core).
Against the old full table: every host's view rendered into one page, as /hosts did
before it paged."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import click
import httpx
from starlette.datastructures import QueryParams

from bench.herdview import dashboard_app, many_hosts
from bench.timing import RESULTS, Report
from dominator.server.http.context import HttpContext
from dominator.server.http.dashboard import (
    PER_PAGE,
    HostMemo,
    host_views,
    paging,
    sort_links,
    table_query,
)
from dominator.server.http.templating import make_environment, render_page

GOAL_MS = 200.0


def percentiles(times: list[float], cpu: list[float]) -> dict[str, float]:
    """p50 and p95 of wall `times` and of `cpu` times (seconds), in ms."""
    def at(values: list[float], share: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000
    return {"p50": at(times, 0.5), "p95": at(times, 0.95),
            "cpu_p50": at(cpu, 0.5), "cpu_p95": at(cpu, 0.95)}


def clocked(action: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU (this thread's) seconds of `action`."""
    wall, cpu = time.perf_counter(), time.thread_time()
    action()
    return time.perf_counter() - wall, time.thread_time() - cpu


def full_table(ctx: HttpContext) -> int:
    """The old /hosts: every host's view built and rendered in one page (its size)."""
    env = make_environment()
    query = table_query(QueryParams(), None)
    entries = HostMemo().entries(ctx)
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
            times, cpu = [], []
            for _ in range(runs):
                wall, used = time.perf_counter(), time.thread_time()
                reply = await client.get(url)
                times.append(time.perf_counter() - wall)
                cpu.append(time.thread_time() - used)
            figures[what] = {**percentiles(times, cpu), "bytes": len(reply.content)}
        wall, used = time.perf_counter(), time.thread_time()
        everything = await client.get("/hosts.json")  # the twin's default: every host
        figures["JSON, every host"] = {**percentiles([time.perf_counter() - wall],
                                                     [time.thread_time() - used]),
                                       "bytes": len(everything.content)}
    sizes = []
    peer = [clocked(lambda: sizes.append(full_table(ctx))) for _ in range(peer_runs)]
    figures["old full table"] = {**percentiles([w for w, _ in peer], [c for _, c in peer]),
                                 "bytes": sizes[-1]}
    raw["figures"] = figures
    report = Report("dashboard")
    old = figures["old full table"]["p50"]
    for what in cases:
        report.add(f"{what} p95", figures[what]["p95"], "goal", GOAL_MS, 1.0, "ms")
        report.add(f"{what} CPU p95", figures[what]["cpu_p95"], "goal", GOAL_MS, 1.0, "ms")
    for what in ("page 1", "sorted last page"):
        report.add(f"{what} p50 vs full table", figures[what]["p50"], "old full table",
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
        print(f"{'page':18} {'p50 ms':>8} {'p95 ms':>8} {'CPU p50':>8} {'CPU p95':>8} "
              f"{'bytes':>11}")
        for what, row in raw["figures"].items():  # type: ignore[union-attr]
            print(f"{what:18} {row['p50']:8.1f} {row['p95']:8.1f} {row['cpu_p50']:8.1f} "
                  f"{row['cpu_p95']:8.1f} {int(row['bytes']):11,}")
        report.print()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dashboard.json").write_text(figures)


if __name__ == "__main__":
    main()
