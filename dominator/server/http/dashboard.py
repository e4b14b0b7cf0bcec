"""The dominator's dashboard: server-rendered HTML (jinja2, autoescaped, no build
step, nothing fetched from elsewhere) over the herd, the state store, the image
server and the deploy engine. Read-only and open: no token (the deploy API under
/v1 is what needs one).

Pages, each with a JSON twin at the same path plus `.json`:
  /                   fleet overview: counts, no host rows (twin: /index.json)
  /hosts              host table, one page at a time; ?status=S (repeatable or
                      comma-separated), ?q=TEXT, ?image=NAME, ?compliant=yes|no,
                      ?intrusion=yes|no, ?unreachable=minute|hour|day,
                      ?sort=[-]KEY (&desc=yes: descending too), ?page=N,
                      ?per_page=N (100, at most 1000). /hosts.json takes the same
                      and lists every matching host unless page or per_page is given.
  /hosts/HOST         one host: status history, last update, intrusions
  /images, /images/NAME
  /deploys, /deploys/ID
A name that itself ends in `.json` (a host `web.json`) keeps its HTML page at
that path; its twin is then `/hosts/web.json.json`. A bad query parameter (an
unknown name, a repeated one, a bad value) is a 400 with one line saying why.

The host table filters and sorts in memory what the herd (`herd.subs`) and the
state store (its in-memory host records) hold: no query per request, O(hosts) to
filter and sort, and a full host view built only for the rows of the page.

Pages refresh themselves: a few lines of inline script fetch the same URL every
2 s and swap the `#live` part (a `<noscript>` meta refresh does it without script).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Iterable, Mapping
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
from mdb.machine import Machine

WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
LIVE_POLL_TIMEOUT = 2.0
LISTING_TTL = 5.0
LARGEST_FILES = 10
IMAGE_DETAILS_KEPT = 64
MAX_DEPLOY_HOSTS = 2000  # rows a deploy page lists
DEPLOYS_LISTED = 100
PER_PAGE = 100  # host table rows per page, unless ?per_page= says otherwise
MAX_PER_PAGE = 1000
MAX_QUERY_TEXT = 256  # characters of ?q= and ?image=
PAGE_LINKS_AROUND = 3  # page links either side of the current page
OVERVIEW_INTRUSIONS = 50  # intrusion rows the overview page lists (its twin lists all)
IMAGE_PAGE_HOSTS = 200  # host rows an image page lists (its twin lists all)

Entry = tuple[Sub, HostRecord]  # one host: what the herd and the state store know of it

# /hosts?sort=KEY: the column each key sorts by (ties broken by hostname).
SORT_KEYS: dict[str, Callable[[Entry], Any]] = {
    "hostname": lambda e: e[0].machine.hostname,
    "status": lambda e: e[0].status.value,
    "address": lambda e: e[0].machine.address,
    "required": lambda e: e[0].machine.required_image,
    "planned": lambda e: e[0].machine.planned_image,
    "current": lambda e: e[1].current_image,
    "last_poll": lambda e: int(e[0].last_poll_unix),
    "last_scan": lambda e: int(e[0].last_scan_unix),
    "last_sync": lambda e: e[1].last_sync_unix,
    "last_error": lambda e: e[0].last_error,
}
SORT_ALIASES = {"required_image": "required", "planned_image": "planned", "image": "required",
                "current_image": "current", "host": "hostname", "error": "last_error"}
YES, NO = {"1", "yes", "true", "on"}, {"0", "no", "false", "off"}
FLAGS = ("compliant", "intrusion", "desc")  # yes|no parameters of /hosts
TEXTS = ("q", "image", "unreachable", "sort", "page", "per_page")
PARAMETERS = ("status", *TEXTS, *FLAGS)  # every parameter /hosts takes; only status repeats
UNREACHABLE = Status.UNREACHABLE.value


# The per-host view.

def last_unreachable(sub: Sub, now: float) -> float:
    """When the sub was last unreachable: `now` while it is, else the end of its last
    unreachable spell in its status transitions (history keeps the last 50); 0 when
    none is remembered."""
    if sub.status == Status.UNREACHABLE:
        return now
    later = now  # when the transition after the one looked at happened
    for unix, status, _ in reversed(sub.history):
        if status == UNREACHABLE:
            return later
        later = unix
    return 0.0


def unreachable_within(sub: Sub, now: float) -> dict[str, bool]:
    """Whether the sub was unreachable at any time in the last minute, hour and day."""
    last = last_unreachable(sub, now)
    return {name: bool(last) and last >= now - seconds for name, seconds in WINDOWS.items()}


def compliant(sub: Sub, record: HostRecord) -> bool:
    """Synced to the image the MDB requires."""
    required = sub.machine.required_image
    return sub.status == Status.SYNCED and record.current_image == required != ""


def host_view(sub: Sub, record: HostRecord, now: float) -> dict[str, Any]:
    """One host as the dashboard shows it: `dominator fleet list --json`'s fields
    (its SubReport, text already made printable) plus tags, compliance, reachability
    and events."""
    view = SubReport.of(sub, record).to_json()
    machine = sub.machine
    view["tags"] = dict(machine.tags)
    view["owner_group"] = machine.owner_group
    view["compliant"] = compliant(sub, record)
    view["unreachable_within"] = unreachable_within(sub, now)
    view["events"] = [{"unix": unix, "status": status, "error": error}
                      for unix, status, error in sub.history]
    view["url"] = f"/hosts/{machine.hostname}"
    return view


class HostMemo:
    """What the dashboard derives from each host, kept while what it is derived from
    stays the same object, so a request does not derive it anew for every host (nor
    allocates per host: at 10,000 hosts the collector's full passes, which a request's
    garbage brings on, cost more than the page):
    - every host with its record, by hostname;
    - what ?q= searches in, lower-cased: the MDB's side (hostname, address, images,
      owner group, tags as KEY=VALUE) while the host's Machine is the same (the herd
      replaces it on every MDB change); the live fields (status, current image, last
      error) are read anew, each searched on its own;
    - when the host was last unreachable, while its status and last transition are
      the same (transitions are only ever appended)."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._entries: list[Entry] = []
        self._texts: dict[str, tuple[Machine, str]] = {}
        self._unreachable: dict[str, tuple[tuple[float, str, str] | None, Status, float]] = {}

    def entries(self, ctx: HttpContext) -> list[Entry]:
        """Every host of the herd with the state store's record of it, by hostname
        (both in memory: no database query). The list is kept: do not change it."""
        subs, host = ctx.herd.subs, ctx.state.host
        names = sorted(subs)
        if names != self._names:
            self._names, self._entries = names, [(subs[name], host(name)) for name in names]
            self.prune(subs)
            return self._entries
        entries = self._entries
        for index, name in enumerate(names):
            sub, record = subs[name], host(name)
            kept = entries[index]
            if kept[0] is not sub or (kept[1] is not record and kept[1] != record):
                entries[index] = (sub, record)
        return entries

    def prune(self, subs: Mapping[str, Sub]) -> None:
        """Forget hosts gone from the herd (`subs`), once more are kept than it holds."""
        for kept in (self._texts, self._unreachable):
            if len(kept) > len(subs):
                for name in [name for name in kept if name not in subs]:
                    del kept[name]

    def matches(self, text: str, sub: Sub, record: HostRecord) -> bool:
        """Whether lower-cased `text` is in the MDB's side or in one live field."""
        machine = sub.machine
        kept = self._texts.get(machine.hostname)
        if kept is None or kept[0] is not machine:
            kept = self._texts[machine.hostname] = (machine, " ".join([
                machine.hostname, machine.address, machine.required_image,
                machine.planned_image, machine.owner_group,
                *(f"{k}={v}" for k, v in machine.tags.items())]).lower())
        return (text in kept[1] or text in sub.status.value
                or text in record.current_image.lower()
                or bool(sub.last_error) and text in quote(sub.last_error).lower())

    def last_unreachable(self, sub: Sub, now: float) -> float:
        """last_unreachable(sub, now), from memory while the sub's transitions stay."""
        name, latest = sub.machine.hostname, sub.history[-1] if sub.history else None
        kept = self._unreachable.get(name)
        if kept is None or kept[0] is not latest or kept[1] is not sub.status:
            kept = self._unreachable[name] = (latest, sub.status,
                                              last_unreachable(sub, math.inf))
        return min(kept[2], now)  # math.inf: unreachable still


def host_views(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """The full views of these hosts."""
    now = time.time()
    return [host_view(sub, record, now) for sub, record in entries]


# The overview.

def image_counts(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """Per image named anywhere in the fleet: hosts requiring, planning and holding it."""
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        found = rows.get(name)
        if found is None:
            found = rows[name] = {"image": name, "required": 0, "planned": 0, "current": 0,
                                  "compliant": 0, "url": f"/images/{name}"}
        return found
    for sub, record in entries:
        machine = sub.machine
        if machine.required_image:
            counts = row(machine.required_image)
            counts["required"] += 1
            if compliant(sub, record):
                counts["compliant"] += 1
        if machine.planned_image:
            row(machine.planned_image)["planned"] += 1
        if record.current_image:
            row(record.current_image)["current"] += 1
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


async def overview(ctx: HttpContext, memo: HostMemo) -> dict[str, Any]:
    """The fleet at a glance: counts over every host, no host rows but the intrusions."""
    entries = memo.entries(ctx)
    now = time.time()
    by_status = collections.Counter(sub.status.value for sub, _ in entries)
    by_image = image_counts(entries)
    in_compliance = sum(row["compliant"] for row in by_image)
    last = [when for when in (memo.last_unreachable(sub, now) for sub, _ in entries) if when]
    unreachable = {name: sum(1 for when in last if when >= now - seconds)
                   for name, seconds in WINDOWS.items()}
    intrusions = [{"hostname": sub.machine.hostname,
                   "paths": [quote(path) for path in record.intrusion_paths],
                   "unix": record.intrusion_unix, "url": f"/hosts/{sub.machine.hostname}"}
                  for sub, record in entries if record.intrusion_paths]
    disabled = ctx.state.updates_disabled()
    deploys = await deploy_summaries(ctx, 10)
    return {
        "generated_unix": now,
        "hosts": len(entries),
        "by_status": {status.value: by_status[status.value] for status in Status
                      if by_status[status.value]},
        "compliant": in_compliance,
        "deviant": len(entries) - in_compliance,
        "unreachable": {"now": by_status[Status.UNREACHABLE.value],
                        **{name: unreachable[name] for name in WINDOWS}},
        "intrusions": intrusions,
        "by_image": by_image,
        "updates_disabled": None if disabled is None else {
            "by": disabled.by, "reason": disabled.reason, "unix": disabled.unix},
        "diff_cache": {"hits": ctx.herd.cache.hits, "misses": ctx.herd.cache.misses},
        "imageservers": imageservers_view(ctx),
        "deploy_engine": deploys is not None,
        "deploys": deploys or [],
    }


# The host table.

def _shown(value: str) -> str:
    """A bad value as an error message quotes it: on one line, at most 60 characters."""
    return repr(value if len(value) <= 60 else value[:60] + "...")


def _flag(params: Any, name: str) -> bool | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value.lower() in YES:
        return True
    if value.lower() in NO:
        return False
    raise HTTPException(400, f"{name} must be yes or no, not {_shown(value)}")


def _whole(params: Any, name: str, default: int | None, highest: int | None) -> int | None:
    value = (params.get(name) or "").strip()
    if not value:
        return default
    number = int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else 0
    if not 1 <= number <= (highest or number):
        bound = f"from 1 to {highest}" if highest else "from 1"
        raise HTTPException(400, f"{name} must be a whole number {bound}, not {_shown(value)}")
    return number


def table_query(params: Any, per_page: int | None = PER_PAGE) -> dict[str, Any]:
    """The /hosts query: filters, sort and page, validated (400 with one line on an
    unknown or repeated parameter or a bad value). `per_page` is the page size when
    none is asked for (None: every matching host on one page)."""
    for name in params.keys():
        if name not in PARAMETERS:
            raise HTTPException(400, f"unknown parameter {_shown(name)}; /hosts takes: "
                                + ", ".join(PARAMETERS))
    for name in (*TEXTS, *FLAGS):
        if len(params.getlist(name)) > 1:
            raise HTTPException(400, f"{name} given more than once")
    statuses = [s.strip() for value in params.getlist("status") for s in value.split(",")
                if s.strip()]
    known = {status.value for status in Status}
    for status in statuses:
        if status not in known:
            raise HTTPException(400, f"unknown status {_shown(status)}; one of: "
                                + ", ".join(sorted(known)))
    sort = (params.get("sort") or "hostname").strip()
    key = sort.removeprefix("-")
    key = SORT_ALIASES.get(key, key)
    if key not in SORT_KEYS:
        raise HTTPException(400, f"unknown sort key {_shown(sort)}; one of: "
                            + ", ".join(SORT_KEYS) + " (prefix - or add desc=yes for descending)")
    descending = sort.startswith("-") or bool(_flag(params, "desc"))
    unreachable = (params.get("unreachable") or "").strip()
    if unreachable and unreachable not in WINDOWS:
        raise HTTPException(400, "unreachable must be one of: " + ", ".join(WINDOWS)
                            + f", not {_shown(unreachable)}")
    texts = {name: (params.get(name) or "").strip() for name in ("q", "image")}
    for name, text in texts.items():
        if len(text) > MAX_QUERY_TEXT:
            raise HTTPException(400, f"{name} is longer than {MAX_QUERY_TEXT} characters")
    return {"status": statuses, **texts, "compliant": _flag(params, "compliant"),
            "intrusion": _flag(params, "intrusion"), "unreachable": unreachable,
            "sort": ("-" if descending else "") + key,
            "page": _whole(params, "page", 1, None),
            "per_page": _whole(params, "per_page", per_page, MAX_PER_PAGE)}


def _selector(query: dict[str, Any], memo: HostMemo,
              now: float) -> Callable[[Entry], bool] | None:
    """Whether a host matches the query's filters (None: the query filters nothing)."""
    statuses = frozenset(query["status"])
    image, text, window = query["image"], query["q"].lower(), query["unreachable"]
    seconds = WINDOWS.get(window, 0)
    wants_compliant, wants_intrusion = query["compliant"], query["intrusion"]
    if not (statuses or image or text or window or wants_compliant is not None
            or wants_intrusion is not None):
        return None

    def matches(entry: Entry) -> bool:
        sub, record = entry
        if statuses and sub.status.value not in statuses:
            return False
        machine = sub.machine
        if image and image not in (machine.required_image, machine.planned_image,
                                   record.current_image):
            return False
        if wants_compliant is not None and compliant(sub, record) != wants_compliant:
            return False
        if wants_intrusion is not None and bool(record.intrusion_paths) != wants_intrusion:
            return False
        if window and memo.last_unreachable(sub, now) < now - seconds:
            return False
        return not text or memo.matches(text, sub, record)
    return matches


def filter_and_sort(entries: list[Entry], query: dict[str, Any],
                    memo: HostMemo) -> list[Entry]:
    """The hosts the query selects, in its order (hostname breaks ties: `entries`
    come by hostname and the sort is stable)."""
    matches = _selector(query, memo, time.time())
    chosen = list(entries) if matches is None else list(filter(matches, entries))
    key = query["sort"].removeprefix("-")
    if key != "hostname" or query["sort"].startswith("-"):
        chosen.sort(key=SORT_KEYS[key], reverse=query["sort"].startswith("-"))
    return chosen


def table_url(query: dict[str, Any], **changes: Any) -> str:
    """The /hosts URL of `query` with `changes` (e.g. page=3)."""
    query = {**query, **changes}
    pairs = [("status", status) for status in query["status"]]
    pairs += [(name, query[name]) for name in ("q", "image", "unreachable") if query[name]]
    pairs += [(name, "yes" if query[name] else "no") for name in ("compliant", "intrusion")
              if query[name] is not None]
    pairs.append(("sort", query["sort"]))
    if query["per_page"] not in (None, PER_PAGE):
        pairs.append(("per_page", str(query["per_page"])))
    if query["page"] != 1:
        pairs.append(("page", str(query["page"])))
    return "/hosts?" + urlencode(pairs)


def sort_links(query: dict[str, Any]) -> dict[str, str]:
    """Per sort key, the /hosts URL keeping the filters and sorting by that key from
    the first page (the current sort key's link reverses the order)."""
    return {key: table_url(query, page=1, sort="-" + key if query["sort"] == key else key)
            for key in SORT_KEYS}


def paging(query: dict[str, Any], matching: int) -> dict[str, Any]:
    """Where the query's page falls among the `matching` hosts: its number, size, the
    number of pages, and the 1-based positions of its first and last rows (0 and 0
    for a page past the end)."""
    size = query["per_page"] or max(matching, 1)
    pages = max(1, -(-matching // size))
    first = (query["page"] - 1) * size
    last = min(first + size, matching)
    return {"page": query["page"], "per_page": query["per_page"], "pages": pages,
            "first": first + 1 if first < last else 0, "last": last if first < last else 0}


def page_links(query: dict[str, Any], pages: int) -> list[dict[str, Any]]:
    """The HTML table's page links: first, previous, the pages around this one, next
    and last (url None: not a link, e.g. "previous" on page 1 or the current page)."""
    here = query["page"]

    def link(label: str, number: int) -> dict[str, Any]:
        usable = 1 <= number <= pages and number != here
        return {"label": label, "url": table_url(query, page=number) if usable else None,
                "current": number == here and label == str(number)}
    around = range(max(1, here - PAGE_LINKS_AROUND), min(pages, here + PAGE_LINKS_AROUND) + 1)
    return [link("« first", 1), link("‹ previous", here - 1),
            *(link(str(number), number) for number in around),
            link("next ›", here + 1), link("last »", pages)]


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
    try:
        deploys = await engine.newest(limit)
    except FleetError:  # the engine's Unavailable (its database is down): the page renders
        return []
    return [{**deploy_summary(deploy, f"/v1/deploys/{deploy.id}"), "url": f"/deploys/{deploy.id}"}
            for deploy in deploys]


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


def hosts_data(ctx: HttpContext, memo: HostMemo, params: Any,
               per_page: int | None) -> dict[str, Any]:
    """The host table: the counts, the query, where its page falls, and the full views
    of the hosts on that page. `per_page`: the page size when the query gives none."""
    query = table_query(params, per_page)
    entries = memo.entries(ctx)
    chosen = filter_and_sort(entries, query, memo)
    where = paging(query, len(chosen))
    start = max(where["first"] - 1, 0)
    return {"total": len(entries), "shown": len(chosen), "query": query, "paging": where,
            "hosts": host_views(chosen[start:where["last"]])}


def dashboard_router(ctx: HttpContext) -> APIRouter:
    """Every dashboard page and its JSON twin."""
    env = make_environment()
    listing = ImageListing(ctx)
    memo = HostMemo()
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
        data = await overview(ctx, memo)
        return page(request, "overview.html", "/index.json", "Fleet overview", data=data,
                    intrusions_listed=OVERVIEW_INTRUSIONS)

    @router.get("/index.json")
    async def overview_json() -> dict[str, Any]:
        return await overview(ctx, memo)

    @router.get("/hosts")
    async def hosts_page(request: Request) -> Response:
        try:
            data = hosts_data(ctx, memo, request.query_params, PER_PAGE)
        except HTTPException as err:  # a bad parameter: the reason, on the page
            return page(request, "error.html", "", "Bad request", status_code=err.status_code,
                        message=err.detail)
        suffix = f"?{request.url.query}" if request.url.query else ""
        return page(request, "hosts.html", f"/hosts.json{suffix}", "Hosts", data=data,
                    sort_links=sort_links(data["query"]),
                    page_links=page_links(data["query"], data["paging"]["pages"]),
                    per_page_choices=(50, PER_PAGE, 500, MAX_PER_PAGE))

    @router.get("/hosts.json")
    async def hosts_json(request: Request) -> dict[str, Any]:
        params = request.query_params  # every matching host, unless a page is asked for
        paged = "page" in params or "per_page" in params
        return hosts_data(ctx, memo, params, PER_PAGE if paged else None)

    @router.get("/hosts/{hostname}")
    async def host_page(request: Request, hostname: str) -> Response:
        hostname, as_json = _json_name(hostname, lambda name: name in ctx.herd.subs)
        sub = ctx.herd.subs.get(hostname)
        if sub is None:
            return missing(request, as_json, f"unknown host {hostname}")
        data = host_view(sub, ctx.state.host(hostname), time.time())
        data["generation"] = sub.generation
        data["live"] = await live_status(sub)
        if as_json:
            return JSONResponse(data)
        return page(request, "host.html", f"/hosts/{hostname}.json", hostname, host=data)

    async def images_data() -> dict[str, Any]:
        stored, error = await listing.stored()
        counts = {row["image"]: row for row in image_counts(memo.entries(ctx))}
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
        entries = memo.entries(ctx)
        referenced = {n for sub, record in entries
                      for n in (sub.machine.required_image, sub.machine.planned_image,
                                record.current_image)}
        name, as_json = _json_name(name, lambda n: n in stored or n in referenced)
        try:
            image = await ctx.images.get(name)
        except grpc.RpcError:
            image = None  # a name the image server refuses, or the server is away
        users = [(sub, record) for sub, record in entries
                 if name in (sub.machine.required_image, sub.machine.planned_image,
                             record.current_image)]
        if image is None and not users:
            return missing(request, as_json, f"unknown image {name}")
        data = {"name": name, "stored": image is not None,
                "details": listing.details(image) if image is not None else None,
                "counts": next((r for r in image_counts(users) if r["image"] == name), None),
                "users": len(users),
                "hosts": host_views(users if as_json else users[:IMAGE_PAGE_HOSTS])}
        if as_json:
            return JSONResponse(data)
        return page(request, "image.html", f"/images/{name}.json", f"Image {name}", image=data,
                    hosts_url="/hosts?" + urlencode({"image": name}))

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
