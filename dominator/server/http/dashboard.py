"""The dominator's dashboard: server-rendered HTML (jinja2, autoescaped, no build
step, nothing fetched from elsewhere) over the herd, the state store, the image
server and the deploy engine. Read-only and open: no token (the deploy API under
/v1 is what needs one).

Pages, each with a JSON twin at the same path plus `.json`:
  /                   fleet overview                  (twin: /index.json)
  /hosts              host table; ?status=S (repeatable or comma-separated),
                      ?q=TEXT, ?image=NAME, ?compliant=yes|no,
                      ?unreachable=minute|hour|day, ?sort=[-]KEY
  /hosts/HOST         one host: status history, last update, intrusions
  /images, /images/NAME
  /deploys, /deploys/ID
A name that itself ends in `.json` (a host `web.json`) keeps its HTML page at
that path; its twin is then `/hosts/web.json.json`.

Pages refresh themselves: a few lines of inline script fetch the same URL every
2 s and swap the `#live` part (a `<noscript>` meta refresh does it without script).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

import grpc
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from dominator.deploy.views import deploy_summary, relative_view
from dominator.herd.herd import Sub
from dominator.herd.records import HostRecord
from dominator.herd.status import Status, SubReport
from dominator.server.http.context import HttpContext
from dominator.server.http.templating import make_environment, render_page
from fleetlib.errors import FleetError
from fleetlib.fstree.image import Image
from fleetlib.fstree.listing import quote
from fleetlib.fstree.tree import Kind
from fleetlib.rpc.status import describe_rpc_error
from imageserver.client import ImageServerClient

WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
LIVE_POLL_TIMEOUT = 2.0
LISTING_TTL = 5.0
LARGEST_FILES = 10
IMAGE_DETAILS_KEPT = 64
MAX_DEPLOY_HOSTS = 2000  # rows a deploy page lists
DEPLOYS_LISTED = 100

# /hosts?sort=KEY: the column each key sorts by (ties broken by hostname).
SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "hostname": lambda h: h["hostname"],
    "status": lambda h: h["status"],
    "address": lambda h: h["address"],
    "required": lambda h: h["required_image"],
    "planned": lambda h: h["planned_image"],
    "current": lambda h: h["current_image"],
    "last_poll": lambda h: h["last_poll_unix"],
    "last_scan": lambda h: h["last_scan_unix"],
    "last_sync": lambda h: h["last_sync_unix"],
    "last_error": lambda h: h["last_error"],
}
SORT_ALIASES = {"required_image": "required", "planned_image": "planned",
                "current_image": "current", "host": "hostname", "error": "last_error"}
YES, NO = {"1", "yes", "true", "on"}, {"0", "no", "false", "off"}


# The per-host view.

def unreachable_within(sub: Sub, now: float) -> dict[str, bool]:
    """Whether the sub was unreachable at any time in the last minute, hour and day,
    from its status transitions (history keeps the last 50)."""
    events = list(sub.history)
    spells = []  # (start, end) of each unreachable spell
    for index, (unix, status, _) in enumerate(events):
        if status == Status.UNREACHABLE.value:
            end = events[index + 1][0] if index + 1 < len(events) else now
            spells.append((unix, end))
    if sub.status == Status.UNREACHABLE and not spells:
        spells.append((now, now))
    return {name: any(end >= now - seconds for _, end in spells)
            for name, seconds in WINDOWS.items()}


def host_view(sub: Sub, record: HostRecord, now: float) -> dict[str, Any]:
    """One host as the dashboard shows it: `dominator fleet list --json`'s fields
    (its SubReport) plus tags, compliance, reachability and events."""
    view = SubReport.of(sub, record).to_json()
    machine = sub.machine
    view["intrusion_paths"] = [quote(path) for path in view["intrusion_paths"]]
    view["tags"] = dict(machine.tags)
    view["owner_group"] = machine.owner_group
    view["compliant"] = (sub.status == Status.SYNCED
                         and view["current_image"] == machine.required_image != "")
    view["unreachable_within"] = unreachable_within(sub, now)
    view["events"] = [{"unix": unix, "status": status, "error": error}
                      for unix, status, error in sub.history]
    view["url"] = f"/hosts/{machine.hostname}"
    return view


async def host_views(ctx: HttpContext) -> list[dict[str, Any]]:
    """Every host of the herd, by hostname (state store records read off the loop)."""
    subs = sorted(ctx.herd.subs.items())
    names = [name for name, _ in subs]
    records = await asyncio.to_thread(lambda: {name: ctx.state.host(name) for name in names})
    now = time.time()
    return [host_view(sub, records.get(name) or HostRecord(), now) for name, sub in subs]


# The overview.

def image_counts(hosts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per image named anywhere in the fleet: hosts requiring, planning and holding it."""
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        return rows.setdefault(name, {"image": name, "required": 0, "planned": 0,
                                      "current": 0, "compliant": 0,
                                      "url": f"/images/{name}"})
    for host in hosts:
        if host["required_image"]:
            row(host["required_image"])["required"] += 1
            if host["compliant"]:
                row(host["required_image"])["compliant"] += 1
        if host["planned_image"]:
            row(host["planned_image"])["planned"] += 1
        if host["current_image"]:
            row(host["current_image"])["current"] += 1
    return [rows[name] for name in sorted(rows)]


def imageservers_view(ctx: HttpContext) -> dict[str, Any]:
    """The image servers hosts fetch from, as `dominator image replicas --json` lists
    them (the last walk of the master's replicas, refreshed in the background), each
    with the fetches in flight on it and waiting for it; the servers given by hand;
    and why no replicas are known ("" when they are)."""
    servers = ctx.herd.servers
    tree = servers.known()
    slots = ctx.herd.server_slots
    rows = [{**row.to_json(), "fetches_in_flight": slots.in_flight[row.address],
             "fetches_waiting": slots.waiting[row.address]}
            for row in (tree.rows if tree is not None else [])]
    return {"master": servers.master, "servers": rows, "given": servers.others,
            "unreachable": [{"address": address, "error": error} for address, error
                            in sorted((tree.unreachable if tree is not None else {}).items())],
            "error": servers.replication_error,
            "fetch_cap": slots.cap}


async def overview(ctx: HttpContext) -> dict[str, Any]:
    """The fleet at a glance."""
    hosts = await host_views(ctx)
    disabled = await asyncio.to_thread(ctx.state.updates_disabled)
    by_status = collections.Counter(host["status"] for host in hosts)
    compliant = sum(1 for host in hosts if host["compliant"])
    intrusions = [{"hostname": h["hostname"], "paths": h["intrusion_paths"],
                   "unix": h["intrusion_unix"], "url": h["url"]}
                  for h in hosts if h["intrusion_paths"]]
    deploys = await deploy_summaries(ctx, 10)
    return {
        "generated_unix": time.time(),
        "hosts": len(hosts),
        "by_status": {status.value: by_status[status.value] for status in Status
                      if by_status[status.value]},
        "compliant": compliant,
        "deviant": len(hosts) - compliant,
        "unreachable": {"now": by_status[Status.UNREACHABLE.value],
                        **{name: sum(1 for h in hosts if h["unreachable_within"][name])
                           for name in WINDOWS}},
        "intrusions": intrusions,
        "by_image": image_counts(hosts),
        "updates_disabled": None if disabled is None else {
            "by": disabled.by, "reason": disabled.reason, "unix": disabled.unix},
        "diff_cache": {"hits": ctx.herd.cache.hits, "misses": ctx.herd.cache.misses},
        "imageservers": imageservers_view(ctx),
        "deploy_engine": deploys is not None,
        "deploys": deploys or [],
    }


# The host table.

def _flag(params: Any, name: str) -> bool | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value.lower() in YES:
        return True
    if value.lower() in NO:
        return False
    raise HTTPException(400, f"{name} must be yes or no, not {value!r}")


def table_query(params: Any) -> dict[str, Any]:
    """The /hosts query: filters and sort, validated (400 on a bad one)."""
    statuses = [s.strip() for value in params.getlist("status") for s in value.split(",")
                if s.strip()]
    known = {status.value for status in Status}
    for status in statuses:
        if status not in known:
            raise HTTPException(400, f"unknown status {status!r}; one of: "
                                + ", ".join(sorted(known)))
    sort = params.get("sort") or "hostname"
    key = sort.lstrip("-")
    key = SORT_ALIASES.get(key, key)
    if key not in SORT_KEYS:
        raise HTTPException(400, f"unknown sort key {sort!r}; one of: "
                            + ", ".join(SORT_KEYS) + " (prefix - for descending)")
    unreachable = params.get("unreachable") or ""
    if unreachable and unreachable not in WINDOWS:
        raise HTTPException(400, "unreachable must be one of: " + ", ".join(WINDOWS))
    return {"status": statuses, "q": (params.get("q") or "").strip(),
            "image": (params.get("image") or "").strip(), "compliant": _flag(params, "compliant"),
            "unreachable": unreachable,
            "sort": ("-" if sort.startswith("-") else "") + key}


def _matches(host: dict[str, Any], query: dict[str, Any]) -> bool:
    if query["status"] and host["status"] not in query["status"]:
        return False
    if query["image"] and query["image"] not in (host["required_image"], host["planned_image"],
                                                 host["current_image"]):
        return False
    if query["compliant"] is not None and host["compliant"] != query["compliant"]:
        return False
    if query["unreachable"] and not host["unreachable_within"][query["unreachable"]]:
        return False
    if query["q"]:
        text = " ".join([host["hostname"], host["address"], host["status"],
                         host["required_image"], host["planned_image"], host["current_image"],
                         host["last_error"], host["owner_group"],
                         *(f"{k}={v}" for k, v in host["tags"].items())]).lower()
        return query["q"].lower() in text
    return True


def sort_links(query: dict[str, Any]) -> dict[str, str]:
    """Per sort key, the /hosts URL keeping the filters and sorting by that key
    (the current sort key's link reverses the order)."""
    kept = [("status", status) for status in query["status"]]
    kept += [(name, query[name]) for name in ("q", "image", "unreachable") if query[name]]
    if query["compliant"] is not None:
        kept.append(("compliant", "yes" if query["compliant"] else "no"))
    return {key: "/hosts?" + urlencode([*kept, ("sort", "-" + key if query["sort"] == key
                                                  else key)])
            for key in SORT_KEYS}


def filter_and_sort(hosts: list[dict[str, Any]], query: dict[str, Any]) -> list[dict[str, Any]]:
    """The hosts the query selects, in its order (hostname breaks ties)."""
    chosen = sorted((h for h in hosts if _matches(h, query)), key=lambda h: h["hostname"])
    key = query["sort"].lstrip("-")
    return sorted(chosen, key=SORT_KEYS[key], reverse=query["sort"].startswith("-"))


# Images.

class ImageListing:
    """The image server's list of images, asked for at most every few seconds."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self._client: ImageServerClient | None = None
        self._listed: tuple[float, dict[str, dict[str, Any]], str] | None = None
        self._details: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def _list(self) -> dict[str, dict[str, Any]]:
        if self._client is None:
            self._client = ImageServerClient(self.ctx.images.address, self.ctx.images.security)
        return {s.name: {"name": s.name, "created_unix": s.created_unix,
                         "expires_unix": s.expires_unix, "inodes": s.inodes,
                         "total_bytes": s.total_bytes}
                for s in self._client.list_images()}

    async def stored(self) -> tuple[dict[str, dict[str, Any]], str]:
        """Image summaries by name, and an error text when the server did not answer."""
        now = time.monotonic()
        if self._listed is None or now - self._listed[0] > LISTING_TTL:
            try:
                self._listed = (now, await asyncio.to_thread(self._list), "")
            except grpc.RpcError as err:
                known = self._listed[1] if self._listed else {}
                self._listed = (now, known, f"image server: {describe_rpc_error(err)}")
        return self._listed[1], self._listed[2]

    def details(self, image: Image) -> dict[str, Any]:
        """What an image page shows of an image (kept: images are immutable)."""
        kept = self._details.get(image.name)
        if kept is not None:
            self._details.move_to_end(image.name)
            return kept
        files = {}  # inode number -> (first path, inode): a hard link counts once
        for path, ino, inode in image.tree.walk():
            if inode.kind == Kind.REGULAR and inode.size and ino not in files:
                files[ino] = (path, inode)
        largest = sorted(files.values(), key=lambda item: item[1].size,
                         reverse=True)[:LARGEST_FILES]
        kinds = collections.Counter(inode.kind.name.lower().replace("_", " ")
                                    for inode in image.tree.inodes.values())
        details = {
            "name": image.name, "created_unix": image.created_unix,
            "expires_unix": image.expires_unix, "inodes": len(image.tree.inodes),
            "kinds": dict(sorted(kinds.items())), "total_bytes": image.tree.total_bytes(),
            "objects": len(image.tree.object_sizes()),
            "filter": None if image.filter is None else list(image.filter.lines),
            "triggers": [{"service": t.service, "match_lines": list(t.match_lines),
                          "reload": t.do_reload, "reboot": t.do_reboot,
                          "high_impact": t.high_impact} for t in image.triggers],
            "computed_files": [{"path": quote(c.path), "source": c.source}
                               for c in image.computed_files],
            "largest_files": [{"path": quote(path), "size": inode.size, "mode": inode.mode}
                              for path, inode in largest],
        }
        self._details[image.name] = details
        while len(self._details) > IMAGE_DETAILS_KEPT:
            self._details.popitem(last=False)
        return details


# Deploys (the deploy engine, when the context has one: ctx.deploys).

async def deploy_summaries(ctx: HttpContext,
                           limit: int = DEPLOYS_LISTED) -> list[dict[str, Any]] | None:
    """The newest deploys (the deploy API's list lines, plus a dashboard link);
    None without a deploy engine."""
    engine = ctx.deploys
    if engine is None:
        return None
    return [{**deploy_summary(deploy, f"/v1/deploys/{deploy.id}"), "url": f"/deploys/{deploy.id}"}
            for deploy in await engine.newest(limit)]


async def deploy_detail(ctx: HttpContext, deploy_id: str) -> dict[str, Any] | None:
    """One deploy as the deploy API shows it, each wave with its progress; None when
    unknown."""
    engine = ctx.deploys
    if engine is None:
        return None
    try:
        deploy = await engine.lookup(deploy_id)
    except FleetError:  # the engine's UnknownDeploy
        return None
    view = relative_view(deploy)
    hosts = view["hosts"]
    for wave in view["waves"]:
        states = collections.Counter(hosts[name]["status"] for name in wave["hosts"]
                                     if name in hosts)
        wave["counts"] = dict(sorted(states.items()))
        done = states["succeeded"] + states["planned"]
        wave["percent"] = done * 100 // len(wave["hosts"]) if wave["hosts"] else 100
    return view


# Live data from a sub (the host page).

async def live_status(sub: Sub) -> dict[str, Any] | None:
    """What the sub says right now (a short poll over the herd's connection): its last
    update, fetch and scan; None before the herd has connected to it."""
    client = sub.client
    if client is None:
        return None
    try:
        status, _ = await client.poll(short=True, timeout=LIVE_POLL_TIMEOUT)
    except grpc.RpcError as err:
        return {"error": describe_rpc_error(err)}
    update, fetch = status.last_update, status.fetch
    return {
        "generation": status.generation, "scan_count": status.scan_count,
        "last_scan_seconds": status.last_scan_ns / 1e9, "last_scan_unix": status.last_scan_unix,
        "inodes": status.inodes, "free_bytes": status.free_bytes,
        "cached_objects": status.cached_objects, "is_root": status.is_root,
        "last_successful_image": status.last_successful_image,
        "start_error": status.start_error,
        "fetch": {"in_progress": fetch.in_progress, "objects_total": fetch.objects_total,
                  "objects_done": fetch.objects_done, "bytes_total": fetch.bytes_total,
                  "bytes_done": fetch.bytes_done,
                  "bytes_copied_locally": fetch.bytes_copied_locally, "error": fetch.error},
        "last_update": {"in_progress": update.in_progress, "image_name": update.image_name,
                        "success": update.success, "error": update.error,
                        "finished_unix": update.finished_unix,
                        "change_window_ms": update.change_window_ns / 1e6,
                        "paths_changed": update.paths_changed,
                        "triggers_run": list(update.triggers_run),
                        "warnings": list(update.warnings)},
    }


# The routes.

def _json_name(name: str, exists: Callable[[str], bool]) -> tuple[str, bool]:
    """(name, whether the JSON twin is asked for): a `.json` suffix asks for the twin,
    unless the name with the suffix is itself what exists."""
    if name.endswith(".json") and not exists(name):
        return name[:-len(".json")], True
    return name, False


def dashboard_router(ctx: HttpContext) -> APIRouter:
    """Every dashboard page and its JSON twin."""
    env = make_environment()
    listing = ImageListing(ctx)
    router = APIRouter(include_in_schema=False)

    def page(request: Request, template: str, json_url: str, title: str,
             status_code: int = 200, **values: Any) -> HTMLResponse:
        return render_page(env, request, template, json_url, title, status_code, **values)

    def missing(request: Request, as_json: bool, message: str) -> Response:
        if as_json:
            return JSONResponse({"error": message}, status_code=404)
        return page(request, "error.html", "", "Not found", status_code=404, message=message)

    @router.get("/")
    async def overview_page(request: Request) -> Response:
        return page(request, "overview.html", "/index.json", "Fleet overview",
                    data=await overview(ctx))

    @router.get("/index.json")
    async def overview_json() -> dict[str, Any]:
        return await overview(ctx)

    async def hosts_data(request: Request) -> dict[str, Any]:
        query = table_query(request.query_params)
        everyone = await host_views(ctx)
        shown = filter_and_sort(everyone, query)
        return {"total": len(everyone), "shown": len(shown), "query": query, "hosts": shown}

    @router.get("/hosts")
    async def hosts_page(request: Request) -> Response:
        data = await hosts_data(request)
        suffix = f"?{request.url.query}" if request.url.query else ""
        return page(request, "hosts.html", f"/hosts.json{suffix}", "Hosts", data=data,
                    sort_links=sort_links(data["query"]))

    @router.get("/hosts.json")
    async def hosts_json(request: Request) -> dict[str, Any]:
        return await hosts_data(request)

    @router.get("/hosts/{hostname}")
    async def host_page(request: Request, hostname: str) -> Response:
        hostname, as_json = _json_name(hostname, lambda name: name in ctx.herd.subs)
        sub = ctx.herd.subs.get(hostname)
        if sub is None:
            return missing(request, as_json, f"unknown host {hostname}")
        record = await asyncio.to_thread(ctx.state.host, hostname)
        data = host_view(sub, record, time.time())
        data["generation"] = sub.generation
        data["live"] = await live_status(sub)
        if as_json:
            return JSONResponse(data)
        return page(request, "host.html", f"/hosts/{hostname}.json", hostname, host=data)

    async def images_data() -> dict[str, Any]:
        stored, error = await listing.stored()
        counts = {row["image"]: row for row in image_counts(await host_views(ctx))}
        images = []
        for name in sorted(set(stored) | set(counts)):
            row = counts.get(name) or {"image": name, "required": 0, "planned": 0,
                                       "current": 0, "compliant": 0}
            images.append({**row, "url": f"/images/{name}", "stored": name in stored,
                           **{k: v for k, v in stored.get(name, {}).items() if k != "name"}})
        return {"images": images, "error": error}

    @router.get("/images")
    async def images_page(request: Request) -> Response:
        return page(request, "images.html", "/images.json", "Images",
                    data=await images_data())

    @router.get("/images.json")
    async def images_json() -> dict[str, Any]:
        return await images_data()

    @router.get("/images/{name:path}")
    async def image_page(request: Request, name: str) -> Response:
        stored, _ = await listing.stored()
        hosts = await host_views(ctx)
        referenced = {n for h in hosts
                      for n in (h["required_image"], h["planned_image"], h["current_image"])}
        name, as_json = _json_name(name, lambda n: n in stored or n in referenced)
        try:
            image = await ctx.images.get(name)
        except grpc.RpcError:
            image = None  # a name the image server refuses, or the server is away
        users = [h for h in hosts
                 if name in (h["required_image"], h["planned_image"], h["current_image"])]
        if image is None and not users:
            return missing(request, as_json, f"unknown image {name}")
        data = {"name": name, "stored": image is not None,
                "details": listing.details(image) if image is not None else None,
                "counts": next((r for r in image_counts(users) if r["image"] == name), None),
                "hosts": users}
        if as_json:
            return JSONResponse(data)
        return page(request, "image.html", f"/images/{name}.json", f"Image {name}", image=data)

    @router.get("/deploys")
    async def deploys_page(request: Request) -> Response:
        return page(request, "deploys.html", "/deploys.json", "Deploys",
                    deploys=await deploy_summaries(ctx))

    @router.get("/deploys.json")
    async def deploys_json() -> dict[str, Any]:
        deploys = await deploy_summaries(ctx)
        return {"deploy_engine": deploys is not None, "deploys": deploys or []}

    @router.get("/deploys/{deploy_id}")
    async def deploy_page(request: Request, deploy_id: str) -> Response:
        as_json = deploy_id.endswith(".json")  # ids are hex: never a .json of their own
        deploy_id = deploy_id.removesuffix(".json")
        if ctx.deploys is None:
            return missing(request, as_json, "no deploy engine in this dominator")
        deploy = await deploy_detail(ctx, deploy_id)
        if deploy is None:
            return missing(request, as_json, f"unknown deploy {deploy_id}")
        if as_json:
            return JSONResponse(deploy)
        return page(request, "deploy.html", f"/deploys/{deploy_id}.json",
                    f"Deploy {deploy_id}", deploy=deploy, max_hosts=MAX_DEPLOY_HOSTS)

    return router
