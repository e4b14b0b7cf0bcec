"""The dashboard's audit page: /audit and its twin /audit.json, the dominator's
audit log newest first (read-only and open like every dashboard page; entries
never hold secrets). The image server's log is read with `dominator audit`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from dominator.server.http.context import HttpContext
from dominator.server.http.templating import make_environment, render_page

DEFAULT_LIMIT = 200
Limit = Annotated[int, Query(ge=1, le=10_000)]


def audit_router(ctx: HttpContext) -> APIRouter:
    """GET /audit and /audit.json."""
    env = make_environment()
    router = APIRouter(include_in_schema=False)

    async def newest(limit: int) -> list[dict[str, Any]]:
        if ctx.audit is None:
            return []
        entries = await asyncio.to_thread(ctx.audit.entries, limit)
        return [entry.to_json() for entry in reversed(entries)]

    @router.get("/audit")
    async def audit_page(request: Request, limit: Limit = DEFAULT_LIMIT) -> HTMLResponse:
        return render_page(env, request, "audit.html", f"/audit.json?limit={limit}",
                           "Audit log", entries=await newest(limit), limit=limit)

    @router.get("/audit.json")
    async def audit_json(limit: Limit = DEFAULT_LIMIT) -> dict[str, Any]:
        return {"server": "dominator", "entries": await newest(limit)}

    return router
