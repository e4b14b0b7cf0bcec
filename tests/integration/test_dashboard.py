"""The dashboard against a real fleet (image server, dominator, five subd and one
host nobody answers for): JSON twins, pages, filters and sorting, escaping, and
what a real browser (headless Chromium) shows."""

from __future__ import annotations

import html.parser
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetlib.rpc.tls import Security
from fleetlib.testing.daemons import PROJECT, Daemon, free_port, imageserver_daemon
from fleetlib.testing.fleet import TOKEN, FleetUnderTest, wait_for
from fleetlib.testing.trees import make_tree

HOSTILE = '<script>alert("owned")</script>'
SYNCED = [f"host-{i}" for i in range(1, 5)]  # host-5 has no required image
EVERYONE = [*SYNCED, "host-5", "ghost"]  # ghost: an address nobody listens on
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, ca: Path) -> Iterator[FleetUnderTest]:
    """One fleet for the whole module, settled: host-1..4 synced to v1, host-5 with no
    image, ghost unreachable; host-3 carries a hostile tag value."""
    tmp = tmp_path_factory.mktemp("dashboard")
    admin = Security.from_options(str(ca / "admin"), insecure=False)
    started: list[Daemon] = []
    imageserver = imageserver_daemon(tmp / "imageserver", ca, tmp / "imageserver.log")
    started.append(imageserver.start())

    def start_subd(root: Path) -> Daemon:
        daemon = Daemon("subd.main", ["--root", str(root), "--tls-dir", str(ca / "subd"),
                                      "--trigger-command", "true {action} {service}",
                                      "--scan-speed-percent", "0",
                                      "--background-cpu-percent", "50"],
                        "subd", free_port(), admin, tmp / f"subd-{len(started)}.log")
        started.append(daemon)
        return daemon.start()

    fleet = FleetUnderTest(tmp, ca, imageserver, start_subd)
    try:
        fleet.run("image", "add", "v1", str(make_tree(tmp / "v1")))
        for index, sub in enumerate(fleet.subs, 1):
            tags = ["--tag", f"rack=r{index}"] if index != 3 else ["--tag", f"note={HOSTILE}"]
            image = ["--required-image", "v1"] if index != 5 else []
            fleet.run("mdb", "set", f"host-{index}", "--address", sub.address, *image, *tags)
        fleet.run("mdb", "set", "ghost", "--address", f"127.0.0.1:{free_port()}",
                  "--required-image", "v1")
        fleet.wait_status(SYNCED, "synced", "v1")
        fleet.wait_status(["host-5"], "no image")
        fleet.wait_status(["ghost"], "unreachable")
        yield fleet
    finally:
        fleet.dominator.stop()
        for daemon in reversed(started):
            daemon.stop()


def get(fleet: FleetUnderTest, path: str, **params: object) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{fleet.http_port}{path}", params=params, timeout=30)


def test_json_twins_show_every_host(dash: FleetUnderTest) -> None:
    listed = {h["hostname"]: h["status"] for h in get(dash, "/hosts.json").json()["hosts"]}
    assert listed == {**dict.fromkeys(SYNCED, "synced"), "host-5": "no image",
                      "ghost": "unreachable"}
    assert listed == {name: h["status"] for name, h in dash.hosts().items()}  # the CLI agrees

    overview = get(dash, "/index.json").json()
    assert overview["hosts"] == 6
    assert overview["by_status"] == {"unreachable": 1, "synced": 4, "no image": 1}
    assert (overview["compliant"], overview["deviant"]) == (4, 2)
    assert overview["unreachable"] == {"now": 1, "minute": 1, "hour": 1, "day": 1}
    assert overview["intrusions"] == []
    v1 = next(row for row in overview["by_image"] if row["image"] == "v1")
    assert (v1["required"], v1["compliant"], v1["current"]) == (5, 4, 4)

    host = get(dash, "/hosts/host-1.json").json()
    assert host["status"] == "synced" and host["current_image"] == "v1"
    assert host["tags"] == {"rack": "r1"} and host["compliant"]
    assert [e["status"] for e in host["events"]][-1] == "synced"
    update = host["live"]["last_update"]
    assert update["success"] and update["image_name"] == "v1" and update["paths_changed"] > 0
    assert update["change_window_ms"] > 0 and host["change_window_ms"] > 0
    assert host["live"]["generation"] > 0

    images = {row["image"]: row for row in get(dash, "/images.json").json()["images"]}
    assert images["v1"]["stored"] and images["v1"]["required"] == 5
    image = get(dash, "/images/v1.json").json()
    assert image["details"]["inodes"] > 10 and image["details"]["filter"] == []
    assert {h["hostname"] for h in image["hosts"]} == set(SYNCED) | {"ghost"}

    assert get(dash, "/deploys.json").json()["deploy_engine"]


def test_pages_render(dash: FleetUnderTest) -> None:
    pages = ["/", "/hosts", "/hosts/host-1", "/hosts/ghost", "/images", "/images/v1",
             "/deploys"]
    for path in pages:
        reply = get(dash, path)
        assert reply.status_code == 200, (path, reply.text)
        assert reply.headers["content-type"].startswith("text/html")
        assert "need no token" in reply.text and "<script src" not in reply.text
        assert "http://" not in reply.text and "https://" not in reply.text  # nothing external
    hosts_page = get(dash, "/hosts").text
    for name in EVERYONE:
        assert f'data-host="{name}"' in hosts_page
    assert 'href="/hosts.json"' in hosts_page
    host_page = get(dash, "/hosts/host-1").text
    assert "Status history" in host_page and "Change window" in host_page
    ghost_page = get(dash, "/hosts/ghost").text
    assert "unreachable" in ghost_page
    assert "host-2" in get(dash, "/images/v1").text
    assert "v1" in get(dash, "/").text

    missing = get(dash, "/hosts/nobody")
    assert missing.status_code == 404 and "unknown host nobody" in missing.text
    assert get(dash, "/hosts/nobody.json").json() == {"error": "unknown host nobody"}
    assert get(dash, "/images/no-such-image.json").status_code == 404


def test_filters_and_sorting(dash: FleetUnderTest) -> None:
    def names(**params: object) -> list[str]:
        reply = get(dash, "/hosts.json", **params)
        assert reply.status_code == 200, reply.text
        return [h["hostname"] for h in reply.json()["hosts"]]

    assert names() == sorted(EVERYONE)
    assert names(status="synced") == SYNCED
    assert names(status="synced,no image") == [*SYNCED, "host-5"]
    assert names(q="HOST-2") == ["host-2"]
    assert names(q="rack=r4") == ["host-4"]
    assert names(image="v1", compliant="no") == ["ghost"]
    assert names(compliant="yes", sort="-hostname") == SYNCED[::-1]
    assert names(unreachable="minute") == ["ghost"]
    assert names(sort="status")[0] == "host-5"  # "no image" < "synced" < "unreachable"
    assert names(sort="-status")[0] == "ghost"

    page = get(dash, "/hosts", status="synced", sort="-hostname").text
    rows = [line for line in page.splitlines() if "data-host=" in line]
    assert [r.split('data-host="')[1].split('"')[0] for r in rows] == SYNCED[::-1]
    assert "sort=hostname" in page  # the sorted column's link reverses the order

    for bad in ({"status": "bogus"}, {"sort": "nonsense"}, {"compliant": "maybe"}):
        reply = get(dash, "/hosts.json", **bad)
        assert reply.status_code == 400 and "error" in reply.json()


def test_host_table_pages(dash: FleetUnderTest) -> None:
    def listed(path: str = "/hosts.json", **params: object) -> dict:
        reply = get(dash, path, **params)
        assert reply.status_code == 200, reply.text
        return reply.json()

    everyone = sorted(EVERYONE)
    second = listed(per_page=2, page=2)
    assert [h["hostname"] for h in second["hosts"]] == everyone[2:4]
    assert second["paging"] == {"page": 2, "per_page": 2, "pages": 3, "first": 3, "last": 4}
    assert (second["total"], second["shown"]) == (6, 6)
    # Filter and sort before paging: the synced hosts, newest name first, page 2 of 2.
    synced = listed(status="synced", sort="hostname", desc="yes", per_page=3, page=2)
    assert [h["hostname"] for h in synced["hosts"]] == SYNCED[::-1][3:]
    assert synced["shown"] == 4 and synced["paging"]["pages"] == 2
    by_poll = listed(sort="last_poll", desc="yes")["hosts"]
    polls = [h["last_poll_unix"] for h in by_poll]
    assert polls == sorted(polls, reverse=True) and len(by_poll) == 6
    assert [h["hostname"] for h in listed(image="v1", q="host-")["hosts"]] == SYNCED

    page = get(dash, "/hosts", per_page=2, page=2).text
    rows = [line.split('data-host="')[1].split('"')[0] for line in page.splitlines()
            if "<tr data-host=" in line]
    assert rows == everyone[2:4]
    assert "hosts 3-4 of 6, page 2 of 3" in page
    assert 'href="/hosts?sort=hostname&amp;per_page=2&amp;page=3"' in page  # next, kept size
    assert 'href="/hosts?sort=hostname&amp;per_page=2"' in page  # previous: page 1


def test_bad_table_parameters(dash: FleetUnderTest) -> None:
    for params, message in (({"page": "0"}, "page must be a whole number from 1"),
                            ({"per_page": "100000"}, "per_page must be a whole number from 1 "
                                                     "to 1000"),
                            ({"sort": "colour"}, "unknown sort key 'colour'"),
                            ({"desc": "sometimes"}, "desc must be yes or no"),
                            ({"limit": "5"}, "unknown parameter 'limit'")):
        reply = get(dash, "/hosts.json", **params)
        assert reply.status_code == 400, (params, reply.text)
        assert reply.json()["error"].startswith(message), reply.json()
        page = get(dash, "/hosts", **params)
        assert page.status_code == 400 and "Bad request" in page.text, page.text[:300]
        assert "Traceback" not in page.text
    twice = httpx.get(f"http://127.0.0.1:{dash.http_port}/hosts.json?page=1&page=2", timeout=30)
    assert twice.status_code == 400 and twice.json() == {"error": "page given more than once"}
    assert get(dash, "/healthz").status_code == 200  # the dominator is still fine


def test_html_escapes_hostile_values(dash: FleetUnderTest) -> None:
    assert get(dash, "/hosts/host-3.json").json()["tags"] == {"note": HOSTILE}
    for path, params in (("/hosts/host-3", {}), ("/hosts", {"q": HOSTILE})):
        page = get(dash, path, **params).text
        assert HOSTILE not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in get(dash, "/hosts/host-3").text


def test_deploy_pages_show_wave_progress(dash: FleetUnderTest) -> None:
    started = httpx.post(f"http://127.0.0.1:{dash.http_port}/v1/deploys", timeout=30,
                         headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"image": "v1", "select": {"hosts": ["host-1", "host-2"]},
                               "waves": ["1", "100%"]})
    assert started.status_code == 202, started.text
    deploy_id = started.json()["id"]

    def finished() -> dict | None:
        deploy = get(dash, f"/deploys/{deploy_id}.json").json()
        return deploy if deploy["status"] != "RUNNING" else None
    deploy = wait_for(finished, "the deploy finishes")
    assert deploy["status"] == "SUCCEEDED", deploy
    assert [(w["spec"], w["status"], w["percent"]) for w in deploy["waves"]] == [
        ("1", "SUCCEEDED", 100), ("100%", "SUCCEEDED", 100)]
    assert set(deploy["hosts"]) == {"host-1", "host-2"}

    listed = get(dash, "/deploys.json").json()
    assert listed["deploy_engine"] and deploy_id in [d["id"] for d in listed["deploys"]]
    page = get(dash, f"/deploys/{deploy_id}").text
    assert 'data-wave="2"' in page and 'data-host="host-2"' in page and "SUCCEEDED" in page
    assert deploy_id in get(dash, "/deploys").text and deploy_id in get(dash, "/").text
    assert get(dash, "/deploys/0123456789abcdef").status_code == 404
    metrics = get(dash, "/metrics").text
    assert 'dominator_deploys{status="SUCCEEDED"} 1.0' in metrics


class Rows(html.parser.HTMLParser):
    """The host table's rows as the browser left them: hostname -> cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self._host: str | None = None
        self._cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr" and dict(attrs).get("data-host"):
            self._host, self._cells = dict(attrs)["data-host"], []
        elif tag == "td" and self._host:
            self._cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._host:
            self.rows[self._host] = [cell.strip() for cell in self._cells]
            self._host = None

    def handle_data(self, data: str) -> None:
        if self._host and self._cells:
            self._cells[-1] += data


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
         *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian package `chromium`) here")
def test_browser_shows_every_host(dash: FleetUnderTest, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{dash.http_port}/hosts"
    # Long enough (in virtual time) for the page to refresh itself from the server.
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url).stdout
    assert re.search(r'id="refresh-note">updated ', dom), "the page never refreshed itself"
    rows = Rows()
    rows.feed(dom)
    assert set(rows.rows) == set(EVERYONE), dom[:2000]
    statuses = {h["hostname"]: h["status"] for h in get(dash, "/hosts.json").json()["hosts"]}
    for name, cells in rows.rows.items():
        assert cells[0] == name and cells[1] == statuses[name], (name, cells)

    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", url)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    results = PROJECT / "bench" / "results"
    if results.is_dir():
        shutil.copy(shot, results / "dashboard.png")


def test_no_page_loads_assets_from_elsewhere(dash: FleetUnderTest) -> None:
    """Defect 9: FastAPI's /docs and /redoc load their scripts from a public CDN: they
    are off; the schema stays at /openapi.json."""
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        reply = get(dash, path)
        assert reply.status_code == 404 or not re.search(r"""(src|href)=["']?https?://""",
                                                         reply.text), (path, reply.text[:300])
    schema = get(dash, "/openapi.json")
    assert schema.status_code == 200 and "/v1/deploys" in schema.json()["paths"]
