"""The deploy stage's HTTP API under /v1 (docs/DESIGN.md "Deploy stage"): start a
deploy (or a dry run), follow it, list them, cancel one. Shaped for a Spinnaker
webhook stage: `Location` is the status URL, `$.status` is RUNNING, SUCCEEDED,
TERMINAL or CANCELED, `$.progress` a line for people. 429 and 503 mean "try
later"; every other 4xx is final. The engine is dominator/deploy/engine.py."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

from dominator.deploy.engine import DeployEngine
from dominator.deploy.errors import Busy, Conflict, DeployError, Unavailable, UnknownDeploy
from dominator.deploy.model import CancelRequest, Deploy, DeployRequest, DeployStatus
from dominator.deploy.views import deploy_summary, deploy_view
from dominator.server.http.context import HttpContext, audit, context, require_token

MAX_KEY_LENGTH = 200
RETRY_AFTER_SECONDS = "5"


STATUSES = [status.value for status in DeployStatus]
# The HTTP status of each kind of refusal (any other DeployError: 400).
REFUSALS: dict[type[DeployError], int] = {UnknownDeploy: 404, Conflict: 409, Busy: 429,
                                          Unavailable: 503}
TRY_LATER = {429, 503}


class Accepted(BaseModel):
    id: str
    status: str = Field(description=", ".join(STATUSES[:-1]) + f" or {STATUSES[-1]}")
    statusUrl: str


class Canceling(Accepted):
    progress: str = Field(description="One line: `canceling` while the deploy stops.")
    runner: str = Field(description="The dominator running the deploy: it stops it (at its "
                                    "next lease round when that is another dominator).")


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
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad request (final)"},
    401: {"description": "Missing or wrong bearer token"},
    404: {"description": "No such deploy"},
    409: {"description": "Conflicts with another deploy or idempotency key (final)"},
    429: {"description": "Too many deploys running: try later"},
    503: {"description": "Cannot take the request now: try later"}}


def engine(ctx: Annotated[HttpContext, Depends(context)]) -> DeployEngine:
    """The deploy engine (503 when this dominator runs none)."""
    deploys = ctx.deploys
    if deploys is None:
        raise HTTPException(503, "this dominator runs no deploy engine")
    return deploys


Engine = Annotated[DeployEngine, Depends(engine)]


def status_url(request: Request, deploy_id: str) -> str:
    """Absolute, as a Spinnaker webhook stage follows `Location` as it is."""
    return str(request.url_for("get_deploy", deploy_id=deploy_id))


def refused(err: DeployError) -> HTTPException:
    """The HTTP answer to a refusal: its kind's status ("try later" ones say when)."""
    status = next((code for kind, code in REFUSALS.items() if isinstance(err, kind)), 400)
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status in TRY_LATER else None
    return HTTPException(status, str(err), headers=headers)


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
        deploy, new = await deploys.submit(body.to_json(), key,
                                           getattr(request.state, "caller", ""))
    except DeployError as err:
        raise refused(err) from None
    if not new:
        response.headers["Idempotent-Replayed"] = "true"
    else:  # the audit entry names no health check settings: they may hold credentials
        await audit(request, "deploy.start", f"started {'a dry run' if body.dry_run else 'deploy'}"
                    f" {deploy.id} of {body.image}", deploy=deploy.id, image=body.image,
                    dry_run=body.dry_run, waves=body.waves, max_failures=body.max_failures,
                    allow_disruption=body.allow_disruption,
                    max_disruptions=body.max_disruptions)
    return accepted(request, response, deploy)


@router.get("/deploys", responses=ERRORS, summary="List deploys, newest first")
async def list_deploys(
        request: Request, deploys: Engine,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        status: Annotated[str | None, Query(
            pattern=f"^({'|'.join(STATUSES)})$")] = None,
        dry_run: Annotated[bool | None, Query(
            description="true: only dry runs; false: no dry runs; absent: both.")] = None,
) -> dict[str, Any]:
    """`deploys`: each with its `status`, `progress`, `wave` of `waves`, who
    started it (`started_by`) and when (`createdUnix`, also `created_unix`)."""
    try:
        found = await deploys.newest(limit, status, dry_run)
    except DeployError as err:
        raise refused(err) from None
    return {"deploys": [deploy_summary(deploy, status_url(request, deploy.id)) for deploy in found]}


@router.get("/deploys/{deploy_id}", name="get_deploy", responses=ERRORS,
            summary="A deploy's status, progress, waves and hosts")
async def get_deploy(request: Request, deploy_id: str, deploys: Engine) -> dict[str, Any]:
    """`status` (RUNNING, SUCCEEDED, TERMINAL, CANCELED), `progress` (one line),
    `percent`, `reason` (why it ended so), `waves` and per-host detail (a dry
    run's hosts carry their `plan`)."""
    try:
        deploy = await deploys.lookup(deploy_id)
    except DeployError as err:
        raise refused(err) from None
    return deploy_view(deploy, status_url(request, deploy.id))


@router.post("/deploys/{deploy_id}/cancel", status_code=202, response_model=Canceling,
             responses=ERRORS, summary="Cancel a deploy")
async def cancel_deploy(request: Request, response: Response, deploy_id: str,
                        deploys: Engine,
                        body: Annotated[CancelRequest | None, Body()] = None) -> Canceling:
    """Stop after the hosts in flight and leave the rest untouched; with
    `{"rollback": true}`, also give every host it touched its previous image
    back. The deploy ends CANCELED (follow it at `Location`). Any dominator takes
    the request; the one running the deploy (`runner`) stops it."""
    try:
        deploy = await deploys.cancel(deploy_id, bool(body and body.rollback))
    except DeployError as err:
        raise refused(err) from None
    rollback = bool(body and body.rollback)
    await audit(request, "deploy.cancel", f"cancelled deploy {deploy.id}"
                + (" with rollback" if rollback else ""), deploy=deploy.id, rollback=rollback)
    return Canceling(**accepted(request, response, deploy).model_dump(),
                     progress=deploy.progress(), runner=deploy.runner)
