"""`dominator serve`: the central daemon: the herd plus its admin gRPC API."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

import click

from dominator.deploy.engine import DeployEngine
from dominator.herd.computed import Renderer
from dominator.herd.herd import Herd, HerdConfig
from dominator.herd.images import ImageCache
from dominator.herd.state import DominatorState
from dominator.http_app import HttpContext, make_app, serve_http
from dominator.service import DominatorService
from fleetlib.cli.options import address_option, security_options
from fleetlib.cli.run import setup_logging
from fleetlib.fstree.objectstore import write_file_atomically
from fleetlib.rpc.server import serve_until_stopped, start_server
from fleetlib.rpc.tls import Security
from fleetlib.wire import dominator_pb2_grpc
from mdb.store import Mdb

log = logging.getLogger(__name__)

DEFAULT_PORT = 6970
DEFAULT_HTTP_PORT = 6980


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


async def serve(state_dir: Path, mdb_url: str, config: HerdConfig, generators: Path | None,
                port: int, http_port: int, host: str, token: str, security: Security) -> None:
    """Run the herd, the admin gRPC API and the HTTP side until SIGTERM/SIGINT."""
    mdb = Mdb(mdb_url)
    state = DominatorState(state_dir / "dominator.sqlite")
    images = ImageCache(config.imageserver, security)
    herd = Herd(mdb, state, images, Renderer(generators), security, config)
    running = await start_server(
        [(dominator_pb2_grpc.add_DominatorServicer_to_server,
          DominatorService(herd, state, mdb), "fleet.Dominator")], port, security, host)
    deploys = DeployEngine(herd, state, mdb, images)
    await deploys.start()  # resumes the deploys a stop interrupted
    http = await serve_http(make_app(HttpContext(herd, state, mdb, images, token,
                                                 deploys=deploys)), host, http_port)
    log.info("dominator on port %d (HTTP %d): MDB %s, image server %s", running.port,
             http.port, mdb_url, config.imageserver)
    herding = asyncio.create_task(herd.run(), name="herd")
    try:
        await serve_until_stopped(running)
    finally:
        await deploys.stop()
        herding.cancel()
        await asyncio.gather(herding, return_exceptions=True)
        await http.stop()
        images.close()
        mdb.close()


@click.command(name="serve")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the dominator's own state (created if missing).")
@click.option("--mdb-url", envvar="DOMINATOR_MDB_URL", show_envvar=True,
              help="SQLAlchemy URL of the machine database (default: SQLite in the state dir; "
                   "postgresql+psycopg://... for large fleets).")
@address_option("imageserver", "DOMINATOR_IMAGESERVER", "localhost:6971", "The image server.")
@click.option("--generators", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of computed-file generators (jinja2 templates or programs).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port of the admin API.")
@click.option("--http-port", default=DEFAULT_HTTP_PORT, show_default=True,
              type=click.IntRange(0, 65535),
              help="Port of the deploy stage API, the dashboard and /metrics.")
@click.option("--token", envvar="DOMINATOR_TOKEN", show_envvar=True,
              help="Bearer token of the HTTP API (default: made once, kept in the state dir).")
@click.option("--host", default="[::]", show_default=True, help="Address to listen on.")
@click.option("--poll-interval", default=5.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between two convergence cycles of one sub.")
@click.option("--poll-slots", default=200, show_default=True, type=click.IntRange(1),
              help="Polls in flight at once.")
@click.option("--fetch-slots", default=50, show_default=True, type=click.IntRange(1),
              help="Fetches in flight at once.")
@click.option("--update-slots", default=50, show_default=True, type=click.IntRange(1),
              help="Updates in flight at once.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@security_options
def serve_command(state_dir: Path, mdb_url: str | None, imageserver: str,
                  generators: Path | None, port: int, http_port: int, token: str | None,
                  host: str, poll_interval: float,
                  poll_slots: int, fetch_slots: int, update_slots: int, verbose: bool,
                  security: Security) -> None:
    """Run the dominator: keep every sub of the MDB on its required image.

    Reads the MDB, polls each sub, fetches and pushes what differs, restarts
    only what changed, and stops itself where an update looks unsafe.
    """
    setup_logging(verbose)
    state_dir.mkdir(parents=True, exist_ok=True)
    config = HerdConfig(imageserver=imageserver, poll_interval=poll_interval,
                        poll_slots=poll_slots, fetch_slots=fetch_slots,
                        update_slots=update_slots)
    url = mdb_url or f"sqlite:///{state_dir.resolve() / 'mdb.sqlite'}"
    asyncio.run(serve(state_dir, url, config, generators, port, http_port, host,
                      api_token(state_dir, token), security))
