"""`imageserver`: the image and object server daemon."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from imageserver.service import ImageService, ObjectService, expire_images
from imageserver.store import ImageStore
from proto import imageserver_pb2_grpc, objectserver_pb2_grpc
from rpc.cli import run, setup_logging
from rpc.options import security_options
from rpc.server import serve_until_stopped, start_server
from rpc.tls import Security

log = logging.getLogger(__name__)

DEFAULT_PORT = 6971


async def serve(state_dir: Path, port: int, security: Security, host: str = "[::]") -> None:
    """Load the store and serve until cancelled."""
    store = ImageStore(state_dir)
    store.load()
    running = await start_server(
        [(objectserver_pb2_grpc.add_ObjectServerServicer_to_server, ObjectService(store),
          "fleet.ObjectServer"),
         (imageserver_pb2_grpc.add_ImageServerServicer_to_server, ImageService(store),
          "fleet.ImageServer")],
        port, security, host)
    log.info("image server listening on port %d, state in %s", running.port, state_dir)
    expiry = asyncio.create_task(expire_images(store))
    try:
        await serve_until_stopped(running)
    finally:
        expiry.cancel()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the objects and images (created if missing).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0 picks a free one).")
@click.option("--host", default="[::]", show_default=True, help="Address to listen on.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@security_options
def command(state_dir: Path, port: int, host: str, verbose: bool, security: Security) -> None:
    """Serve images and their content-addressed objects over gRPC (mutual TLS).

    Images are immutable trees added with `dominator image add`; objects are
    verified against their SHA-256 on arrival and stored crash-safely.
    """
    setup_logging(verbose)
    asyncio.run(serve(state_dir, port, security, host))


def main() -> None:
    """Console entry point."""
    run(command)


if __name__ == "__main__":
    main()
