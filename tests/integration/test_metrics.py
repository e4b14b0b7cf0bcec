"""/metrics of a real fleet (conftest's `fleet`, with metrics ports): the dominator's agree with its
dashboard, and subd and the image server export sensible values on --metrics-port."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlib.testing.daemons import Daemon, free_port
from fleetlib.testing.fleet import HOSTS, FleetUnderTest, wait_for
from fleetlib.testing.trees import make_tree

METRICS_PORTS: dict[str, int] = {}  # daemon address -> its metrics port


@pytest.fixture
def imageserver(imageserver: Daemon) -> Iterator[Daemon]:
    """conftest's image server, restarted with --metrics-port."""
    imageserver.stop()
    port = free_port()
    imageserver.args = [*imageserver.args, "--metrics-port", str(port)]
    METRICS_PORTS[imageserver.address] = port
    yield imageserver.start()


@pytest.fixture
def start_subd(start_subd: Callable[..., Daemon]) -> Callable[..., Daemon]:
    """conftest's start_subd, each subd with --metrics-port."""
    def start(root: Path, *extra: str, **kwargs: object) -> Daemon:
        port = free_port()
        daemon = start_subd(root, "--metrics-port", str(port), *extra, **kwargs)
        METRICS_PORTS[daemon.address] = port
        return daemon
    return start


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from a Prometheus text endpoint."""
    reply = httpx.get(url, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text)
            for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_match_the_dashboard(fleet: FleetUnderTest) -> None:
    fleet.run("image", "add", "v1", str(make_tree(fleet.tmp / "v1")))
    for index, sub in enumerate(fleet.subs, 1):
        fleet.run("mdb", "set", f"host-{index}", "--address", sub.address,
                  "--required-image", "v1", "--tag", f"rack=r{index}")
    names = [f"host-{i}" for i in range(1, HOSTS + 1)]
    fleet.wait_status(names, "synced", "v1")
    base = f"http://127.0.0.1:{fleet.http_port}"

    def hosts_by_status() -> dict[str, float]:
        samples = scrape(f"{base}/metrics")
        return {dict(labels)["status"]: count for (name, labels), count in samples.items()
                if name == "dominator_hosts"}

    def agree() -> dict[str, float] | None:  # both read the same moment of a settled fleet
        metrics = hosts_by_status()
        counts = httpx.get(f"{base}/index.json", timeout=30).json()["by_status"]
        return metrics if {s: c for s, c in metrics.items() if c} == counts else None

    by_status = wait_for(agree, "/metrics and /index.json agree", timeout=20)
    assert by_status["synced"] == HOSTS and sum(by_status.values()) == HOSTS
    assert by_status["unreachable"] == 0  # every status has its gauge, zero or not

    dominator = scrape(f"{base}/metrics")
    assert value(dominator, "dominator_hosts_compliant") == HOSTS
    assert value(dominator, "dominator_updates_disabled") == 0
    assert value(dominator, "dominator_polls_total") >= HOSTS
    assert value(dominator, "dominator_poll_duration_seconds_count") == \
        value(dominator, "dominator_polls_total")
    assert value(dominator, "dominator_fetches_total") >= HOSTS  # empty roots fetch it all
    assert value(dominator, "dominator_fetch_failures_total") == 0
    assert value(dominator, "dominator_fetched_bytes_total") >= HOSTS * 30_000
    assert value(dominator, "dominator_updates_total") >= HOSTS
    assert value(dominator, "dominator_update_failures_total") == 0
    assert value(dominator, "dominator_update_duration_seconds_bucket", le="+Inf") >= HOSTS
    assert value(dominator, "dominator_diff_cache_misses_total") >= 1
    assert value(dominator, "dominator_diff_cache_hits_total") >= 1

    imageserver = scrape(f"http://127.0.0.1:{METRICS_PORTS[fleet.env['DOMINATOR_IMAGESERVER']]}"
                         "/metrics")
    assert value(imageserver, "imageserver_images") == 1
    assert value(imageserver, "imageserver_objects_stored") >= 5
    assert value(imageserver, "imageserver_image_bytes") > 30_000
    assert value(imageserver, "imageserver_received_bytes_total") > 30_000
    assert value(imageserver, "imageserver_served_bytes_total") >= HOSTS * 30_000
    assert value(imageserver, "imageserver_served_objects_total") >= HOSTS * 5

    for sub in fleet.subs:
        subd = scrape(f"http://127.0.0.1:{METRICS_PORTS[sub.address]}/metrics")
        assert value(subd, "subd_generation") > 0
        assert value(subd, "subd_scans_total") > 0
        assert value(subd, "subd_inodes") > 10
        assert value(subd, "subd_cached_objects") == 0  # all installed
        assert value(subd, "subd_free_bytes") > 0
        assert value(subd, "subd_last_scan_timestamp_seconds") > 0
        assert 0 <= value(subd, "subd_scan_duration_seconds") <= \
            value(subd, "subd_scan_seconds_total")

    # A file the scanner has not seen is read, and counted.
    first = f"http://127.0.0.1:{METRICS_PORTS[fleet.subs[0].address]}/metrics"
    before = value(scrape(first), "subd_scan_bytes_read_total")
    (fleet.roots[0] / "etc" / "extra").write_bytes(os.urandom(1 << 20))
    wait_for(lambda: value(scrape(first), "subd_scan_bytes_read_total") >= before + (1 << 20),
             "subd counts the bytes it read")
