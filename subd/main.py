"""`subd`: the agent on every host. It scans ROOT continuously (rate-limited),
fetches objects into ROOT/.subd, and applies updates the dominator sends."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import click
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetlib.cli.options import security_options
from fleetlib.cli.run import (
    CONTEXT_SETTINGS,
    EXIT_CODES_HELP,
    run,
    setup_logging,
    version_option,
)
from fleetlib.fstree.exclusions import DEFAULT_EXCLUSIONS, SUBD_DIR
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.rpc.ports import SUBD_PORT
from fleetlib.rpc.server import serve_metrics, serve_until_stopped, start_server
from fleetlib.rpc.tls import Security
from fleetlib.signing import TrustedKeys, load_trusted_keys
from fleetlib.wire import subd_pb2_grpc
from subd.fence import Fences
from subd.fetcher import Fetcher
from subd.scanner import ScanConfig, Scanner
from subd.service import SubdService
from subd.state import SubdState
from subd.trigger_runner import TriggerRunner
from subd.trust import TrustedImages
from subd.updater import Updater

log = logging.getLogger(__name__)

DEFAULT_PORT = SUBD_PORT


class SubdCollector(Collector):
    """subd's metrics, read at scrape time from the scanner and the service."""

    def __init__(self, scanner: Scanner, service: SubdService) -> None:
        self.scanner = scanner
        self.service = service

    def collect(self) -> Iterator[Metric]:
        scanner, status = self.scanner, self.service.status()
        yield CounterMetricFamily("subd_scans", "Scan passes completed.",
                                  value=scanner.scan_count)
        yield GaugeMetricFamily("subd_scan_duration_seconds", "How long the last pass took.",
                                value=scanner.last_scan_seconds)
        yield CounterMetricFamily("subd_scan_seconds", "Time spent scanning, in all.",
                                  value=scanner.scan_seconds_total)
        yield CounterMetricFamily("subd_scan_bytes_read", "Content bytes scan passes read.",
                                  value=scanner.bytes_hashed_total)
        yield GaugeMetricFamily("subd_last_scan_timestamp_seconds",
                                "When the last pass started (Unix time).",
                                value=scanner.last_scan_unix)
        yield GaugeMetricFamily("subd_generation",
                                "Rises whenever the tree or the object cache changes.",
                                value=scanner.generation)
        yield GaugeMetricFamily("subd_inodes", "Inodes in the last scanned tree.",
                                value=status.inodes)
        yield GaugeMetricFamily("subd_cached_objects", "Objects in the fetch cache.",
                                value=status.cached_objects)
        yield GaugeMetricFamily("subd_free_bytes", "Free bytes on ROOT's filesystem.",
                                value=status.free_bytes)
        yield CounterMetricFamily("subd_fetch_bytes",
                                  "Bytes the last (or current) fetch has fetched or copied.",
                                  value=status.fetch.bytes_done)
        token = GaugeMetricFamily("subd_fence_token",
                                  "The highest fencing token accepted from a dominator "
                                  "(0: none), labelled with its owner.", labels=["owner"])
        token.add_metric([status.fence.owner], status.fence.token)
        yield token
        yield CounterMetricFamily("subd_polls", "Poll calls answered.",
                                  value=self.service.polls)
        yield GaugeMetricFamily("subd_watchers", "Open Watch streams.",
                                value=self.service.watchers.count)
        yield CounterMetricFamily("subd_watches_refused",
                                  "Watch streams refused: as many were open as subd serves.",
                                  value=self.service.watchers.refused)
        yield CounterMetricFamily("subd_fenced_calls_refused",
                                  "Mutating calls refused for an older fencing token.",
                                  value=self.service.fences.refused)
        yield CounterMetricFamily("subd_unfenced_calls_refused",
                                  "Mutating calls refused for carrying no fence "
                                  "(--require-fence).",
                                  value=self.service.fences.unfenced_refused)


async def serve(root: Path, port: int, security: Security, config: ScanConfig,
                network_speed_percent: float, trigger_command: str, host: str,
                metrics_port: int = 0, trusted_keys: TrustedKeys | None = None,
                require_fence: bool = False) -> None:
    """Recover from any crash, start scanning, and serve until cancelled. With
    `trusted_keys`, only images signed by one of them are fetched for and applied;
    with `require_fence`, unfenced mutating calls are refused."""
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
    trust = TrustedImages(trusted_keys, security) if trusted_keys is not None else None
    service = SubdService(root, scanner, cache, fetcher, updater, state,
                          Fences.in_dir(state_dir, require_fence), trust)
    stop_metrics = serve_metrics(SubdCollector(scanner, service), host, metrics_port) \
        if metrics_port else None
    running = await start_server(
        [(subd_pb2_grpc.add_SubdServicer_to_server, service, "fleet.Subd")],
        port, security, host)
    scanner.start()
    log.info("subd serving %s on port %d%s%s%s", root, running.port,
             "" if os.geteuid() == 0 else " (not root: ownership cannot be set)",
             "" if trust is None else "; only images signed by a trusted key",
             "" if not require_fence else "; mutating calls without a fence refused")
    try:
        await serve_until_stopped(running)
    finally:
        scanner.stop()
        if stop_metrics is not None:
            stop_metrics()


@click.command(context_settings=CONTEXT_SETTINGS, epilog=EXIT_CODES_HELP)
@version_option("subd")
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
@click.option("--metrics-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics (scans, bytes read, generation, cached objects) "
                   "over plain HTTP at :PORT/metrics on --host; 0: off.")
@click.option("--trusted-keys", type=click.Path(path_type=Path),
              help="A folder of public keys (*.pub, from `dominator keys create`): fetch "
                   "for and apply only images signed by one of them. subd reads each "
                   "image's signed manifest from the image servers itself (its certificate "
                   "needs ImageServer.GetImage) and refuses a fetch or update that does not "
                   "match it. Default: no signature check.")
@click.option("--require-fence", is_flag=True,
              help="Refuse every Fetch, Update, Cleanup and SetConfiguration that carries "
                   "no fence (a dominator's lease token): once every dominator of the fleet "
                   "fences its calls, an operator's `dominator sub push-image` or a "
                   "dominator older than fencing can no longer change this host. Default: "
                   "unfenced calls are accepted (and logged once a token was seen).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@security_options
def command(root: Path, port: int, host: str, scan_speed_percent: float, cpu_percent: float,
            background_cpu_percent: float, network_speed_percent: float, verify_period: int,
            scan_exclusions: tuple[str, ...], trigger_command: str, metrics_port: int,
            trusted_keys: Path | None, require_fence: bool, verbose: bool,
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
    trusted = load_trusted_keys(trusted_keys) if trusted_keys is not None else None
    asyncio.run(serve(root.resolve(), port, security, config, network_speed_percent,
                      trigger_command, host, metrics_port, trusted, require_fence))


def main() -> None:
    """Console entry point."""
    run(command)


if __name__ == "__main__":
    main()
