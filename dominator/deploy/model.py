"""What a deploy is: its request, validated once (DeployRequest, the one set of rules
the HTTP API and a resumed deploy both go through), the spec made from it, and the
state of the deploy, its waves and its hosts as saved after every change."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from dominator.deploy.errors import DeployError
from dominator.deploy.health import (
    ALLOW_LIST_HINT,
    DEFAULT_HEALTH_RETRIES,
    DEFAULT_HEALTH_TIMEOUT,
    STORED_COMMAND,
    HealthCheck,
    NamedChecks,
)
from dominator.deploy.selector import selects
from dominator.deploy.waves import DEFAULT_WAVES, check_waves
from fleetlib.errors import FleetError
from fleetlib.fstree.imagename import check_image_name
from mdb.machine import Machine

DEFAULT_WAVE_TIMEOUT = 900.0


class DeployStatus(enum.StrEnum):
    """A deploy's status (the Spinnaker webhook stage's vocabulary)."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    TERMINAL = "TERMINAL"
    CANCELED = "CANCELED"


class HostState(enum.StrEnum):
    """One host within a deploy."""

    PENDING = "pending"                # not started: the MDB still holds its previous image
    UPDATING = "updating"              # required image set, waiting until the herd has it synced
    CHECKING = "checking"              # synced, health gate running
    CONVERGED = "succeeded"            # synced and healthy
    FAILED = "failed"                  # see its error
    SKIPPED = "skipped"                # never started (the deploy stopped first)
    ROLLING_BACK = "rollingBack"       # previous image set again, waiting until synced on it
    ROLLED_BACK = "rolledBack"
    ROLLBACK_FAILED = "rollbackFailed"
    PLANNED = "planned"                # dry run


class WaveState(enum.StrEnum):
    """One wave: RUNNING, SUCCEEDED and CANCELED as deploys, and its own."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    SKIPPED = "SKIPPED"                # no host of its own (rounding), or never started
    PLANNED = "PLANNED"                # dry run


class Phase(enum.StrEnum):
    """Where a running deploy is."""

    WAVES = "waves"
    ROLLBACK = "rollback"
    DONE = "done"


# The request, validated.

def describe_invalid(errors: Iterable[Mapping[str, Any]]) -> str:
    """One line for pydantic's validation errors: `where: what; ...` (`body` left out
    of where)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
        for err in errors)


class Strict(BaseModel):
    """camelCase on the wire; an unknown field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Select(Strict):
    """Exactly one of: hostnames, tags every selected host has, or all hosts."""

    hosts: list[str] | None = Field(None, description="Hostnames of the MDB.",
                                    examples=[["web-1", "web-2"]])
    tags: dict[str, str] | None = Field(None, description="Hosts carrying all these tags.",
                                        examples=[{"role": "web"}])
    all: bool | None = Field(None, description="Every host of the MDB (must be true).")

    @model_validator(mode="after")
    def one_selector(self) -> Select:
        given = [name for name in ("hosts", "tags", "all") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError('give exactly one of {"hosts": [...]}, {"tags": {...}} or '
                             '{"all": true}')
        if self.all is False:
            raise ValueError('{"all": false} selects nothing')
        if self.hosts is not None and not self.hosts:
            raise ValueError("empty selection: hosts is an empty list")
        if self.tags is not None and not self.tags:
            raise ValueError('empty tags: give at least one (or {"all": true})')
        return self


class HealthCheckBody(Strict):
    """Run on each host once it is synced: a URL (GET; 2xx is healthy) or a named
    check, a command the operator allow-listed on the server (`dominator serve
    --health-check NAME=COMMAND`, run without a shell; exit 0 is healthy). `{host}`
    is the hostname, `{address}` the MDB address without its port."""

    url: str | None = Field(None, examples=["http://{host}:8080/healthz"])
    check: str | None = Field(None, max_length=64, examples=["app-ready"],
                              description="The name of an allow-listed check.")
    timeout_seconds: float = Field(DEFAULT_HEALTH_TIMEOUT, gt=0, le=3600,
                                   description="Per attempt.")
    retries: int = Field(DEFAULT_HEALTH_RETRIES, ge=0, le=20,
                         description="Attempts after the first, with a short backoff.")

    @model_validator(mode="before")
    @classmethod
    def no_command(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "command" in data:
            raise ValueError('a request never carries a command line: give {"check": "NAME"}, '
                             "a named check the operator allow-lists with "
                             f"`{ALLOW_LIST_HINT}`, or a url")
        return data

    @model_validator(mode="after")
    def url_or_check(self) -> HealthCheckBody:
        if bool(self.url) == bool(self.check):
            raise ValueError("give exactly one of url or check")
        try:
            self.gate().validate()
        except DeployError as err:
            raise ValueError(str(err)) from None
        return self

    def gate(self) -> HealthCheck:
        """The health gate it asks for."""
        return HealthCheck(self.url or "", self.check or "", self.timeout_seconds,
                           self.retries)


class DeployRequest(Strict):
    """POST /v1/deploys."""

    image: str = Field(description="An image the image server holds.", examples=["web/2"])
    select: Select
    waves: list[str | int] = Field(
        list(DEFAULT_WAVES), examples=[["1", "10%", "100%"]],
        description='Cumulative: each is how many ("10") or what share ("25%") of the '
                    "selected hosts run the image once that wave is done. A last wave short "
                    "of every host is followed by an implied \"100%\".")
    max_failures: int = Field(0, ge=0, description="Failed hosts tolerated; one more stops "
                                                   "the deploy and rolls it back.")
    dry_run: bool = Field(False, description="Only plan: what each host would change.")
    health_check: HealthCheckBody | None = None
    wave_timeout_seconds: float = Field(
        DEFAULT_WAVE_TIMEOUT, gt=0, le=7 * 86400,
        description="How long a host of a wave may take to be synced before it counts as "
                    "failed (time while updates are disabled fleet-wide does not count).")
    allow_disruption: bool = Field(
        False, strict=True,
        description="Each host the deploy updates may run HighImpact triggers (reboots, "
                    "...): the deploy allows it once, just before it updates the host.")
    max_disruptions: int | None = Field(
        None, ge=1, strict=True,
        description="With allowDisruption: at most this many hosts of a wave are being "
                    "updated (so possibly disrupted) at a time; the others of the wave wait "
                    "until one is synced. Absent: no limit.")

    @field_validator("image")
    @classmethod
    def image_name(cls, name: str) -> str:
        try:
            return check_image_name(name)
        except FleetError as err:
            raise ValueError(str(err)) from None

    @field_validator("waves")
    @classmethod
    def wave_specs(cls, waves: list[str | int]) -> list[str]:
        try:
            return check_waves(str(wave) for wave in waves)
        except DeployError as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def disruptions_need_allowance(self) -> DeployRequest:
        if self.max_disruptions is not None and not self.allow_disruption:
            raise ValueError("maxDisruptions needs allowDisruption: true")
        return self

    def to_json(self) -> dict[str, Any]:
        """The request as stored with its deploy (camelCase, defaults filled in; no
        allowDisruption when false, so a request stored before it existed still
        matches its replay under the same Idempotency-Key)."""
        stored = self.model_dump(by_alias=True, exclude_none=True)
        if not self.allow_disruption:
            del stored["allowDisruption"]
        return stored


class CancelRequest(Strict):
    """POST /v1/deploys/{id}/cancel (the body is optional)."""

    rollback: bool = Field(False, description="Also give every host the deploy touched "
                                              "its previous image back.")


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
    allow_disruption: bool = False
    max_disruptions: int | None = None  # hosts of a wave in flight at once (None: all)

    @classmethod
    def from_request(cls, request: Mapping[str, Any],
                     checks: NamedChecks | None = None) -> DeploySpec:
        """Parse and check a request by DeployRequest's rules, its named check
        against `checks` when given (DeployError says what is wrong, as the HTTP
        API's 400 does)."""
        try:
            body = DeployRequest.model_validate(request)
        except ValidationError as err:
            raise DeployError(describe_invalid(err.errors())) from None
        spec = cls.of(body)
        if checks is not None and spec.health is not None and spec.health.check:
            checks.command(spec.health.check)
        return spec

    @classmethod
    def of(cls, body: DeployRequest) -> DeploySpec:
        """The spec of a validated request."""
        return cls(body.image, body.select.model_dump(by_alias=True, exclude_none=True),
                   tuple(str(wave) for wave in body.waves), body.max_failures, body.dry_run,
                   body.health_check.gate() if body.health_check else None,
                   body.wave_timeout_seconds, body.allow_disruption, body.max_disruptions)

    def selects(self, machine: Machine) -> bool:
        """Whether the selector takes this machine (by tags or all; hosts are by name)."""
        return selects(self.select, machine.tags)


# A deploy's state.

@dataclass
class HostProgress:
    """One host within a deploy."""

    wave: int                          # 1-based
    state: HostState = HostState.PENDING
    previous_image: str | None = None  # its required image before the deploy set it
    error: str = ""                    # why it failed (a failed host keeps it)
    health: str = ""                   # the last health check's outcome
    rollback: str = ""                 # how its rollback went, when it had one
    started_unix: float = 0.0
    finished_unix: float = 0.0
    plan: dict[str, Any] | None = None  # dry run
    disruption_granted: bool = False   # holds a HighImpact allowance the deploy gave it

    def __post_init__(self) -> None:
        self.state = HostState(self.state)


@dataclass
class Wave:
    """One wave: its spec, how many hosts are converged once it is done, its hosts."""

    spec: str
    target: int
    hosts: list[str]
    implied: bool = False
    state: WaveState = WaveState.PENDING
    started_unix: float = 0.0
    finished_unix: float = 0.0

    def __post_init__(self) -> None:
        self.state = WaveState(self.state)


@dataclass
class Deploy:
    """A deploy, as saved after every change."""

    id: str
    idempotency_key: str | None
    request: dict[str, Any]
    waves: list[Wave]
    hosts: dict[str, HostProgress]
    status: DeployStatus = DeployStatus.RUNNING
    reason: str = ""
    phase: Phase = Phase.WAVES
    wave: int = 0                      # index of the wave in progress
    ending: str = ""                   # status once the rollback is done
    cancel: dict[str, Any] | None = None
    started_by: str = ""               # who asked for it (`token:NAME`; "" before it was kept)
    runner: str = ""                   # the dominator running it (its row's lease, not saved here)
    created_unix: float = field(default_factory=time.time)
    updated_unix: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.status, self.phase = DeployStatus(self.status), Phase(self.phase)

    @property
    def spec(self) -> DeploySpec:
        """The stored request's spec. A healthCheck.command stored before named checks
        is never run: it fails the health gate of every host it reaches."""
        check = self.request.get("healthCheck")
        if not isinstance(check, dict) or "command" not in check:
            return DeploySpec.from_request(self.request)
        spec = DeploySpec.from_request({k: v for k, v in self.request.items()
                                        if k != "healthCheck"})
        return replace(spec, health=HealthCheck(retries=0, refusal=STORED_COMMAND))

    @property
    def dry_run(self) -> bool:
        return bool(self.request.get("dryRun"))

    def failures(self) -> int:
        return sum(1 for host in self.hosts.values() if host.error)

    def converged(self) -> int:
        return sum(1 for host in self.hosts.values() if host.state == HostState.CONVERGED)

    def percent(self) -> int:
        total = len(self.hosts) or 1
        done = (sum(1 for h in self.hosts.values() if h.state != HostState.PENDING)
                if self.dry_run else self.converged())
        return done * 100 // total

    def progress(self) -> str:
        """One line for people and Spinnaker's progressJsonPath."""
        total = len(self.hosts)
        if self.dry_run:
            planned = [h for h in self.hosts.values() if h.state == HostState.PLANNED]
            changing = sum(1 for h in planned if h.plan and h.plan["changes"]["count"])
            stopped = sum(1 for h in self.hosts.values()
                          if h.error or (h.plan and h.plan["wouldStop"]))
            return (f"dry run: {len(planned)}/{total} hosts planned, {changing} would change, "
                    f"{stopped} would be stopped")
        text = f"{self.converged()}/{total} hosts converged, {self.failures()} failed"
        if self.status != DeployStatus.RUNNING:
            rolled = sum(1 for h in self.hosts.values() if h.state == HostState.ROLLED_BACK)
            return text + (f", {rolled} rolled back" if rolled else "")
        if self.phase == Phase.ROLLBACK:
            rolling = sum(1 for h in self.hosts.values() if h.state == HostState.ROLLING_BACK)
            return text + f", rolling back ({rolling} to go)"
        where = f"wave {min(self.wave + 1, len(self.waves))}/{len(self.waves)}"
        if self.cancel:
            return text + f", canceling: finishing {where}"
        return text + f", {where}"

    def to_record(self) -> dict[str, Any]:
        """The saved form (snake_case, as the dataclasses name things)."""
        record = asdict(self)
        record.pop("request")
        record.pop("runner")
        return record

    @classmethod
    def from_row(cls, request: dict[str, Any], record: dict[str, Any]) -> Deploy:
        record = dict(record)
        waves = [Wave(**wave) for wave in record.pop("waves")]
        hosts = {name: HostProgress(**host) for name, host in record.pop("hosts").items()}
        return cls(request=request, waves=waves, hosts=hosts, **record)
