"""What every HTTP router reaches (HttpContext, as a FastAPI dependency) and the
bearer token check of the deploy API."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from dominator.deploy.engine import DeployEngine
from dominator.herd.herd import Herd
from dominator.herd.images import ImageCache
from dominator.herd.state import DominatorState
from mdb.store import Mdb


@dataclass
class HttpContext:
    """What the HTTP handlers reach: the herd, its stores, and the API token."""

    herd: Herd
    state: DominatorState
    mdb: Mdb
    images: ImageCache
    token: str
    deploys: DeployEngine | None = None  # the deploy stage (dominator/deploy/)


def context(request: Request) -> HttpContext:
    """The app's context (a FastAPI dependency)."""
    return request.app.state.context


def require_token(request: Request,
                  ctx: Annotated[HttpContext, Depends(context)]) -> None:
    """401 unless the request carries `Authorization: Bearer <the token>`."""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer ...)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), ctx.token.encode()):
        raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
