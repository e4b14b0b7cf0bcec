"""What every HTTP router reaches (HttpContext, as a FastAPI dependency), the
bearer token check of the deploy API (the default admin token, or a named token
whose scope covers the request: `read` may GET, `deploy` may also POST), and the
audit entries HTTP callers leave (who: `token:NAME`)."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from dominator.deploy.engine import DeployEngine
from dominator.herd.herd import Herd
from dominator.herd.images import ImageCache
from dominator.herd.state import DominatorState
from dominator.herd.tokens import ADMIN, permits
from dominator.herd.tokenstore import ApiTokens
from fleetlib.auditlog import AuditLog
from mdb.store import Mdb

READ_METHODS = frozenset({"GET", "HEAD"})  # what the `read` scope may do


@dataclass
class HttpContext:
    """What the HTTP handlers reach: the herd, its stores, and the API tokens."""

    herd: Herd
    state: DominatorState
    mdb: Mdb
    images: ImageCache
    token: str  # the default admin token
    deploys: DeployEngine | None = None  # the deploy stage (dominator/deploy/)
    tokens: ApiTokens | None = None  # the named, scoped tokens
    audit: AuditLog | None = None


def context(request: Request) -> HttpContext:
    """The app's context (a FastAPI dependency)."""
    ctx: HttpContext = request.app.state.context
    return ctx


def require_token(request: Request,
                  ctx: Annotated[HttpContext, Depends(context)]) -> None:
    """401 unless the request carries `Authorization: Bearer <a token in force>`,
    403 when that token's scope does not cover the request. Notes who called
    (`request.state.caller`, for audit entries)."""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer ...)",
                            headers={"WWW-Authenticate": "Bearer"})
    if ctx.token and hmac.compare_digest(given.encode(), ctx.token.encode()):
        name, scope = ADMIN, ADMIN
    else:
        token = ctx.tokens.check(given) if ctx.tokens is not None else None
        if token is None:
            raise HTTPException(401, "unknown or revoked bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        name, scope = token.name, token.scope
    needed = "read" if request.method in READ_METHODS else "deploy"
    if not permits(scope, needed):
        raise HTTPException(403, f"token {name!r} has scope {scope}: {request.method} "
                                 f"{request.url.path} needs scope {needed}")
    request.state.caller = f"token:{name}"


async def audit(request: Request, action: str, summary: str, **details: Any) -> None:
    """Record a change an HTTP caller made (after require_token let it in)."""
    log = context(request).audit
    if log is not None:
        await asyncio.to_thread(log.record, getattr(request.state, "caller", "unknown"),
                                action, summary, **details)
