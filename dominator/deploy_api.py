"""The deploy stage's HTTP API under /v1 (DESIGN.md "Deploy stage"): start a
deploy (or a dry run), follow it, list them, cancel one. Shaped for a Spinnaker
webhook stage: `Location` is the status URL, `$.status` is RUNNING, SUCCEEDED,
TERMINAL or CANCELED, `$.progress` a line for people. 429 and 503 mean "try
later"; every other 4xx is final. The engine is dominator/deploy.py."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from dominator.deploy import (
    CANCELED,
    DEFAULT_HEALTH_RETRIES,
    DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_WAVE_TIMEOUT,
    DEFAULT_WAVES,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Deploy,
    DeployEngine,
    DeployError,
    check_waves,
)
from dominator.http_app import HttpContext, context, require_token
from fleetlib.errors import FleetError
from fleetlib.fstree.image import check_image_name

MAX_KEY_LENGTH = 200
RETRY_AFTER_SECONDS = "5"


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
    """Run on each host once it is synced: a URL (GET; 2xx is healthy) or a command
    (run without a shell; exit 0 is healthy). `{host}` is the hostname, `{address}`
    the MDB address without its port."""

    url: str | None = Field(None, examples=["http://{host}:8080/healthz"])
    command: str | None = Field(None, examples=["check-host {host}"])
    timeout_seconds: float = Field(DEFAULT_HEALTH_TIMEOUT, gt=0, le=3600,
                                   description="Per attempt.")
    retries: int = Field(DEFAULT_HEALTH_RETRIES, ge=0, le=20,
                         description="Attempts after the first, with a short backoff.")

    @model_validator(mode="after")
    def url_or_command(self) -> HealthCheckBody:
        if bool(self.url) == bool(self.command):
            raise ValueError("give exactly one of url or command")
        return self


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


class CancelRequest(Strict):
    """POST /v1/deploys/{id}/cancel (the body is optional)."""

    rollback: bool = Field(False, description="Also give every host the deploy touched "
                                              "its previous image back.")


class Accepted(BaseModel):
    id: str
    status: str = Field(description=f"{RUNNING}, {SUCCEEDED}, {TERMINAL} or {CANCELED}")
    statusUrl: str


class TokenFirstRoute(APIRoute):
    """Checks the bearer token before anything else (the body included), so an
    unauthenticated caller gets 401 whatever it sends."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            require_token(request, context(request))
            return await handler(request)
        return checked


router = APIRouter(prefix="/v1", tags=["deploys"], route_class=TokenFirstRoute,
                   dependencies=[Depends(HTTPBearer(auto_error=False,
                                                    description="The dominator's API token"))])
ERRORS = {400: {"description": "Bad request (final)"},
          401: {"description": "Missing or wrong bearer token"},
          404: {"description": "No such deploy"},
          409: {"description": "Conflicts with another deploy or idempotency key (final)"},
          429: {"description": "Too many deploys running: try later"},
          503: {"description": "Cannot take the request now: try later"}}


def engine(ctx: Annotated[HttpContext, Depends(context)]) -> DeployEngine:
    """The deploy engine (503 when this dominator runs none)."""
    deploys = getattr(ctx, "deploys", None)
    if deploys is None:
        raise HTTPException(503, "this dominator runs no deploy engine")
    return deploys


Engine = Annotated[DeployEngine, Depends(engine)]


def status_url(request: Request, deploy_id: str) -> str:
    """Absolute, as a Spinnaker webhook stage follows `Location` as it is."""
    return str(request.url_for("get_deploy", deploy_id=deploy_id))


def refused(err: DeployError) -> HTTPException:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if err.status in (429, 503) else None
    return HTTPException(err.status, str(err), headers=headers)


def accepted(request: Request, response: Response, deploy: Deploy) -> Accepted:
    url = status_url(request, deploy.id)
    response.headers["Location"] = url
    return Accepted(id=deploy.id, status=deploy.status, statusUrl=url)


@router.post("/deploys", status_code=202, response_model=Accepted, responses=ERRORS,
             summary="Start a deploy (or a dry run)")
async def start_deploy(
        request: Request, response: Response, deploys: Engine,
        body: Annotated[DeployRequest, Body()],
        idempotency_key: Annotated[str | None, Header(
            max_length=MAX_KEY_LENGTH,
            description="The same key returns the same deploy, never a second one.")] = None,
) -> Accepted:
    """Roll `image` out to the selected hosts wave by wave: each wave sets the
    hosts' required image in the MDB, waits until they are synced, then runs the
    health gate before the next. More failures than `maxFailures` roll back every
    host the deploy touched and end it TERMINAL. Follow it at `Location`."""
    key = idempotency_key.strip() if idempotency_key else None
    try:
        request_json = body.model_dump(by_alias=True, exclude_none=True)
        deploy, new = await deploys.submit(request_json, key)
    except DeployError as err:
        raise refused(err) from None
    if not new:
        response.headers["Idempotent-Replayed"] = "true"
    return accepted(request, response, deploy)


@router.get("/deploys", responses=ERRORS, summary="List deploys, newest first")
async def list_deploys(
        request: Request, deploys: Engine,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        status: Annotated[str | None, Query(
            pattern=f"^({RUNNING}|{SUCCEEDED}|{TERMINAL}|{CANCELED})$")] = None,
) -> dict:
    try:
        found = await deploys.newest(limit, status)
    except DeployError as err:
        raise refused(err) from None
    return {"deploys": [deploy.summary(status_url(request, deploy.id)) for deploy in found]}


@router.get("/deploys/{deploy_id}", name="get_deploy", responses=ERRORS,
            summary="A deploy's status, progress, waves and hosts")
async def get_deploy(request: Request, deploy_id: str, deploys: Engine) -> dict:
    """`status` (RUNNING, SUCCEEDED, TERMINAL, CANCELED), `progress` (one line),
    `percent`, `reason` (why it ended so), `waves` and per-host detail (a dry
    run's hosts carry their `plan`)."""
    try:
        deploy = await deploys.lookup(deploy_id)
    except DeployError as err:
        raise refused(err) from None
    return deploy.view(status_url(request, deploy.id))


@router.post("/deploys/{deploy_id}/cancel", status_code=202, response_model=Accepted,
             responses=ERRORS, summary="Cancel a deploy")
async def cancel_deploy(request: Request, response: Response, deploy_id: str,
                        deploys: Engine,
                        body: Annotated[CancelRequest | None, Body()] = None) -> Accepted:
    """Stop after the hosts in flight and leave the rest untouched; with
    `{"rollback": true}`, also give every host it touched its previous image
    back. The deploy ends CANCELED (follow it at `Location`)."""
    try:
        deploy = await deploys.cancel(deploy_id, bool(body and body.rollback))
    except DeployError as err:
        raise refused(err) from None
    return accepted(request, response, deploy)
