"""`subd`: the agent on every host. It scans ROOT continuously (rate-limited),
fetches objects into ROOT/.subd, and applies updates the dominator sends."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import click

from fstree.objectstore import ObjectStore
from proto import subd_pb2_grpc
from rpc.cli import run, setup_logging
from rpc.options import security_options
from rpc.server import serve_until_stopped, start_server
from rpc.tls import Security
from subd.fetcher import Fetcher
from subd.scanner import DEFAULT_EXCLUSIONS, SUBD_DIR, ScanConfig, Scanner
from subd.service import SubdService
from subd.state import SubdState
from subd.trigger_runner import TriggerRunner
from subd.updater import Updater

log = logging.getLogger(__name__)

DEFAULT_PORT = 6969


async def serve(root: Path, port: int, security: Security, config: ScanConfig,
                network_speed_percent: float, trigger_command: str, host: str) -> None:
    """Recover from any crash, start scanning, and serve until cancelled."""
    state_dir = root / SUBD_DIR
    state_dir.mkdir(mode=0o700, exist_ok=True)
    cache = ObjectStore(state_dir / "objects")
    cache.recover()
    state = SubdState(state_dir / "state.json")
    runner = TriggerRunner(trigger_command)
    updater = Updater(root, cache, state, runner)
    updater.recover()  # leftovers of a killed update; runs starts still pending
    scanner = Scanner(root, config, state_dir)
    fetcher = Fetcher(root, cache, security, network_speed_percent, lambda: scanner.tree,
                      scanner.bump_generation)
    service = SubdService(root, scanner, cache, fetcher, updater, state)
    running = await start_server(
        [(subd_pb2_grpc.add_SubdServicer_to_server, service, "fleet.Subd")],
        port, security, host)
    scanner.start()
    log.info("subd serving %s on port %d%s", root, running.port,
             "" if os.geteuid() == 0 else " (not root: ownership cannot be set)")
    try:
        await serve_until_stopped(running)
    finally:
        scanner.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False,
                                                       path_type=Path),
              help="The tree this agent owns: / in production, a folder in tests.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port.")
@click.option("--host", default="[::]", show_default=True, help="Address to listen on.")
@click.option("--scan-speed-percent", default=2.0, show_default=True,
              type=click.FloatRange(0, 100),
              help="Scan reads as a share of the device's measured read bandwidth (0: no limit).")
@click.option("--cpu-percent", default=50.0, show_default=True, type=click.FloatRange(0, 100),
              help="CPU share of one core a scan may use while it runs.")
@click.option("--background-cpu-percent", default=1.5, show_default=True,
              type=click.FloatRange(0, 100),
              help="Long-run CPU share of continuous scanning (sets the pause between scans, "
                   "at least 1 s).")
@click.option("--network-speed-percent", default=10.0, show_default=True,
              type=click.FloatRange(0, 100),
              help="Fetch bandwidth as a share of the network interface's speed "
                   "(loopback and unknown speeds: unlimited).")
@click.option("--verify-period", default=86400, show_default=True, type=click.IntRange(1),
              help="Seconds within which every file is re-hashed, spread over the scans.")
@click.option("--scan-exclude", "scan_exclusions", multiple=True,
              help="A path regex subd does not scan, repeatable (replaces the defaults: "
                   + ", ".join(DEFAULT_EXCLUSIONS) + ").")
@click.option("--trigger-command", default="systemctl {action} {service}", show_default=True,
              help="How to stop/start/reload a service; {action} and {service} are filled in.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@security_options
def command(root: Path, port: int, host: str, scan_speed_percent: float, cpu_percent: float,
            background_cpu_percent: float, network_speed_percent: float, verify_period: int,
            scan_exclusions: tuple[str, ...], trigger_command: str, verbose: bool,
            security: Security) -> None:
    """Scan ROOT continuously and converge it onto images when the dominator asks.

    Private state lives in ROOT/.subd (same filesystem, so installs are renames);
    subd never scans, reports or touches it otherwise.
    """
    setup_logging(verbose)
    config = ScanConfig(scan_speed_percent=scan_speed_percent, cpu_percent=cpu_percent,
                        background_cpu_percent=background_cpu_percent,
                        verify_period_seconds=verify_period,
                        exclusions=list(scan_exclusions or DEFAULT_EXCLUSIONS))
    asyncio.run(serve(root.resolve(), port, security, config, network_speed_percent,
                      trigger_command, host))


def main() -> None:
    """Console entry point."""
    run(command)


if __name__ == "__main__":
    main()
