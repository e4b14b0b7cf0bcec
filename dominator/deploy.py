"""The deploy stage: roll an image out to selected hosts in waves.

A wave sets the required image of its hosts in the MDB, waits until the herd
has them synced on it, runs the health gate on each, and only then lets the
next wave start. More failed hosts than `maxFailures` stop the deploy: every
host it touched gets its previous required image back, and it ends TERMINAL.
A cancel lets the hosts in flight finish and leaves the rest untouched (or
rolls back, if asked). A dry run plans every selected host with the herd's own
planning and changes nothing.

Every deploy lives in the dominator's state database and is saved after each
change of state, so a restarted dominator resumes each running deploy where it
was. The HTTP side is dominator/deploy_api.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import grpc
import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from dominator.herd.herd import Herd, Sub
from dominator.herd.images import ImageCache
from dominator.herd.state import DominatorState
from dominator.herd.status import Status
from fleetlib.errors import FleetError
from fleetlib.fstree.diff import Change
from fleetlib.fstree.image import check_image_name
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.sql.migrate import Migration, migrate
from mdb.machine import BRACKETED_ADDRESS_RE, Machine
from mdb.store import Mdb

log = logging.getLogger(__name__)

# Deploy statuses (the Spinnaker webhook stage's vocabulary).
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
TERMINAL = "TERMINAL"
CANCELED = "CANCELED"

# Host states within a deploy.
PENDING = "pending"            # not started: the MDB still holds its previous image
UPDATING = "updating"          # required image set, waiting until the herd has it synced
CHECKING = "checking"          # synced, health gate running
CONVERGED = "succeeded"        # synced and healthy
FAILED = "failed"              # see its error
SKIPPED = "skipped"            # never started (the deploy stopped first)
ROLLING_BACK = "rollingBack"   # previous image set again, waiting until synced on it
ROLLED_BACK = "rolledBack"
ROLLBACK_FAILED = "rollbackFailed"
PLANNED = "planned"            # dry run

# Wave states: RUNNING, SUCCEEDED, CANCELED as deploys, and these.
W_PENDING = "PENDING"
W_FAILED = "FAILED"
W_SKIPPED = "SKIPPED"          # no host of its own (rounding), or never started
W_PLANNED = "PLANNED"          # dry run

DEFAULT_WAVES = ("1", "10%", "100%")
DEFAULT_WAVE_TIMEOUT = 900.0
DEFAULT_HEALTH_TIMEOUT = 10.0
DEFAULT_HEALTH_RETRIES = 2
MAX_WAVES = 100
MAX_PLAN_PATHS = 1000          # changed paths listed per host in a dry run
DRY_RUN_WAIT_SECONDS = 10.0    # a POST waits this long for a dry run to finish
SYNCED = {Status.SYNCED, Status.INTRUSION}
# Herd verdicts that fail a host (when it gives them twice for the deploy's image:
# the first may be the end of a cycle that began before the MDB changed).
FAILING = {Status.UNSAFE, Status.FAILED, Status.MISSING_COMPUTED, Status.NO_SPACE}
FAILURE_VERDICTS = 2


class DeployError(FleetError):
    """A refused request; `status` is the HTTP status that says why."""

    status = 400


class UnknownDeploy(DeployError):
    status = 404


class Conflict(DeployError):
    status = 409


class Busy(DeployError):
    """Too many deploys running: try later."""

    status = 429


class Unavailable(DeployError):
    """The dominator cannot take the request now (still loading, image server
    down, updates disabled): try later."""

    status = 503


# Waves.

WAVE_RE = re.compile(r"(?P<count>[0-9]+)|(?P<percent>[0-9]+(?:\.[0-9]+)?)%")


def parse_wave(spec: str) -> tuple[str, Decimal]:
    """`"N"` (a number of hosts, at least 1) or `"P%"` (a share, 0 < P <= 100), as
    ("count", N) or ("percent", P)."""
    match = WAVE_RE.fullmatch(spec.strip())
    if match is None:
        raise DeployError(f"bad wave {spec!r}: a number of hosts (\"10\") or a percentage "
                          "of the selected hosts (\"25%\")")
    if match["count"] is not None:
        count = int(match["count"])
        if count < 1:
            raise DeployError(f"bad wave {spec!r}: a wave holds at least 1 host")
        return "count", Decimal(count)
    try:
        percent = Decimal(match["percent"])
    except InvalidOperation:
        raise DeployError(f"bad wave {spec!r}") from None
    if not 0 < percent <= 100:
        raise DeployError(f"bad wave {spec!r}: a percentage must be above 0% and at most 100%")
    return "percent", percent


def check_waves(specs: Iterable[str]) -> list[str]:
    """Valid wave specs, normalized. Waves are cumulative (each says how many of
    the selected hosts run the image once it is done), so two of the same kind
    must grow: ["50%", "10%"] is refused."""
    specs = [str(spec).strip() for spec in specs]
    if not specs:
        raise DeployError("waves: give at least one wave, e.g. [\"1\", \"10%\", \"100%\"]")
    if len(specs) > MAX_WAVES:
        raise DeployError(f"waves: at most {MAX_WAVES} waves")
    last: dict[str, tuple[str, Decimal]] = {}
    for spec in specs:
        kind, value = parse_wave(spec)
        previous = last.get(kind)
        if previous is not None and value <= previous[1]:
            raise DeployError(f"bad waves: {spec!r} after {previous[0]!r} does not grow; waves "
                              "are cumulative (each is the total converged once it is done)")
        last[kind] = (spec, value)
    return specs


def wave_targets(specs: list[str], total: int) -> list[tuple[str, int, bool]]:
    """(spec, hosts converged once the wave is done, implied) for each wave over
    `total` hosts. A count is capped at `total`, a share rounds up; a wave never
    shrinks (mixing counts and shares); when the last wave stops short of every
    host, an implied "100%" wave follows."""
    targets = []
    reached = 0
    for spec in specs:
        kind, value = parse_wave(spec)
        if kind == "count":
            target = min(int(value), total)
        else:
            target = min(total, math.ceil(value * total / 100))
        reached = max(reached, target)
        targets.append((spec, reached, False))
    if reached < total:
        targets.append(("100%", total, True))
    return targets


# Health gates.

PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
PLACEHOLDERS = ("host", "address")


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with `{host}` and `{address}` replaced (no other formatting)."""
    def one(match: re.Match) -> str:
        name = match[1]
        if name not in values:
            raise DeployError(f"unknown placeholder {{{name}}} in {template!r}: use "
                              + " or ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        return values[name]
    return PLACEHOLDER_RE.sub(one, template)


def address_host(address: str, hostname: str, bracket: bool) -> str:
    """The host part of an MDB address (port dropped; the hostname when empty),
    bracketed when IPv6 and `bracket` (for URLs)."""
    if not address:
        return hostname
    bracketed = BRACKETED_ADDRESS_RE.fullmatch(address)
    if bracketed:
        host = bracketed["host"]
    elif address.count(":") == 1:
        host = address.split(":")[0]
    else:
        host = address
    return f"[{host}]" if bracket and ":" in host else host


@dataclass(frozen=True)
class HealthCheck:
    """A URL (GET, 2xx is healthy) or a command (exit 0 is healthy), per host."""

    url: str = ""
    command: str = ""
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    retries: int = DEFAULT_HEALTH_RETRIES

    def check(self) -> None:
        """Refuse a template that cannot work for any host."""
        sample = {"host": "host.example", "address": "192.0.2.1"}
        if self.url:
            url = httpx.URL(fill(self.url, sample))
            if url.scheme not in ("http", "https") or not url.host:
                raise DeployError(f"healthCheck.url {self.url!r}: expected http://... or "
                                  "https://... with a host")
        elif self.command:
            try:
                args = shlex.split(self.command)
            except ValueError as err:
                raise DeployError(f"healthCheck.command {self.command!r}: {err}") from None
            if not args:
                raise DeployError("healthCheck.command is empty")
            for arg in args:
                fill(arg, sample)

    async def run(self, machine: Machine, client: httpx.AsyncClient) -> tuple[bool, str]:
        """Check one host, retrying with a short backoff: (healthy, what was seen)."""
        seen = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            healthy, seen = await self._attempt(machine, client)
            if healthy:
                return True, seen
        tries = self.retries + 1
        return False, f"{seen} ({tries} attempt{'s' if tries > 1 else ''})"

    async def _attempt(self, machine: Machine, client: httpx.AsyncClient) -> tuple[bool, str]:
        host = machine.hostname
        if self.url:
            url = fill(self.url, {"host": host,
                                  "address": address_host(machine.address, host, True)})
            try:
                reply = await client.get(url, timeout=self.timeout)
            except httpx.TimeoutException:
                return False, f"GET {url}: no answer within {self.timeout:g} s"
            except httpx.HTTPError as err:
                return False, f"GET {url}: {type(err).__name__}: {err}"
            return reply.is_success, f"GET {url}: HTTP {reply.status_code}"
        values = {"host": host, "address": address_host(machine.address, host, False)}
        args = [fill(arg, values) for arg in shlex.split(self.command)]
        try:
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        except OSError as err:
            return False, f"{args[0]}: {err.strerror}"
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            return False, f"{shlex.join(args)}: still running after {self.timeout:g} s"
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode == 0:
            return True, f"{shlex.join(args)}: exit 0"
        detail = next((line.strip() for line in stderr.decode(errors="replace").splitlines()
                       if line.strip()), "")
        return False, (f"{shlex.join(args)}: exit {process.returncode}"
                       + (f": {detail[:200]}" if detail else ""))


# What a deploy was asked to do.

@dataclass(frozen=True)
class DeploySpec:
    """A validated deploy request (the stored request JSON, camelCase, parsed)."""

    image: str
    select: dict[str, Any]
    waves: tuple[str, ...] = DEFAULT_WAVES
    max_failures: int = 0
    dry_run: bool = False
    health: HealthCheck | None = None
    wave_timeout: float = DEFAULT_WAVE_TIMEOUT

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> DeploySpec:
        """Parse and check a request (DeployError says what is wrong)."""
        try:
            image = check_image_name(request.get("image") or "")
        except FleetError as err:
            raise DeployError(f"image: {err}") from None
        select = request.get("select") or {}
        given = [key for key in ("hosts", "tags", "all") if select.get(key) is not None]
        if len(given) != 1:
            raise DeployError('select: give exactly one of {"hosts": [...]}, '
                              '{"tags": {...}} or {"all": true}')
        if select.get("all") is False:
            raise DeployError('select: {"all": false} selects nothing')
        if "hosts" in given and not select["hosts"]:
            raise DeployError("select.hosts: empty selection")
        if "tags" in given and not select["tags"]:
            raise DeployError('select.tags: give at least one tag (or {"all": true})')
        health = None
        check = request.get("healthCheck")
        if check:
            if bool(check.get("url")) == bool(check.get("command")):
                raise DeployError("healthCheck: give exactly one of url or command")
            retries = check.get("retries")
            health = HealthCheck(check.get("url") or "", check.get("command") or "",
                                 float(check.get("timeoutSeconds") or DEFAULT_HEALTH_TIMEOUT),
                                 DEFAULT_HEALTH_RETRIES if retries is None else int(retries))
            if health.retries < 0 or health.timeout <= 0:
                raise DeployError("healthCheck: timeoutSeconds must be above 0 and retries "
                                  "0 or more")
            health.check()
        max_failures = int(request.get("maxFailures") or 0)
        if max_failures < 0:
            raise DeployError("maxFailures: must be 0 or more")
        timeout = float(request.get("waveTimeoutSeconds") or DEFAULT_WAVE_TIMEOUT)
        if timeout <= 0:
            raise DeployError("waveTimeoutSeconds: must be above 0")
        return cls(image, dict(select), tuple(check_waves(request.get("waves")
                                                          or DEFAULT_WAVES)),
                   max_failures, bool(request.get("dryRun")), health, timeout)

    def selects(self, machine: Machine) -> bool:
        """Whether the selector takes this machine (by tags or all; hosts are by name)."""
        if self.select.get("all"):
            return True
        tags = self.select.get("tags") or {}
        return all(machine.tags.get(key) == value for key, value in tags.items())


# A deploy's state.

@dataclass
class HostProgress:
    """One host within a deploy."""

    wave: int                          # 1-based
    state: str = PENDING
    previous_image: str | None = None  # its required image before the deploy set it
    error: str = ""                    # why it failed (a failed host keeps it)
    health: str = ""                   # the last health check's outcome
    rollback: str = ""                 # how its rollback went, when it had one
    started_unix: float = 0.0
    finished_unix: float = 0.0
    plan: dict[str, Any] | None = None  # dry run


@dataclass
class Wave:
    """One wave: its spec, how many hosts are converged once it is done, its hosts."""

    spec: str
    target: int
    hosts: list[str]
    implied: bool = False
    state: str = W_PENDING             # RUNNING, SUCCEEDED, FAILED, CANCELED, SKIPPED, PLANNED
    started_unix: float = 0.0
    finished_unix: float = 0.0


@dataclass
class Deploy:
    """A deploy, as saved after every change."""

    id: str
    idempotency_key: str | None
    request: dict[str, Any]
    waves: list[Wave]
    hosts: dict[str, HostProgress]
    status: str = RUNNING
    reason: str = ""
    phase: str = "waves"               # waves, rollback, done
    wave: int = 0                      # index of the wave in progress
    ending: str = ""                   # status once the rollback is done
    cancel: dict[str, Any] | None = None
    created_unix: float = field(default_factory=time.time)
    updated_unix: float = field(default_factory=time.time)

    @property
    def spec(self) -> DeploySpec:
        return DeploySpec.from_request(self.request)

    @property
    def dry_run(self) -> bool:
        return bool(self.request.get("dryRun"))

    def failures(self) -> int:
        return sum(1 for host in self.hosts.values() if host.error)

    def converged(self) -> int:
        return sum(1 for host in self.hosts.values() if host.state == CONVERGED)

    def percent(self) -> int:
        total = len(self.hosts) or 1
        done = (sum(1 for h in self.hosts.values() if h.state != PENDING) if self.dry_run
                else self.converged())
        return done * 100 // total

    def progress(self) -> str:
        """One line for people and Spinnaker's progressJsonPath."""
        total = len(self.hosts)
        if self.dry_run:
            planned = [h for h in self.hosts.values() if h.state == PLANNED]
            changing = sum(1 for h in planned if h.plan and h.plan["changes"]["count"])
            stopped = sum(1 for h in self.hosts.values()
                          if h.error or (h.plan and h.plan["wouldStop"]))
            return (f"dry run: {len(planned)}/{total} hosts planned, {changing} would change, "
                    f"{stopped} would be stopped")
        text = f"{self.converged()}/{total} hosts converged, {self.failures()} failed"
        if self.status != RUNNING:
            rolled = sum(1 for h in self.hosts.values() if h.state == ROLLED_BACK)
            return text + (f", {rolled} rolled back" if rolled else "")
        if self.phase == "rollback":
            rolling = sum(1 for h in self.hosts.values() if h.state == ROLLING_BACK)
            return text + f", rolling back ({rolling} to go)"
        where = f"wave {min(self.wave + 1, len(self.waves))}/{len(self.waves)}"
        if self.cancel:
            return text + f", canceling: finishing {where}"
        return text + f", {where}"

    def to_record(self) -> dict[str, Any]:
        """The saved form (snake_case, as the dataclasses name things)."""
        record = asdict(self)
        record.pop("request")
        return record

    @classmethod
    def from_row(cls, request: dict[str, Any], record: dict[str, Any]) -> Deploy:
        record = dict(record)
        waves = [Wave(**wave) for wave in record.pop("waves")]
        hosts = {name: HostProgress(**host) for name, host in record.pop("hosts").items()}
        return cls(request=request, waves=waves, hosts=hosts, **record)

    def view(self, status_url: str) -> dict[str, Any]:
        """The API's JSON (GET /v1/deploys/{id})."""
        result: dict[str, Any] = {
            "id": self.id, "status": self.status, "progress": self.progress(),
            "percent": self.percent(), "reason": self.reason, "image": self.request["image"],
            "dryRun": self.dry_run, "statusUrl": status_url,
            "createdUnix": self.created_unix, "updatedUnix": self.updated_unix,
            "idempotencyKey": self.idempotency_key, "cancel": self.cancel,
            "request": self.request,
            "waves": [{"index": index, "spec": wave.spec, "implied": wave.implied,
                       "target": wave.target, "status": wave.state, "hosts": wave.hosts,
                       "startedUnix": wave.started_unix, "finishedUnix": wave.finished_unix}
                      for index, wave in enumerate(self.waves, 1)],
            "hosts": {name: host_view(host) for name, host in self.hosts.items()},
        }
        if self.dry_run:
            result["wouldStop"] = {
                name: host.error or host.plan["wouldStop"] for name, host in self.hosts.items()
                if host.error or (host.plan and host.plan["wouldStop"])}
        return result

    def to_json(self) -> dict[str, Any]:
        """The API's JSON with a relative status URL (for the dashboard)."""
        return self.view(f"/v1/deploys/{self.id}")

    def summary(self, status_url: str) -> dict[str, Any]:
        """One line of GET /v1/deploys."""
        return {"id": self.id, "status": self.status, "progress": self.progress(),
                "percent": self.percent(), "reason": self.reason,
                "image": self.request["image"], "dryRun": self.dry_run,
                "hosts": len(self.hosts), "statusUrl": status_url,
                "createdUnix": self.created_unix, "updatedUnix": self.updated_unix}


def host_view(host: HostProgress) -> dict[str, Any]:
    view: dict[str, Any] = {"wave": host.wave, "status": host.state,
                            "previousImage": host.previous_image, "error": host.error,
                            "health": host.health, "rollback": host.rollback,
                            "startedUnix": host.started_unix,
                            "finishedUnix": host.finished_unix}
    if host.plan is not None:
        view["plan"] = host.plan
    return view


def printable_path(path: str) -> str:
    """A path as JSON can carry it (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def plan_view(plan, summary, stop: str) -> dict[str, Any]:
    """A dry run's answer for one host: counts, bytes, triggers, the paths, and
    why the herd would stop the update ("" when it would go ahead)."""
    kinds = {Change.ADD: "added", Change.REPLACE: "replaced", Change.METADATA: "metadata",
             Change.DELETE: "deleted"}
    paths: dict[str, list[str]] = {name: [] for name in kinds.values()}
    listed = 0
    for entry in plan.diff.entries:
        if listed < MAX_PLAN_PATHS:
            paths[kinds[entry.change]].append(printable_path(entry.path))
            listed += 1
    return {"added": summary.added, "replaced": summary.replaced,
            "metadata": summary.metadata, "deleted": summary.deleted,
            "objectsToFetch": summary.objects_to_fetch, "bytesToFetch": summary.bytes_to_fetch,
            "bytesToWrite": summary.bytes_to_write, "triggers": summary.triggers,
            "unsafe": summary.unsafe, "wouldStop": stop,
            "changes": {**paths, "count": len(plan.diff.entries),
                        "truncated": len(plan.diff.entries) > listed}}


# Persistence, in the dominator's state database.

def _create_deploys(conn: Connection) -> None:
    conn.execute(sa.text(
        "CREATE TABLE deploys (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, "
        "image TEXT NOT NULL, dry_run INTEGER NOT NULL, request TEXT NOT NULL, "
        "status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, "
        "created_unix REAL NOT NULL, updated_unix REAL NOT NULL)"))
    conn.execute(sa.text("CREATE INDEX ix_deploys_status ON deploys (status)"))
    conn.execute(sa.text("CREATE INDEX ix_deploys_created ON deploys (created_unix)"))


DEPLOY_MIGRATIONS = [Migration(1, "deploys", _create_deploys)]


class DeployStore:
    """Deploys in the state database (thread-safe; callers use asyncio.to_thread)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        migrate(engine, DEPLOY_MIGRATIONS, table="deploy_schema_version")
        self._lock = threading.Lock()

    def _run(self, sql: str, **params: object) -> list[sa.Row]:
        with self._lock, self.engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return list(result) if result.returns_rows else []

    def insert(self, deploy: Deploy) -> None:
        self._run("INSERT INTO deploys (id, idempotency_key, image, dry_run, request, status, "
                  "reason, state, created_unix, updated_unix) VALUES (:id, :key, :image, :dry, "
                  ":request, :status, :reason, :state, :created, :updated)",
                  id=deploy.id, key=deploy.idempotency_key, image=deploy.request["image"],
                  dry=int(deploy.dry_run), request=json.dumps(deploy.request),
                  status=deploy.status, reason=deploy.reason,
                  state=json.dumps(deploy.to_record()), created=deploy.created_unix,
                  updated=deploy.updated_unix)

    def save(self, deploy: Deploy) -> None:
        self._run("UPDATE deploys SET status = :status, reason = :reason, state = :state, "
                  "updated_unix = :updated WHERE id = :id", id=deploy.id,
                  status=deploy.status, reason=deploy.reason,
                  state=json.dumps(deploy.to_record()), updated=deploy.updated_unix)

    def _load(self, where: str, **params: object) -> list[Deploy]:
        rows = self._run(f"SELECT request, state FROM deploys {where}", **params)
        return [Deploy.from_row(json.loads(request), json.loads(state))
                for request, state in rows]

    def get(self, deploy_id: str) -> Deploy | None:
        found = self._load("WHERE id = :id", id=deploy_id)
        return found[0] if found else None

    def by_key(self, key: str) -> Deploy | None:
        found = self._load("WHERE idempotency_key = :key", key=key)
        return found[0] if found else None

    def running(self) -> list[Deploy]:
        return self._load("WHERE status = :status ORDER BY created_unix", status=RUNNING)

    def newest(self, limit: int, status: str | None = None) -> list[Deploy]:
        where = "WHERE status = :status " if status else ""
        return self._load(f"{where}ORDER BY created_unix DESC, id DESC LIMIT :limit",
                          status=status, limit=limit)


# The engine.

class HostWatch:
    """Counts the herd's failure verdicts on one sub while it must hold `image`."""

    def __init__(self, sub: Sub, image: str) -> None:
        self.sub = sub
        self.image = image
        self.verdicts = 0
        self.last = ""
        sub.listeners.append(self._heard)

    def _heard(self, status: str, error: str) -> None:
        if Status(status) in FAILING and self.sub.machine.required_image == self.image:
            self.verdicts += 1
            self.last = f"{status}: {error}" if error else status

    def close(self) -> None:
        if self._heard in self.sub.listeners:
            self.sub.listeners.remove(self._heard)


class DeployEngine:
    """Runs deploys: one asyncio task each, on the dominator's event loop."""

    def __init__(self, herd: Herd, state: DominatorState, mdb: Mdb, images: ImageCache,
                 max_running: int = 4, tick: float = 0.5, health_slots: int = 32,
                 plan_slots: int = 20) -> None:
        self.herd = herd
        self.state = state
        self.mdb = mdb
        self.images = images
        self.max_running = max_running
        self.tick = tick
        self.store = DeployStore(state.engine)
        self._running: dict[str, Deploy] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._submit = asyncio.Lock()
        self._health_slots = asyncio.Semaphore(health_slots)
        self._plan_slots = asyncio.Semaphore(plan_slots)
        self._client: httpx.AsyncClient | None = None
        self._stopping = False

    # Lifecycle.

    async def start(self) -> None:
        """Resume every deploy that was running when the dominator stopped."""
        for deploy in await asyncio.to_thread(self.store.running):
            log.info("deploy %s: resuming (%s)", deploy.id, deploy.progress())
            self._spawn(deploy)

    async def stop(self) -> None:
        """Stop every deploy task where it is; saved state lets the next start resume."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _spawn(self, deploy: Deploy) -> asyncio.Task:
        self._running[deploy.id] = deploy
        self._wake[deploy.id] = asyncio.Event()
        task = self._tasks[deploy.id] = asyncio.create_task(self._run(deploy),
                                                            name=f"deploy {deploy.id}")
        return task

    # Requests.

    async def submit(self, request: dict[str, Any], key: str | None) -> tuple[Deploy, bool]:
        """Start a deploy (or a dry run): (the deploy, whether it is new). With an
        idempotency key already used, the deploy made for it."""
        async with self._submit:
            if key:
                existing = await self._stored(lambda: self.store.by_key(key))
                if existing is not None:
                    existing = self._running.get(existing.id, existing)
                    if existing.request != request:
                        raise Conflict(f"Idempotency-Key {key!r} was used for deploy "
                                       f"{existing.id} with a different request")
                    return existing, False
            spec = DeploySpec.from_request(request)
            await self._check_image(spec.image)
            hosts = await self._select(spec)
            await self._check_capacity(spec, hosts)
            deploy = Deploy(secrets.token_hex(8), key or None, request,
                            waves=[], hosts={})
            for index, (wave_spec, target, implied) in enumerate(
                    wave_targets(list(spec.waves), len(hosts)), 1):
                done = sum(len(w.hosts) for w in deploy.waves)
                members = hosts[done:target]
                deploy.waves.append(Wave(wave_spec, target, members, implied,
                                         W_PENDING if members else W_SKIPPED))
                for name in members:
                    deploy.hosts[name] = HostProgress(index)
            await self._stored(lambda: self.store.insert(deploy))
            log.info("deploy %s: %s%s to %d host(s) in %d wave(s)", deploy.id, spec.image,
                     " (dry run)" if spec.dry_run else "", len(hosts), len(deploy.waves))
            task = self._spawn(deploy)
        if spec.dry_run:
            await asyncio.wait([task], timeout=DRY_RUN_WAIT_SECONDS)
        return deploy, True

    async def lookup(self, deploy_id: str) -> Deploy:
        """The deploy (UnknownDeploy when there is none of that id)."""
        deploy = self._running.get(deploy_id)
        if deploy is None:
            deploy = await self._stored(lambda: self.store.get(deploy_id))
        if deploy is None:
            raise UnknownDeploy(f"no deploy {deploy_id!r}")
        return deploy

    async def newest(self, limit: int, status: str | None = None) -> list[Deploy]:
        """Deploys, newest first (optionally of one status)."""
        deploys = await self._stored(lambda: self.store.newest(limit, status))
        return [self._running.get(deploy.id, deploy) for deploy in deploys]

    # Synchronous reads, for callers outside a coroutine (the dashboard).

    def get(self, deploy_id: str) -> Deploy | None:
        """The deploy, or None."""
        return self._running.get(deploy_id) or self.store.get(deploy_id)

    def list(self, limit: int = 100) -> list[Deploy]:
        """The newest deploys, newest first."""
        return [self._running.get(deploy.id, deploy) for deploy in self.store.newest(limit)]

    async def cancel(self, deploy_id: str, rollback: bool) -> Deploy:
        """Stop after the hosts in flight (or roll back every touched host)."""
        deploy = self._running.get(deploy_id)
        if deploy is None or deploy.status != RUNNING:
            stored = deploy or await self.lookup(deploy_id)
            if stored.status == CANCELED:
                return stored
            raise Conflict(f"deploy {deploy_id} has ended ({stored.status}); nothing to cancel")
        if deploy.phase == "rollback":
            return deploy  # already undoing itself
        if deploy.cancel is None or (rollback and not deploy.cancel["rollback"]):
            deploy.cancel = {"rollback": rollback, "requestedUnix": time.time()}
            await self._save(deploy)
            log.info("deploy %s: cancel requested%s", deploy.id,
                     " with rollback" if rollback else "")
            task, wake = self._tasks.get(deploy.id), self._wake.get(deploy.id)
            if deploy.dry_run and task is not None:
                task.cancel()
            if wake is not None:
                wake.set()
        return deploy

    async def _stored(self, call):
        try:
            return await asyncio.to_thread(call)
        except FleetError as err:
            raise Unavailable(f"state database: {err}") from None
        except sa.exc.SQLAlchemyError as err:
            raise Unavailable(f"state database: {type(err).__name__}") from None

    async def _check_image(self, name: str) -> None:
        try:
            image = await self.images.get(name)
        except grpc.RpcError as err:
            raise Unavailable(f"cannot reach the image server: {describe_rpc_error(err)}"
                              ) from None
        if image is None:
            raise DeployError(f"unknown image {name!r}: the image server does not hold it")

    async def _select(self, spec: DeploySpec) -> list[str]:
        try:
            machines = await asyncio.to_thread(self.mdb.list)
        except FleetError as err:
            raise Unavailable(f"cannot read the MDB: {err}") from None
        known = {machine.hostname: machine for machine in machines}
        if spec.select.get("hosts") is not None:
            names = sorted(set(spec.select["hosts"]))
            unknown = [name for name in names if name not in known]
            if unknown:
                raise DeployError(f"select.hosts: unknown host{'s' if len(unknown) > 1 else ''}"
                                  f" {', '.join(unknown[:10])}"
                                  f"{' ...' if len(unknown) > 10 else ''} (not in the MDB)")
        else:
            names = [name for name, machine in sorted(known.items()) if spec.selects(machine)]
        if not names:
            raise DeployError(f"empty selection: {json.dumps(spec.select)} matches no host "
                              "of the MDB")
        loading = [name for name in names if name not in self.herd.subs]
        if loading:
            raise Unavailable(f"the dominator has not loaded {loading[0]} from the MDB yet; "
                              "try again in a few seconds")
        return names

    async def _check_capacity(self, spec: DeploySpec, hosts: list[str]) -> None:
        running = [d for d in self._running.values() if d.dry_run == spec.dry_run]
        if len(running) >= self.max_running:
            raise Busy(f"{len(running)} {'dry runs' if spec.dry_run else 'deploys'} are "
                       f"running (at most {self.max_running} at once); try again later")
        if spec.dry_run:
            return
        disabled = await asyncio.to_thread(self.state.updates_disabled)
        if disabled is not None:
            raise Unavailable(f"updates are disabled fleet-wide by {disabled.by}: "
                              f"{disabled.reason}; try again once they are enabled")
        wanted = set(hosts)
        for other in running:
            if other.status == RUNNING and other.phase != "done":
                shared = sorted(wanted & set(other.hosts))
                if shared:
                    raise Conflict(f"host {shared[0]} is in running deploy {other.id} "
                                   f"({other.request['image']}); cancel it or wait for it "
                                   "to end")

    # Running a deploy.

    async def _save(self, deploy: Deploy) -> None:
        deploy.updated_unix = time.time()
        await asyncio.to_thread(self.store.save, deploy)

    async def _finish(self, deploy: Deploy, status: str, reason: str) -> None:
        deploy.status = status
        deploy.reason = reason
        deploy.phase = "done"
        await self._save(deploy)
        log.info("deploy %s: %s%s (%s)", deploy.id, status, f": {reason}" if reason else "",
                 deploy.progress())

    async def _run(self, deploy: Deploy) -> None:
        try:
            if deploy.dry_run:
                await self._dry_run(deploy)
            else:
                await self._deploy(deploy)
        except asyncio.CancelledError:
            if deploy.dry_run and deploy.cancel and not self._stopping:
                await self._finish(deploy, CANCELED, "canceled")
            elif not self._stopping:
                raise
        except Exception as err:  # noqa: BLE001 - a deploy must end with a reason
            log.exception("deploy %s failed", deploy.id)
            try:
                await self._finish(deploy, TERMINAL, f"internal error: {err}")
            except Exception:  # noqa: BLE001
                log.exception("deploy %s: cannot save its end", deploy.id)
        finally:
            self._running.pop(deploy.id, None)
            self._tasks.pop(deploy.id, None)
            self._wake.pop(deploy.id, None)

    async def _dry_run(self, deploy: Deploy) -> None:
        image = deploy.request["image"]

        async def plan(name: str) -> None:
            host = deploy.hosts[name]
            host.started_unix = time.time()
            async with self._plan_slots:
                try:
                    planned = await self.herd.plan_for(name, image)
                except FleetError as err:
                    host.state, host.error = FAILED, str(err)
                except grpc.RpcError as err:
                    host.state, host.error = FAILED, describe_rpc_error(err)
                else:
                    host.state, host.plan = PLANNED, plan_view(*planned)
            host.finished_unix = time.time()

        for wave in deploy.waves:
            wave.state = RUNNING if wave.hosts else W_SKIPPED
        await asyncio.gather(*(plan(name) for name in deploy.hosts))
        for wave in deploy.waves:
            if wave.hosts:
                wave.state = W_PLANNED
        await self._finish(deploy, SUCCEEDED, "")

    async def _deploy(self, deploy: Deploy) -> None:
        spec = deploy.spec
        while deploy.phase == "waves":
            if deploy.cancel and deploy.cancel["rollback"]:
                await self._enter_rollback(deploy, CANCELED, "canceled")
                break
            if deploy.wave >= len(deploy.waves):
                await self._finish(deploy, SUCCEEDED, self._success_note(deploy, spec))
                return
            if deploy.cancel:
                await self._stop_canceled(deploy)
                return
            wave = deploy.waves[deploy.wave]
            outcome = await self._run_wave(deploy, spec, wave)
            if outcome == "failed":
                failed = [(h.finished_unix, n, h.error) for n, h in deploy.hosts.items()
                          if h.error]
                _, name, error = max(failed)
                await self._enter_rollback(
                    deploy, TERMINAL, f"{len(failed)} host(s) failed, more than maxFailures "
                    f"{spec.max_failures}, in wave {deploy.wave + 1}: {name}: {error}")
                break
            if outcome == "rollback":
                await self._enter_rollback(deploy, CANCELED, "canceled")
                break
            deploy.wave += 1
            await self._save(deploy)
        if deploy.phase == "rollback":
            await self._rollback(deploy, spec)

    @staticmethod
    def _success_note(deploy: Deploy, spec: DeploySpec) -> str:
        notes = []
        failed = sorted((h.finished_unix, n, h.error) for n, h in deploy.hosts.items()
                        if h.error)
        if failed:
            _, name, error = failed[-1]
            notes.append(f"{len(failed)} host(s) failed, within maxFailures "
                         f"{spec.max_failures}: {name}: {error}")
        if deploy.cancel:
            notes.append("cancel requested during the last wave, when every host had started")
        return "; ".join(notes)

    async def _stop_canceled(self, deploy: Deploy) -> None:
        untouched = 0
        for wave in deploy.waves[deploy.wave:]:
            if wave.state == W_PENDING:
                wave.state = W_SKIPPED
            for name in wave.hosts:
                host = deploy.hosts[name]
                if host.state == PENDING:
                    host.state = SKIPPED
                    untouched += 1
        await self._finish(deploy, CANCELED,
                           f"canceled after wave {deploy.wave} of {len(deploy.waves)}; "
                           f"{untouched} host(s) left untouched")

    async def _enter_rollback(self, deploy: Deploy, ending: str, reason: str) -> None:
        deploy.phase, deploy.ending, deploy.reason = "rollback", ending, reason
        for wave in deploy.waves:
            if wave.state == W_PENDING:
                wave.state = W_SKIPPED
            elif wave.state == RUNNING:
                wave.state = W_FAILED if ending == TERMINAL else CANCELED
                wave.finished_unix = wave.finished_unix or time.time()
        for host in deploy.hosts.values():
            if host.state == PENDING:
                host.state = SKIPPED
        await self._save(deploy)
        log.warning("deploy %s: rolling back: %s", deploy.id, reason)

    async def _sleep(self, deploy: Deploy) -> None:
        wake = self._wake[deploy.id]
        try:
            await asyncio.wait_for(wake.wait(), self.tick)
        except TimeoutError:
            pass
        wake.clear()

    async def _run_wave(self, deploy: Deploy, spec: DeploySpec, wave: Wave) -> str:
        """Converge and check one wave: "ok", "failed" (too many failures) or
        "rollback" (canceled with rollback)."""
        if wave.state == W_PENDING:
            wave.state, wave.started_unix = RUNNING, time.time()
            await self._save(deploy)
        if wave.state != RUNNING:
            return "ok"
        await self._start_hosts(deploy, spec, wave.hosts)
        deadlines = {name: time.monotonic() + spec.wave_timeout for name in wave.hosts}
        watches: dict[str, HostWatch] = {}
        checks: dict[str, asyncio.Task] = {}
        try:
            while True:
                if deploy.cancel and deploy.cancel["rollback"]:
                    return "rollback"
                changed = await self._judge(deploy, spec.image, wave.hosts, UPDATING,
                                            deadlines, watches, spec.wave_timeout,
                                            CHECKING if spec.health else CONVERGED)
                for name in wave.hosts:
                    host = deploy.hosts[name]
                    if host.state == CHECKING and name not in checks:
                        checks[name] = asyncio.create_task(self._check(spec, name))
                for name, task in list(checks.items()):
                    if task.done():
                        del checks[name]
                        healthy, seen = task.result()
                        host = deploy.hosts[name]
                        host.health = seen
                        host.finished_unix = time.time()
                        if healthy:
                            host.state = CONVERGED
                        else:
                            host.state, host.error = FAILED, f"health check failed: {seen}"
                        changed = True
                if deploy.failures() > spec.max_failures:
                    wave.finished_unix = time.time()
                    return "failed"
                if all(deploy.hosts[name].state in (CONVERGED, FAILED) for name in wave.hosts):
                    wave.state, wave.finished_unix = SUCCEEDED, time.time()
                    await self._save(deploy)
                    return "ok"
                if changed:
                    await self._save(deploy)
                await self._sleep(deploy)
        finally:
            for task in checks.values():
                task.cancel()
            for watch in watches.values():
                watch.close()

    async def _start_hosts(self, deploy: Deploy, spec: DeploySpec, names: list[str]) -> None:
        """Record each pending host's required image, then set the deploy's (and
        set it again for hosts a crash may have caught in between)."""
        pending = [name for name in names if deploy.hosts[name].state == PENDING]
        machines = await asyncio.to_thread(lambda: {name: self.mdb.get(name) for name in names})
        now = time.time()
        for name in pending:
            host, machine = deploy.hosts[name], machines[name]
            host.started_unix = now
            if machine is None:
                host.state, host.error = FAILED, "no longer in the MDB"
            elif machine.disable_updates:
                host.state, host.error = FAILED, "updates disabled for this host in the MDB"
            else:
                host.state, host.previous_image = UPDATING, machine.required_image
            if host.error:
                host.finished_unix = now
        await self._save(deploy)
        writes = [name for name in names if deploy.hosts[name].state == UPDATING
                  and machines[name] is not None
                  and machines[name].required_image != spec.image]
        if writes:
            def write() -> list[tuple[str, str]]:
                failed = []
                for name in writes:
                    try:
                        self.mdb.update(name, required_image=spec.image)
                    except FleetError as err:
                        failed.append((name, str(err)))
                return failed
            for name, error in await asyncio.to_thread(write):
                deploy.hosts[name].state, deploy.hosts[name].error = FAILED, error
            await self._save(deploy)

    async def _judge(self, deploy: Deploy, image: str, names: list[str], waiting: str,
                     deadlines: dict[str, float], watches: dict[str, HostWatch],
                     timeout: float, next_state: str) -> bool:
        """Move hosts in state `waiting` on: to `next_state` once the herd has them
        synced on `image`; failed on two failure verdicts of the herd, or when the
        deadline passes first. Deadlines wait while updates are disabled fleet-wide.
        Returns whether anything changed."""
        changed = False
        frozen = await asyncio.to_thread(self.state.updates_disabled)
        for name in names:
            host = deploy.hosts[name]
            if host.state != waiting:
                continue
            if frozen is not None:
                deadlines[name] += self.tick
            error = ""
            sub = self.herd.subs.get(name)
            if sub is None:
                if await asyncio.to_thread(self.mdb.get, name) is None:
                    error = "no longer in the MDB"
            else:
                watch = watches.get(name)
                if watch is None or watch.sub is not sub:
                    if watch is not None:
                        watch.close()
                    watch = watches[name] = HostWatch(sub, image)
                if sub.status in SYNCED and sub.machine.required_image == image:
                    record = await asyncio.to_thread(self.state.host, name)
                    if record.current_image == image:
                        host.state = next_state
                        if next_state != CHECKING:
                            host.finished_unix = time.time()
                        changed = True
                        continue
                if watch.verdicts >= FAILURE_VERDICTS:
                    error = watch.last
                elif sub.machine.disable_updates:
                    error = "updates disabled for this host in the MDB"
            if not error and time.monotonic() > deadlines[name]:
                now = f"{sub.status.value}{': ' + sub.last_error if sub.last_error else ''}" \
                    if sub is not None else "not in the herd"
                error = f"not synced on {image} within {timeout:g} s ({now})"
            if error:
                host.state = FAILED if waiting == UPDATING else ROLLBACK_FAILED
                if waiting == UPDATING:
                    host.error = error
                else:
                    host.rollback = error
                host.finished_unix = time.time()
                changed = True
        return changed

    async def _check(self, spec: DeploySpec, name: str) -> tuple[bool, str]:
        assert spec.health is not None
        sub = self.herd.subs.get(name)
        machine = sub.machine if sub is not None else Machine(name)
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=True)
        async with self._health_slots:
            return await spec.health.run(machine, self._client)

    async def _rollback(self, deploy: Deploy, spec: DeploySpec) -> None:
        """Give every host the deploy set its previous required image back (unless
        someone changed it since), wait until they hold it, and end."""
        image = spec.image
        targets = [name for name, host in deploy.hosts.items()
                   if host.previous_image is not None and host.previous_image != image
                   and host.state not in (ROLLED_BACK, ROLLBACK_FAILED)]
        if targets:
            def revert() -> dict[str, str]:
                outcome = {}
                for name in targets:
                    host = deploy.hosts[name]
                    machine = self.mdb.get(name)
                    if machine is None:
                        outcome[name] = "gone from the MDB"
                    elif machine.required_image not in (image, host.previous_image):
                        outcome[name] = (f"left alone: its required image is now "
                                         f"{machine.required_image or 'none'}")
                    else:
                        self.mdb.update(name, required_image=host.previous_image)
                        outcome[name] = ""
                return outcome
            for name, note in (await asyncio.to_thread(revert)).items():
                host = deploy.hosts[name]
                if note:
                    host.state, host.rollback = ROLLBACK_FAILED, note
                elif host.previous_image == "":
                    host.state = ROLLED_BACK
                    host.rollback = "required image cleared (it had none); files left as they are"
                else:
                    host.state = ROLLING_BACK
            await self._save(deploy)
        waiting = [name for name, host in deploy.hosts.items() if host.state == ROLLING_BACK]
        by_image: dict[str, list[str]] = {}
        for name in waiting:
            by_image.setdefault(deploy.hosts[name].previous_image or "", []).append(name)
        deadlines = {name: time.monotonic() + spec.wave_timeout for name in waiting}
        watches: dict[str, HostWatch] = {}
        try:
            while any(deploy.hosts[name].state == ROLLING_BACK for name in waiting):
                changed = False
                for previous, names in by_image.items():
                    changed |= await self._judge(deploy, previous, names, ROLLING_BACK,
                                                 deadlines, watches, spec.wave_timeout,
                                                 ROLLED_BACK)
                if changed:
                    await self._save(deploy)
                else:
                    await self._sleep(deploy)
        finally:
            for watch in watches.values():
                watch.close()
        rolled = sum(1 for host in deploy.hosts.values() if host.state == ROLLED_BACK)
        stuck = [name for name, host in deploy.hosts.items() if host.state == ROLLBACK_FAILED]
        reason = f"{deploy.reason}; rolled back {rolled} host(s)"
        if stuck:
            reason += f", rollback incomplete on {', '.join(stuck[:10])}"
        await self._finish(deploy, deploy.ending or TERMINAL, reason)
