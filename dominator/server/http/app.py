"""The dominator's HTTP application (FastAPI, on the same event loop as the gRPC
server): the deploy stage API under /v1 (bearer token), the dashboard, and /metrics
mounted as routers, and the embedded uvicorn that serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dominator.deploy.model import describe_invalid
from dominator.server.http.audit import audit_router
from dominator.server.http.context import HttpContext
from dominator.server.http.dashboard import dashboard_router
from dominator.server.http.deploys import router as deploy_router
from dominator.server.http.metrics import metrics_router
from fleetlib.errors import FleetError

log = logging.getLogger(__name__)


def make_app(ctx: HttpContext) -> FastAPI:
    """The whole HTTP application."""
    # No /docs or /redoc: FastAPI's pages load their scripts from a public CDN. The
    # schema stays at /openapi.json, for any OpenAPI viewer the operator runs.
    app = FastAPI(title="dominator", version="1", docs_url=None, redoc_url=None,
                  description="Deploy stage, dashboard and metrics of a dominator.")
    app.state.context = ctx

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """One clear message for a malformed request (400, not FastAPI's 422)."""
        return JSONResponse({"error": describe_invalid(exc.errors())}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Errors as {"error": message}."""
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        """200 while the dominator works; 503 with the reason while it cannot read the MDB."""
        if ctx.herd.mdb_error:
            return JSONResponse({"status": "unhealthy", "error": f"MDB: {ctx.herd.mdb_error}",
                                 "hosts": len(ctx.herd.subs)}, status_code=503)
        return JSONResponse({"status": "ok", "hosts": len(ctx.herd.subs)})

    app.include_router(dashboard_router(ctx))  # /, /hosts, /images, /deploys (+ .json)
    app.include_router(metrics_router(ctx))  # /metrics
    app.include_router(audit_router(ctx))  # /audit (+ .json)
    app.include_router(deploy_router)  # /v1/deploys

    return app


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our own event loop: signals stay ours (serve_until_stopped)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's hook for installing signal handlers: install none."""
        yield


@dataclass
class RunningHttp:
    """A started HTTP server: its port, and how to stop it."""

    server: EmbeddedServer
    task: asyncio.Task[None]
    port: int

    async def stop(self) -> None:
        """Finish requests in flight and close."""
        self.server.should_exit = True
        await asyncio.gather(self.task, return_exceptions=True)


async def serve_http(app: FastAPI, host: str, port: int) -> RunningHttp:
    """Bind HOST:PORT (FleetError when taken: the socket is ours, so uvicorn never
    exits the process) and serve `app` in this event loop."""
    bind_host = host.strip("[]") or "::"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind_host, port))
    except OSError as err:
        sock.close()
        raise FleetError(f"cannot listen on {host}:{port} (HTTP): {err.strerror}") from None
    sock.listen(128)
    server = EmbeddedServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    bound = sock.getsockname()[1]
    log.info("HTTP API, dashboard and /metrics on %s:%d", host, bound)
    return RunningHttp(server, task, bound)
