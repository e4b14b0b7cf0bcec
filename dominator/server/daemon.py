"""The central daemon's wiring: the herd, the deploy engine, the admin gRPC API and
the HTTP side, started in order and stopped in the reverse order (like uvicorn's
main -> run() -> Server.startup()/shutdown()). `dominator serve` calls run()."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from dominator.deploy.engine import DeployEngine
from dominator.deploy.health import NO_CHECKS, NamedChecks
from dominator.herd.computed import Renderer
from dominator.herd.herd import Herd, HerdConfig
from dominator.herd.images import ImageCache
from dominator.herd.leases import DEFAULT_LEASE_SECONDS, DEFAULT_SHARDS
from dominator.herd.ownership import Ownership
from dominator.herd.state import STATE_FILE, DominatorState, shared_url
from dominator.herd.tokenstore import ApiTokens
from dominator.server.http.app import RunningHttp, make_app, serve_http
from dominator.server.http.context import HttpContext
from dominator.server.service import DominatorService
from fleetlib.auditlog import AuditLog
from fleetlib.errors import FleetError
from fleetlib.fstree.objectstore import write_file_atomically
from fleetlib.rpc.ports import DEPLOY_HTTP_PORT, DOMINATOR_PORT
from fleetlib.rpc.server import RunningServer, serve_until_stopped, start_server
from fleetlib.rpc.tls import Security
from fleetlib.sql.engine import describe_url, parse_url
from fleetlib.wire import dominator_pb2_grpc
from mdb.store import Mdb

log = logging.getLogger(__name__)

DEFAULT_PORT = DOMINATOR_PORT
DEFAULT_HTTP_PORT = DEPLOY_HTTP_PORT


def api_token(state_dir: Path, given: str | None) -> str:
    """The HTTP API's bearer token: the one given, else the one kept in the state
    directory (made on first start, readable by root only)."""
    if given:
        return given
    path = state_dir / "http-token"
    if not path.exists():
        write_file_atomically(path, secrets.token_urlsafe(32).encode(), mode=0o600)
        log.info("made an HTTP API token: %s", path)
    return path.read_text().strip()


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `dominator serve` was told."""

    state_dir: Path
    mdb_url: str
    herd: HerdConfig
    generators: Path | None
    port: int
    http_port: int
    host: str
    token: str
    security: Security
    health_checks: NamedChecks = NO_CHECKS  # the allow-listed named health checks
    name: str = ""  # in shard leases and fences ("": this machine's hostname:gRPC port)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    shards: int = DEFAULT_SHARDS
    mutation_delay: float = 0.0  # testing only: between the lease check and a mutation


def dominator_address(host: str, port: int) -> str:
    """Where peers reach this dominator's admin API: the address it listens on, or this
    machine's name when it listens on every address."""
    listening = host.strip("[]")
    if listening in ("", "::", "0.0.0.0"):
        listening = socket.gethostname()
    return f"[{listening}]:{port}" if ":" in listening else f"{listening}:{port}"


class Server:
    """One dominator: startup() brings every part up, shutdown() takes down what
    started, newest first. A long-lived task that ends by itself (the herd, the
    HTTP server) stops the whole daemon, loudly: `failure` says why and serve()
    exits with it, so a supervisor restarts a dominator that cannot do its work
    rather than one answering health checks while its hosts go unwatched."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.mdb: Mdb | None = None
        self.state: DominatorState | None = None
        self.images: ImageCache | None = None
        self.grpc: RunningServer | None = None
        self.deploys: DeployEngine | None = None
        self.http: RunningHttp | None = None
        self.herd: Herd | None = None
        self.herding: asyncio.Task[None] | None = None
        self.ownership: Ownership | None = None
        self.tokens: ApiTokens | None = None
        self.failure = ""  # why a task this daemon depends on died ("" while none did)
        self._stopping = False

    def watch(self, task: asyncio.Task[object]) -> None:
        """Stop the daemon if `task` ends before shutdown (by an error or not)."""
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[object]) -> None:
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        why = (f"{error.__class__.__name__}: {error}" if error is not None
               else "cancelled" if task.cancelled() else "returned")
        log.critical("task %r died (%s): stopping the dominator", task.get_name(), why,
                     exc_info=error)
        self.failure = self.failure or f"task {task.get_name()!r} died: {why}"
        if self.grpc is not None:  # ends serve_until_stopped, then serve() raises
            asyncio.ensure_future(self.grpc.server.stop(None))

    async def startup(self) -> None:
        """Open the stores, start the gRPC API, resume deploys, serve HTTP, run the herd."""
        config = self.config
        self.mdb = Mdb(config.mdb_url)
        # In the MDB's database when that is PostgreSQL: every dominator on it shares it.
        self.state = state = DominatorState(config.state_dir / STATE_FILE,
                                            shared_url(config.mdb_url))
        # Both shared with every dominator of the MDB when the state is (PostgreSQL).
        audit = AuditLog(state.database, "dominator")
        self.tokens = tokens = ApiTokens(state)
        self.images = ImageCache(config.herd.imageserver, config.security)
        self.ownership = ownership = Ownership(
            config.mdb_url, lease_seconds=config.lease_seconds, shards=config.shards,
            mutation_delay=config.mutation_delay)
        herd = Herd(self.mdb, state, self.images, Renderer(config.generators),
                    config.security, config.herd, ownership)
        self.grpc = await start_server(
            [(dominator_pb2_grpc.add_DominatorServicer_to_server,
              DominatorService(herd, state, self.mdb, audit, tokens), "fleet.Dominator")],
            config.port, config.security, config.host)
        address = dominator_address(config.host, self.grpc.port)
        await ownership.start(config.name or f"{socket.gethostname()}:{self.grpc.port}",
                              address)
        if state.shared:  # one audit log for every dominator of the MDB: each names itself
            audit.server = f"dominator {ownership.name}"
        self.deploys = DeployEngine(herd, state, self.mdb, self.images,
                                    health_checks=config.health_checks, name=ownership.name,
                                    lease_seconds=config.lease_seconds)
        await self.deploys.start()  # resumes the deploys a stop interrupted
        self.http = await serve_http(make_app(HttpContext(
            herd, state, self.mdb, self.images, config.token, deploys=self.deploys,
            tokens=tokens, audit=audit)),
            config.host, config.http_port)
        log.info("dominator on port %d (HTTP %d): MDB %s, image server %s", self.grpc.port,
                 self.http.port, describe_url(parse_url(config.mdb_url)),
                 config.herd.imageserver)
        self.herd = herd
        self.herding = asyncio.create_task(herd.run(), name="herd")
        self.watch(self.herding)
        self.watch(self.http.task)

    async def shutdown(self) -> None:
        """Stop what startup() started, in the reverse order."""
        self._stopping = True
        if self.deploys is not None:
            await self.deploys.stop()
        if self.herding is not None:
            self.herding.cancel()
            await asyncio.gather(self.herding, return_exceptions=True)
        elif self.ownership is not None:  # the herd never ran to give its shards back
            await self.ownership.close()
        if self.http is not None:
            await self.http.stop()
        if self.grpc is not None:  # stopped already, unless startup failed after it
            await self.grpc.server.stop(None)
        if self.images is not None:
            self.images.close()
        if self.mdb is not None:
            self.mdb.close()
        if self.tokens is not None:
            self.tokens.close()
        if self.state is not None:
            self.state.close()


async def serve(config: DaemonConfig) -> None:
    """Run one dominator until SIGTERM/SIGINT."""
    await run_server(Server(config))


async def run_server(server: Server) -> None:
    """Start `server` and serve until SIGTERM/SIGINT, then stop it; FleetError when
    it stopped because a task it depends on died."""
    try:
        await server.startup()
        assert server.grpc is not None
        await serve_until_stopped(server.grpc)
    finally:
        await server.shutdown()
    if server.failure:
        raise FleetError(server.failure)  # a one-line error and a non-zero exit


def run(config: DaemonConfig) -> None:
    """Run one dominator in a new event loop (the `dominator serve` program)."""
    asyncio.run(serve(config))
