"""The deploy stage API (POST/GET /v1/deploys...) end to end, with real daemons on
loopback: an image server, a dominator serving HTTP with a token, real subd on
temporary roots, and a small real HTTP server in the test as the health gate."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.routing import BaseRoute

from dominator.deploy.engine import DeployEngine
from dominator.deploy.health import HealthCheck, NamedChecks
from dominator.deploy.model import Deploy, HostProgress, Wave
from dominator.deploy.store import DeployStore
from dominator.deploy.views import deploy_view
from dominator.deploy.waves import check_waves, wave_targets
from dominator.herd.convergence import PlanSummary
from dominator.herd.herd import Herd, Sub
from dominator.herd.state import DominatorState
from dominator.herd.status import Status
from dominator.server.http.app import make_app
from dominator.server.http.context import HttpContext
from fleetlib.errors import FleetError
from fleetlib.testing.daemons import Daemon
from fleetlib.testing.fleet import TOKEN, FleetUnderTest, wait_for
from fleetlib.testing.trees import make_tree
from mdb.machine import Machine
from mdb.store import Mdb
from subd.changes import UpdatePlan


class HealthServer:
    """The health gate: GET /health/HOST answers 200, or what `status` says for
    that host, after `delay` seconds; every request is remembered in order (and
    what it carried: its path with the query, its Authorization header)."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.hits: list[tuple[float, str]] = []
        self.carried: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host = urlsplit(self.path).path.rsplit("/", 1)[-1]
                outer.hits.append((time.time(), host))
                outer.carried.append((self.path, self.headers.get("Authorization", "")))
                time.sleep(outer.delay.get(host, 0.0))
                code = outer.status.get(host, 200)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok" if code == 200 else b"no")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/health/{{host}}"

    def hosts_hit(self) -> list[str]:
        return [host for _, host in self.hits]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DeployFleet(FleetUnderTest):
    """A fleet of N hosts (fleetlib.testing.fleet's), plus the deploy API's client."""

    def __init__(self, tmp_path: Path, ca: Path, imageserver: Daemon,
                 start_subd: Callable[..., Daemon], hosts: int,
                 serve_args: tuple[str, ...] = ()) -> None:
        super().__init__(tmp_path, ca, imageserver, start_subd, hosts, serve_args)
        self.api = httpx.Client(base_url=self.base, timeout=30,
                                headers={"Authorization": f"Bearer {TOKEN}"})
        self.wait_http()

    def wait_http(self) -> None:
        def up() -> bool:
            try:
                return self.api.get("/openapi.json").status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, "the HTTP API answers", 30)

    def close(self) -> None:
        self.api.close()
        self.stop()

    def add_images(self) -> None:
        """v1 (every inode kind, a computed /etc/hostname, a `certs` trigger), v2
        (one file added, one replaced, one deleted, one chmod-ed, a new folder)
        and `tiny` (which would wipe a host: the safety check stops it)."""
        v1 = make_tree(self.tmp / "v1")
        (self.tmp / "computed.json").write_text(
            '[{"Filename": "/etc/hostname", "Source": "hostname.j2"}]')
        (self.tmp / "triggers.json").write_text(
            '[{"MatchLines": ["/etc/ssl/.*"], "Service": "certs"}]')
        extra = ["--computed-files", str(self.tmp / "computed.json"),
                 "--triggers", str(self.tmp / "triggers.json")]
        self.run("image", "add", "v1", str(v1), *extra)
        (v1 / "etc/ssl/cert.pem").write_bytes(os.urandom(4000))
        (v1 / "usr/bin/new-in-v2").write_text("v2\n")
        (v1 / "etc/empty").unlink()
        (v1 / "etc/with space.conf").chmod(0o600)
        (v1 / "opt/app").mkdir(parents=True)
        (v1 / "opt/app/config").write_text("answer = 42\n")
        self.run("image", "add", "v2", str(v1), *extra)
        tiny = self.tmp / "tiny"
        (tiny / "etc").mkdir(parents=True)
        (tiny / "etc/issue").write_text("tiny\n")
        self.run("image", "add", "tiny", str(tiny))

    def put_on_v1(self) -> None:
        """Every host in the MDB on v1, and synced on it."""
        machines = [{"Hostname": name, "IpAddress": self.sub(name).address,
                     "RequiredImage": "v1", "PlannedImage": "", "DisableUpdates": False,
                     "OwnerGroup": "", "Tags": {"rack": f"r{i}", "role": "web"}}
                    for i, name in enumerate(self.names, 1)]
        (self.tmp / "mdb.json").write_text(json.dumps(machines))
        self.run("mdb", "import", str(self.tmp / "mdb.json"))
        self.wait_hosts(self.names, "v1")

    def wait_hosts(self, names: list[str], image: str, timeout: float = 90) -> None:
        def synced() -> bool:
            hosts = self.hosts()
            return all(hosts.get(n, {}).get("status") in ("synced", "intrusion")
                       and hosts[n]["current_image"] == image for n in names)
        wait_for(synced, f"{names} are synced on {image}", timeout)

    def required(self) -> dict[str, str]:
        return {name: host["required_image"] for name, host in self.hosts().items()}

    def start(self, body: dict, key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.api.post("/v1/deploys", json=body, headers=headers)

    def deploy(self, body: dict, key: str | None = None) -> str:
        reply = self.start(body, key)
        assert reply.status_code == 202, reply.text
        return reply.json()["id"]

    def status(self, deploy_id: str) -> dict:
        reply = self.api.get(f"/v1/deploys/{deploy_id}")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def wait_until(self, deploy_id: str, test: Callable[[dict], bool], what: str,
                   timeout: float = 90) -> dict:
        def check() -> dict | None:
            state = self.status(deploy_id)
            return state if test(state) else None
        return wait_for(check, f"deploy {deploy_id}: {what}", timeout)

    def wait_end(self, deploy_id: str, timeout: float = 90) -> dict:
        return self.wait_until(deploy_id, lambda s: s["status"] != "RUNNING", "ended", timeout)


@pytest.fixture
def health() -> Iterator[HealthServer]:
    server = HealthServer()
    yield server
    server.close()


@pytest.fixture
def make_fleet(tmp_path: Path, ca: Path, imageserver: Daemon,
               start_subd: Callable[..., Daemon]) -> Iterator[Callable[..., DeployFleet]]:
    fleets: list[DeployFleet] = []

    def make(hosts: int = 5, serve_args: tuple[str, ...] = ()) -> DeployFleet:
        fleet = DeployFleet(tmp_path, ca, imageserver, start_subd, hosts, serve_args)
        fleets.append(fleet)
        fleet.add_images()
        fleet.put_on_v1()
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


def has_v2(root: Path) -> bool:
    return (root / "usr/bin/new-in-v2").exists()


def test_three_waves_to_ten_hosts(make_fleet: Callable[[int], DeployFleet],
                                  health: HealthServer) -> None:
    fleet = make_fleet(10)
    reply = fleet.start({"image": "v2", "select": {"tags": {"role": "web"}},
                         "waves": ["1", "30%", "100%"], "maxFailures": 0,
                         "healthCheck": {"url": health.url, "timeoutSeconds": 5}},
                        key="pipeline-1-stage-3")
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["status"] == "RUNNING"
    assert reply.headers["location"] == body["statusUrl"]
    assert body["statusUrl"] == f"{fleet.base}/v1/deploys/{body['id']}"

    seen: list[str] = []

    def ended() -> dict | None:
        state = httpx.get(reply.headers["location"],  # as a Spinnaker webhook stage does
                          headers={"Authorization": f"Bearer {TOKEN}"}).json()
        seen.append(state["progress"])
        return state if state["status"] != "RUNNING" else None
    state = wait_for(ended, "the deploy ends", 120)
    assert state["status"] == "SUCCEEDED", state
    assert state["progress"] == "10/10 hosts converged, 0 failed"
    assert state["percent"] == 100 and state["reason"] == ""
    assert any("wave 2/3" in line for line in seen), seen

    waves = state["waves"]
    assert [len(w["hosts"]) for w in waves] == [1, 2, 7]
    assert [w["target"] for w in waves] == [1, 3, 10]
    assert [w["status"] for w in waves] == ["SUCCEEDED"] * 3
    assert sorted(sum((w["hosts"] for w in waves), [])) == sorted(fleet.names)
    for earlier, later in zip(waves, waves[1:], strict=False):
        assert later["startedUnix"] >= earlier["finishedUnix"]
    # Each wave's health checks came after every check of the wave before.
    order = health.hosts_hit()
    assert sorted(order) == sorted(fleet.names)
    wave_of = {host: index for index, w in enumerate(waves) for host in w["hosts"]}
    assert [wave_of[host] for host in order] == sorted(wave_of[host] for host in order)
    for name, host in state["hosts"].items():
        assert host["status"] == "succeeded" and host["previousImage"] == "v1", (name, host)
        assert host["health"].endswith(f"/health/{name}: HTTP 200")

    assert all(has_v2(root) for root in fleet.roots)
    assert set(fleet.required().values()) == {"v2"}
    listed = fleet.api.get("/v1/deploys").json()["deploys"]
    assert [d["id"] for d in listed] == [body["id"]]
    assert listed[0]["status"] == "SUCCEEDED"


def test_failed_health_gate_rolls_the_canary_back(make_fleet: Callable[[int], DeployFleet],
                                                  health: HealthServer) -> None:
    fleet = make_fleet(5)
    health.status["host-1"] = 500
    deploy_id = fleet.deploy({"image": "v2", "select": {"all": True}, "waves": ["1", "100%"],
                              "healthCheck": {"url": health.url, "timeoutSeconds": 2,
                                              "retries": 1}})
    state = fleet.wait_end(deploy_id)
    assert state["status"] == "TERMINAL", state
    assert "host-1" in state["reason"] and "HTTP 500" in state["reason"], state["reason"]
    assert "rolled back 1 host" in state["reason"]
    canary = state["hosts"]["host-1"]
    assert canary["status"] == "rolledBack" and canary["previousImage"] == "v1"
    assert canary["error"].startswith("health check failed")
    assert [state["hosts"][n]["status"] for n in fleet.names[1:]] == ["skipped"] * 4
    assert [w["status"] for w in state["waves"]] == ["FAILED", "SKIPPED"]
    assert health.hosts_hit() == ["host-1", "host-1"]  # one retry, nobody else checked
    # The deploy ends once the rollback converged: the canary holds v1 again.
    hosts = fleet.hosts()
    assert hosts["host-1"]["current_image"] == "v1"
    assert set(fleet.required().values()) == {"v1"}
    assert not any(has_v2(root) for root in fleet.roots)


def test_cancel_stops_after_the_hosts_in_flight(make_fleet: Callable[[int], DeployFleet],
                                                health: HealthServer) -> None:
    fleet = make_fleet(5)
    health.delay.update({"host-1": 3.0, "host-2": 3.0})
    deploy_id = fleet.deploy({"image": "v2", "select": {"all": True}, "waves": ["1", "100%"],
                              "healthCheck": {"url": health.url}})
    fleet.wait_until(deploy_id, lambda s: s["hosts"]["host-1"]["status"] == "checking",
                     "the canary is being checked")
    reply = fleet.api.post(f"/v1/deploys/{deploy_id}/cancel")
    assert reply.status_code == 202, reply.text
    assert reply.headers["location"].endswith(f"/v1/deploys/{deploy_id}")
    assert "canceling" in fleet.status(deploy_id)["progress"]
    state = fleet.wait_end(deploy_id)
    assert state["status"] == "CANCELED", state
    assert "4 host(s) left untouched" in state["reason"]
    assert state["hosts"]["host-1"]["status"] == "succeeded"  # it was in flight
    assert [state["hosts"][n]["status"] for n in fleet.names[1:]] == ["skipped"] * 4
    assert [w["status"] for w in state["waves"]] == ["SUCCEEDED", "SKIPPED"]
    required = fleet.required()
    assert required["host-1"] == "v2" and {required[n] for n in fleet.names[1:]} == {"v1"}
    assert has_v2(fleet.root("host-1"))
    assert not any(has_v2(fleet.root(n)) for n in fleet.names[1:])
    again = fleet.api.post(f"/v1/deploys/{deploy_id}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "CANCELED"

    # Cancel with rollback: the host in flight goes back too; the rest stay untouched.
    deploy_id = fleet.deploy({"image": "v2", "select": {"hosts": ["host-3", "host-2"]},
                              "waves": ["1", "100%"], "healthCheck": {"url": health.url}})
    fleet.wait_until(deploy_id, lambda s: s["hosts"]["host-2"]["status"] == "checking",
                     "host-2 is being checked")
    reply = fleet.api.post(f"/v1/deploys/{deploy_id}/cancel", json={"rollback": True})
    assert reply.status_code == 202, reply.text
    state = fleet.wait_end(deploy_id)
    assert state["status"] == "CANCELED", state
    assert state["hosts"]["host-2"]["status"] == "rolledBack"
    assert state["hosts"]["host-3"]["status"] == "skipped"
    assert fleet.required()["host-2"] == "v1" and fleet.required()["host-3"] == "v1"
    assert fleet.hosts()["host-2"]["current_image"] == "v1"
    assert not has_v2(fleet.root("host-2")) and not has_v2(fleet.root("host-3"))

    ended = fleet.api.post("/v1/deploys/nope/cancel")
    assert ended.status_code == 404 and "nope" in ended.json()["error"]


def test_restart_resumes_a_deploy(make_fleet: Callable[[int], DeployFleet],
                                  health: HealthServer) -> None:
    fleet = make_fleet(5)
    for name in fleet.names:
        health.delay[name] = 1.0
    body = {"image": "v2", "select": {"all": True}, "waves": ["1", "2", "100%"],
            "healthCheck": {"url": health.url}}
    deploy_id = fleet.deploy(body, key="resume-me")
    fleet.wait_until(deploy_id, lambda s: s["waves"][1]["status"] == "RUNNING",
                     "the second wave runs")
    fleet.dominator.kill()  # SIGKILL mid-wave
    fleet.dominator.start()
    fleet.wait_http()
    again = fleet.start(body, key="resume-me")  # the key survives the restart too
    assert again.status_code == 202 and again.json()["id"] == deploy_id
    state = fleet.wait_end(deploy_id, timeout=120)
    assert state["status"] == "SUCCEEDED", state
    assert [w["status"] for w in state["waves"]] == ["SUCCEEDED"] * 3
    assert {h["previousImage"] for h in state["hosts"].values()} == {"v1"}
    assert all(has_v2(root) for root in fleet.roots)
    assert [d["id"] for d in fleet.api.get("/v1/deploys").json()["deploys"]] == [deploy_id]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under a root (but subd's own state) with what a host holds there."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (folder == str(root) and d == ".subd")]
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            xattrs = () if stat.S_ISLNK(info.st_mode) else tuple(sorted(
                (key, os.getxattr(path, key, follow_symlinks=False))
                for key in os.listxattr(path, follow_symlinks=False)))
            if stat.S_ISREG(info.st_mode):
                detail = (hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                          info.st_mtime_ns)
            elif stat.S_ISLNK(info.st_mode):
                detail = (os.readlink(path),)
            else:
                detail = (info.st_rdev,)
            rel = "/" + os.path.relpath(path, root)
            found[os.fsencode(rel).decode("utf-8", "backslashreplace")] = (
                info.st_mode, info.st_uid, info.st_gid, xattrs, *detail)
    return found


def test_dry_run_plan_matches_the_real_deploy(make_fleet: Callable[[int], DeployFleet],
                                              trigger_log: Path) -> None:
    fleet = make_fleet(5)
    before = {name: snapshot(root) for name, root in zip(fleet.names, fleet.roots, strict=True)}
    reply = fleet.start({"image": "v2", "select": {"all": True}, "dryRun": True})
    assert reply.status_code == 202, reply.text
    assert reply.json()["status"] == "SUCCEEDED"  # a small dry run answers at once
    plan = fleet.status(reply.json()["id"])
    assert plan["dryRun"] and plan["wouldStop"] == {}
    assert plan["progress"] == "dry run: 5/5 hosts planned, 5 would change, 0 would be stopped"
    # Nothing changed: not the MDB, not a host.
    assert set(fleet.required().values()) == {"v1"}
    after = {name: snapshot(root) for name, root in zip(fleet.names, fleet.roots, strict=True)}
    assert after == before

    triggered = len(trigger_log.read_text().splitlines())
    real = fleet.deploy({"image": "v2", "select": {"all": True}, "waves": ["100%"]})
    state = fleet.wait_end(real)
    assert state["status"] == "SUCCEEDED", state
    for name, root in zip(fleet.names, fleet.roots, strict=True):
        after = snapshot(root)
        old = before[name]
        added = sorted(set(after) - set(old))
        deleted = sorted(set(old) - set(after))
        changed = sorted(p for p in set(old) & set(after) if old[p] != after[p])
        host_plan = plan["hosts"][name]["plan"]
        changes = host_plan["changes"]
        assert sorted(changes["added"]) == added, name
        assert sorted(changes["deleted"]) == deleted, name
        assert sorted(changes["replaced"] + changes["metadata"]) == changed, name
        assert (host_plan["added"], host_plan["deleted"]) == (len(added), len(deleted))
        assert host_plan["triggers"] == ["certs"] and not host_plan["unsafe"]
        assert host_plan["bytesToFetch"] > 4000 and host_plan["objectsToFetch"] >= 3
        assert added and deleted and changes["replaced"] and changes["metadata"]
    ran = trigger_log.read_text().splitlines()[triggered:]
    assert ran and all(line.endswith(" certs") for line in ran), ran

    # The safety check would stop an image that wipes the hosts: the plan says so.
    reply = fleet.start({"image": "tiny", "select": {"hosts": ["host-1", "host-2"]},
                         "dryRun": True})
    stopped = fleet.wait_end(reply.json()["id"])
    assert stopped["status"] == "SUCCEEDED"
    assert sorted(stopped["wouldStop"]) == ["host-1", "host-2"]
    assert all("unsafe update" in why for why in stopped["wouldStop"].values())
    assert stopped["hosts"]["host-1"]["plan"]["unsafe"]
    assert set(fleet.required().values()) == {"v2"}


def test_requests_idempotency_and_openapi(make_fleet: Callable[[int], DeployFleet],
                                          health: HealthServer) -> None:
    fleet = make_fleet(5)
    schema = httpx.get(f"{fleet.base}/openapi.json")
    assert schema.status_code == 200
    assert {"/v1/deploys", "/v1/deploys/{deploy_id}",
            "/v1/deploys/{deploy_id}/cancel"} <= set(schema.json()["paths"])

    good = {"image": "v2", "select": {"hosts": ["host-1"]}, "waves": ["100%"]}

    def refused(reply: httpx.Response, status: int, *fragments: str) -> None:
        assert reply.status_code == status, (reply.status_code, reply.text)
        error = reply.json()["error"]
        for fragment in fragments:
            assert fragment in error, (fragment, error)

    anonymous = httpx.Client(base_url=fleet.base)
    refused(anonymous.post("/v1/deploys", json=good), 401, "missing bearer token")
    refused(anonymous.post("/v1/deploys", content=b"{not json"), 401, "missing bearer token")
    refused(anonymous.get("/v1/deploys"), 401)
    refused(anonymous.post("/v1/deploys", json=good, headers={"Authorization": "Bearer nope"}),
            401, "bearer token")
    refused(fleet.api.post("/v1/deploys", content=b"{not json",
                           headers={"Content-Type": "application/json"}), 400, "JSON")
    refused(fleet.start({"select": {"all": True}}), 400, "image", "required")
    refused(fleet.start({**good, "colour": "blue"}), 400, "colour")
    refused(fleet.start({**good, "healthCheck": {"url": health.url, "tries": 3}}), 400, "tries")
    refused(fleet.start({**good, "waves": ["1", "150%"]}), 400, "150%")
    refused(fleet.start({**good, "waves": ["50%", "10%"]}), 400, "cumulative")
    refused(fleet.start({**good, "waves": []}), 400, "at least one wave")
    refused(fleet.start({**good, "waves": ["0"]}), 400, "at least 1 host")
    refused(fleet.start({**good, "image": "no-such-image"}), 400, "unknown image")
    refused(fleet.start({**good, "image": "../etc"}), 400, "image")
    refused(fleet.start({**good, "select": {"tags": {"rack": "nowhere"}}}), 400,
            "empty selection")
    refused(fleet.start({**good, "select": {"hosts": []}}), 400, "empty selection")
    refused(fleet.start({**good, "select": {"hosts": ["host-9"]}}), 400, "unknown host host-9")
    refused(fleet.start({**good, "select": {"all": True, "hosts": ["host-1"]}}), 400,
            "exactly one")
    refused(fleet.start({**good, "healthCheck": {"url": "http://{hots}/"}}), 400, "{hots}")
    refused(fleet.start({**good, "healthCheck": {"url": "x", "check": "up"}}), 400,
            "exactly one of url or check")
    refused(fleet.start({**good, "maxFailures": -1}), 400, "maxFailures")
    refused(fleet.api.get("/v1/deploys/no-such-deploy"), 404, "no-such-deploy")
    assert fleet.api.get("/v1/deploys").json() == {"deploys": []}  # nothing was started

    # One key, one deploy: repeated (even at once) it returns the same deploy.
    health.delay["host-1"] = 3.0
    slow = {**good, "healthCheck": {"url": health.url}}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: fleet.start(slow, key="key-1"), range(4)))
    assert {r.status_code for r in replies} == {202}
    ids = {r.json()["id"] for r in replies}
    assert len(ids) == 1
    deploy_id = ids.pop()
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in replies) == 3
    refused(fleet.start({**slow, "maxFailures": 1}, key="key-1"), 409, "different request")
    refused(fleet.start({**good, "select": {"all": True}}), 409, "host-1", deploy_id)
    state = fleet.wait_end(deploy_id)
    assert state["status"] == "SUCCEEDED" and state["idempotencyKey"] == "key-1"
    assert fleet.start(slow, key="key-1").json()["id"] == deploy_id
    refused(fleet.api.post(f"/v1/deploys/{deploy_id}/cancel"), 409, "SUCCEEDED")
    assert [d["id"] for d in fleet.api.get("/v1/deploys").json()["deploys"]] == [deploy_id]


def test_wave_arithmetic() -> None:
    assert [t for _, t, _ in wave_targets(["1", "10%", "100%"], 1000)] == [1, 100, 1000]
    assert [t for _, t, _ in wave_targets(["1", "30%", "100%"], 10)] == [1, 3, 10]
    # Rounding up: a share of a small fleet is never zero hosts.
    assert [t for _, t, _ in wave_targets(["10%", "100%"], 5)] == [1, 5]
    # Counts are capped; a wave never shrinks; short of 100% an implied wave follows.
    assert wave_targets(["50", "20%"], 10) == [("50", 10, False), ("20%", 10, False)]
    assert wave_targets(["1", "10%"], 50) == [("1", 1, False), ("10%", 5, False),
                                              ("100%", 50, True)]
    for bad in (["150%"], ["0%"], ["0"], ["-1"], ["ten"], ["3", "2"], []):
        with pytest.raises(FleetError):
            check_waves(bad)
    assert check_waves([" 1", "12.5%"]) == ["1", "12.5%"]


class FakeImages:
    """Just which images exist."""

    async def get(self, name: str) -> object | None:
        return object() if name in ("v1", "v2", "v3") else None

    def close(self) -> None:
        pass


class FakeHerd:
    """The herd as the engine sees it: subs whose status the test sets; whether a
    host's updates are held is the real herd's answer over the real state."""

    host_held = Herd.host_held

    def __init__(self, state: DominatorState) -> None:
        self.subs: dict[str, Sub] = {}
        self.state = state

    async def plan_for(self, hostname: str, image_name: str
                       ) -> tuple[UpdatePlan, PlanSummary, str]:
        raise FleetError("this herd plans no dry run")


async def until(condition: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


async def test_engine_refusals_and_outcomes_in_process(tmp_path: Path) -> None:
    """429, 503 and 409, success, cancel with rollback, and a host the herd fails,
    against a herd whose verdicts the test decides."""
    state = DominatorState(tmp_path / "state.sqlite")
    mdb = Mdb(str(tmp_path / "mdb.sqlite"))
    for name in ("h1", "h2", "h3"):
        mdb.set(Machine(name, required_image="v1"))
        state.record_sync(name, "v1", {})
    herd = FakeHerd(state)
    images = FakeImages()
    engine = DeployEngine(herd, state, mdb, images, max_running=2, tick=0.02)
    # FakeHerd and FakeImages stand in for Herd and ImageCache (duck-typed).
    app = make_app(HttpContext(herd, state, mdb, images, TOKEN,  # type: ignore[arg-type]
                               deploys=engine))

    def converge(name: str, image: str) -> None:
        """What the herd does once a host holds its required image."""
        sub = herd.subs[name]
        sub.machine = mdb.get(name)
        assert sub.machine.required_image == image
        state.record_sync(name, image, {})
        sub.set_status(Status.SYNCED)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dominator",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        async def start(body: dict) -> httpx.Response:
            return await client.post("/v1/deploys", json=body)

        async def status(deploy_id: str) -> dict:
            return (await client.get(f"/v1/deploys/{deploy_id}")).json()

        reply = await start({"image": "v2", "select": {"all": True}})
        assert reply.status_code == 503 and "not loaded h1" in reply.json()["error"]
        assert reply.headers["retry-after"]
        herd.subs = {m.hostname: Sub(m) for m in mdb.list()}
        state.disable_updates("admin", "change freeze")
        reply = await start({"image": "v2", "select": {"all": True}})
        assert reply.status_code == 503 and "change freeze" in reply.json()["error"]
        state.enable_updates()

        reply = await start({"image": "v2", "select": {"hosts": ["h1", "h2"]},
                             "waves": ["1", "100%"]})
        assert reply.status_code == 202, reply.text
        first = reply.json()["id"]
        await until(lambda: mdb.get("h1").required_image == "v2", "h1 is told v2")
        assert mdb.get("h2").required_image == "v1"  # the next wave waits
        reply = await start({"image": "v3", "select": {"hosts": ["h2"]}})
        assert reply.status_code == 409 and first in reply.json()["error"]
        reply = await start({"image": "v2", "select": {"hosts": ["h3"]}})
        assert reply.status_code == 202
        third = reply.json()["id"]
        reply = await start({"image": "v3", "select": {"hosts": ["h3"]}})
        assert reply.status_code == 429 and "at most 2" in reply.json()["error"]
        assert reply.headers["retry-after"]

        converge("h1", "v2")
        await until(lambda: mdb.get("h2").required_image == "v2", "the second wave starts")
        assert (await status(first))["progress"] == "1/2 hosts converged, 0 failed, wave 2/2"
        converge("h2", "v2")
        await until(lambda: engine.get(first).status != "RUNNING", "the first deploy ends")
        assert (await status(first))["status"] == "SUCCEEDED"

        reply = await client.post(f"/v1/deploys/{third}/cancel", json={"rollback": True})
        assert reply.status_code == 202
        await until(lambda: mdb.get("h3").required_image == "v1", "h3 is told v1 again")
        converge("h3", "v1")
        await until(lambda: engine.get(third).status != "RUNNING", "the third deploy ends")
        third_state = await status(third)
        assert third_state["status"] == "CANCELED", third_state
        assert third_state["hosts"]["h3"]["status"] == "rolledBack"

        # Two failure verdicts of the herd fail a host: TERMINAL, and back to v2.
        reply = await start({"image": "v3", "select": {"hosts": ["h2"]}})
        fourth = reply.json()["id"]
        await until(lambda: mdb.get("h2").required_image == "v3", "h2 is told v3")
        # The herd gives a verdict every cycle; these two must come once the engine listens.
        await until(lambda: herd.subs["h2"].listeners, "the engine watches h2")
        herd.subs["h2"].machine = mdb.get("h2")
        herd.subs["h2"].set_status(Status.UNSAFE, "would delete too much")
        herd.subs["h2"].set_status(Status.UNSAFE, "would delete too much")
        await until(lambda: mdb.get("h2").required_image == "v2", "h2 is told v2 again")
        converge("h2", "v2")
        await until(lambda: engine.get(fourth).status != "RUNNING", "the fourth deploy ends")
        fourth_state = await status(fourth)
        assert fourth_state["status"] == "TERMINAL"
        assert "unsafe update: would delete too much" in fourth_state["reason"]
        assert fourth_state["hosts"]["h2"]["status"] == "rolledBack"

        # A host paused in the dominator's state fails at once, saying who paused it,
        # and is never told the new image.
        state.pause_host("h3", "alice", "disk swap")
        fifth = (await start({"image": "v3", "select": {"hosts": ["h3"]}})).json()["id"]
        await until(lambda: engine.get(fifth).status != "RUNNING", "the fifth deploy ends")
        fifth_state = await status(fifth)
        assert fifth_state["status"] == "TERMINAL", fifth_state
        assert "paused for this host by alice: disk swap" in fifth_state["hosts"]["h3"]["error"]
        assert mdb.get("h3").required_image == "v1"

        listed = (await client.get("/v1/deploys")).json()["deploys"]
        assert [d["id"] for d in listed] == [fifth, fourth, third, first]
        assert [d["id"] for d in (await client.get(
            "/v1/deploys", params={"status": "CANCELED"})).json()["deploys"]] == [third]
    await engine.stop()
    mdb.close()


ARGV_SCRIPT = """import json, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(sys.argv[2:]) + "\\n")
"""


async def test_named_check_fills_host_as_one_argument_without_a_shell(tmp_path: Path) -> None:
    """Defect 8: a named check's {host} and {address} are one argument each, never
    read by a shell, however hostile the hostname."""
    script, seen = tmp_path / "argv.py", tmp_path / "argv.log"
    script.write_text(ARGV_SCRIPT)
    checks = NamedChecks.parse([
        f"argv={sys.executable} {script} {seen} --host={{host}} {{address}}",
        "same=test {host} = h1", "slow=sleep 5", "missing=/no/such/check {address}"])
    assert checks.names == ["argv", "missing", "same", "slow"]
    hostile = f"h1; touch {tmp_path}/pwned $(touch {tmp_path}/pwned2) `id` | cat &"
    async with httpx.AsyncClient() as client:
        # The MDB refuses such a hostname; the check must not depend on it.
        machine = Machine("h1", address="10.0.0.1:6969")
        object.__setattr__(machine, "hostname", hostile)
        argv = HealthCheck(check="argv", retries=0)
        assert await argv.run(machine, client, checks) == (True, "check argv: exit 0")
        assert json.loads(seen.read_text()) == [f"--host={hostile}", "10.0.0.1"]
        assert not list(tmp_path.glob("pwned*"))

        same = HealthCheck(check="same", retries=1)
        assert await same.run(Machine("h1"), client, checks) == (True, "check same: exit 0")
        assert await same.run(Machine("h2"), client, checks) == (
            False, "check same: exit 1 (2 attempts)")
        healthy, text = await HealthCheck(check="slow", timeout=0.2, retries=0).run(
            Machine("h1"), client, checks)
        assert not healthy and "still running after 0.2 s" in text
        healthy, text = await HealthCheck(check="missing", retries=0).run(
            Machine("h1"), client, checks)
        assert not healthy and text.startswith("check missing: /no/such/check: No such file")
        # A name the operator no longer allow-lists (a resumed deploy) fails, saying so.
        healthy, text = await HealthCheck(check="gone", retries=0).run(
            Machine("h1"), client, checks)
        assert not healthy and "unknown health check 'gone'" in text and "argv, missing" in text

    for bad, why in (("noequals", "NAME=COMMAND"), ("x y=true", "NAME=COMMAND"),
                     ("a=", "empty"), ("a=echo 'open", "No closing quotation"),
                     ("a={hots}", "{hots}")):
        with pytest.raises(FleetError, match=re.escape(why)):
            NamedChecks.parse([bad])
    with pytest.raises(FleetError, match="twice"):
        NamedChecks.parse(["a=true", "a=false"])


def test_named_checks_gate_real_deploys(make_fleet: Callable[..., DeployFleet],
                                        tmp_path: Path) -> None:
    """Defect 8: the operator allow-lists checks on `dominator serve`; a request names
    one (a passing check: SUCCEEDED; a failing one: TERMINAL and rolled back), and
    a request carrying a command line, or naming no allow-listed check, is a 400."""
    script, seen, ran = tmp_path / "argv.py", tmp_path / "argv.log", tmp_path / "ran"
    script.write_text(ARGV_SCRIPT)
    fleet = make_fleet(3, ("--health-check", f"seen={sys.executable} {script} {seen} {{host}}",
                           "--health-check", """not-2=sh -c 'test "$1" != host-2' not-2 {host}"""))
    good = {"image": "v2", "select": {"all": True}, "waves": ["1", "100%"]}

    reply = fleet.start({**good, "healthCheck": {"command": f"touch {ran}"}})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert "never carries a command line" in error
    assert "dominator serve --health-check NAME=COMMAND" in error and '"check"' in error
    reply = fleet.start({**good, "healthCheck": {"check": "nope"}})
    assert reply.status_code == 400, reply.text
    assert "unknown health check 'nope'" in reply.json()["error"]
    assert "not-2, seen" in reply.json()["error"]
    assert not ran.exists() and fleet.api.get("/v1/deploys").json() == {"deploys": []}

    # The CLI names the check, as a pipeline would.
    started = json.loads(fleet.run("deploy", "start", "v2", "--select", "all", "--waves",
                                   "1,100%", "--health-check", "seen", "--retries", "0",
                                   "--json"))
    done = fleet.wait_end(started["id"])
    assert done["status"] == "SUCCEEDED", done
    assert done["request"]["healthCheck"]["check"] == "seen"
    checked = [json.loads(line) for line in seen.read_text().splitlines()]
    assert checked[0] == ["host-1"] and sorted(checked[1:]) == [["host-2"], ["host-3"]]
    assert all(host["health"] == "check seen: exit 0" for host in done["hosts"].values())
    page = httpx.get(f"{fleet.base}/deploys/{started['id']}", timeout=30).text
    assert "<td class=\"mono\">check seen</td>" in page and str(script) not in page

    failing = fleet.deploy({**good, "image": "v1",
                            "healthCheck": {"check": "not-2", "retries": 0}})
    done = fleet.wait_end(failing)
    assert done["status"] == "TERMINAL", done
    assert done["hosts"]["host-1"]["health"] == "check not-2: exit 0"
    assert done["hosts"]["host-2"]["error"] == "health check failed: check not-2: exit 1 " \
        "(1 attempt)"
    assert set(fleet.required().values()) == {"v2"}  # rolled back


def test_stored_command_is_never_run_on_resume(tmp_path: Path) -> None:
    """Defect 8: a deploy stored before named checks with a healthCheck.command,
    resumed by a restarted dominator, fails its health gate and rolls back; its
    command never runs, and no view shows it."""
    asyncio.run(stored_command_resumed(tmp_path))


async def stored_command_resumed(tmp_path: Path) -> None:
    state = DominatorState(tmp_path / "state.sqlite")
    mdb = Mdb(str(tmp_path / "mdb.sqlite"))
    mdb.set(Machine("h1", required_image="v1"))
    state.record_sync("h1", "v1", {})
    herd = FakeHerd(state)
    herd.subs = {m.hostname: Sub(m) for m in mdb.list()}
    ran = tmp_path / "ran"
    request = {"image": "v2", "select": {"hosts": ["h1"]}, "waves": ["100%"],
               "maxFailures": 0, "dryRun": False, "waveTimeoutSeconds": 900.0,
               "healthCheck": {"command": f"touch {ran}", "timeoutSeconds": 10.0,
                               "retries": 2}}
    DeployStore(state.engine).insert(Deploy("0123456789abcdef", None, request,
                                            [Wave("100%", 1, ["h1"])], {"h1": HostProgress(1)}))
    engine = DeployEngine(herd, state, mdb, FakeImages(), tick=0.02)
    await engine.start()
    await until(lambda: mdb.get("h1").required_image == "v2", "h1 is told v2")
    await until(lambda: herd.subs["h1"].listeners, "the engine watches h1")
    herd.subs["h1"].machine = mdb.get("h1")
    state.record_sync("h1", "v2", {})
    herd.subs["h1"].set_status(Status.SYNCED)
    await until(lambda: mdb.get("h1").required_image == "v1", "h1 is told v1 again")
    herd.subs["h1"].machine = mdb.get("h1")
    state.record_sync("h1", "v1", {})
    herd.subs["h1"].set_status(Status.SYNCED)
    await until(lambda: engine.get("0123456789abcdef").status != "RUNNING", "the deploy ends")
    deploy = engine.get("0123456789abcdef")
    assert deploy is not None and deploy.status == "TERMINAL"
    assert "predates named checks" in deploy.hosts["h1"].error
    assert "dominator serve --health-check NAME=COMMAND" in deploy.hosts["h1"].error
    assert not ran.exists()
    view = deploy_view(deploy, "/v1/deploys/0123456789abcdef")
    assert view["request"]["healthCheck"]["command"] == "REDACTED"
    assert str(ran) not in json.dumps(view)
    await engine.stop()
    mdb.close()


SECRETS = ("s3cret-pw", "s3cret-q")
FILLS = {"hostname": "hosts", "name": "images", "deploy_id": "deploys"}


def every_route(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes, an included router's own ones included (FastAPI >= 0.165 keeps
    each included router as one route)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from every_route(included.routes) if included is not None else [route]


def open_urls(fleet: DeployFleet, deploy_ids: list[str]) -> list[str]:
    """Every GET route of the HTTP app outside the token-checked /v1, its path
    parameters filled with each real hostname, image and deploy id, and each of
    those pages' `.json` twin. A route with a parameter not in FILLS fails here."""
    # The routes only: no router reads its context until a request comes.
    app = make_app(HttpContext.__new__(HttpContext))
    values = {"hosts": [*fleet.names, "no-such-host"], "images": ["v1", "v2", "tiny"],
              "deploys": deploy_ids}
    urls = []
    for route in every_route(app.routes):
        path = getattr(route, "path", "")
        if path.startswith("/v1") or "GET" not in (getattr(route, "methods", None) or ()):
            continue
        params = re.findall(r"\{(\w+)(?::\w+)?\}", path)
        assert set(params) <= set(FILLS), f"{path}: fill its parameters in FILLS"
        if not params:
            urls.append(path)
            continue
        assert len(params) == 1, path
        for value in values[FILLS[params[0]]]:
            page = re.sub(r"\{\w+(?::\w+)?\}", value, path)
            urls += [page, f"{page}.json"]
    return urls


def test_open_pages_never_show_health_check_secrets(make_fleet: Callable[..., DeployFleet],
                                                    health: HealthServer) -> None:
    """Defect 7: a health check URL's credentials and query values appear on no open
    page or JSON twin (nor in the token-holder's API); the check itself still
    sends them."""
    fleet = make_fleet(3)
    port = health.server.server_address[1]
    secret_url = f"http://user:s3cret-pw@127.0.0.1:{port}/health/{{host}}?token=s3cret-q"
    health.status["host-2"] = 500
    deploy_id = fleet.deploy({"image": "v2", "select": {"all": True}, "waves": ["1", "100%"],
                              "healthCheck": {"url": secret_url, "retries": 0}})
    done = fleet.wait_end(deploy_id)
    assert done["status"] == "TERMINAL" and "host-2" in done["reason"], done
    assert health.carried and all(
        path.endswith("?token=s3cret-q") and auth == "Basic dXNlcjpzM2NyZXQtcHc="
        for path, auth in health.carried)  # user:s3cret-pw: the check sent them
    shown = done["request"]["healthCheck"]["url"]
    assert shown == f"http://REDACTED@127.0.0.1:{port}/health/{{host}}?token=REDACTED"
    assert done["hosts"]["host-1"]["health"] == (
        f"GET http://REDACTED@127.0.0.1:{port}/health/host-1?token=REDACTED: HTTP 200")

    urls = open_urls(fleet, [deploy_id])
    assert {"/", "/index.json", f"/deploys/{deploy_id}", f"/deploys/{deploy_id}.json",
            "/deploys.json", "/hosts/host-1.json", "/images/v2", "/metrics"} <= set(urls)
    anonymous = httpx.Client(base_url=fleet.base, timeout=30)
    for url in urls:
        reply = anonymous.get(url)
        assert reply.status_code in (200, 404), (url, reply.status_code, reply.text[:300])
        for secret in SECRETS:
            assert secret not in reply.text, (url, secret)
    detail = anonymous.get(f"/deploys/{deploy_id}").text
    assert "REDACTED" in detail and "host-2" in detail
    for url in ("/v1/deploys", f"/v1/deploys/{deploy_id}"):  # the token holder's view too
        text = fleet.api.get(url).text
        assert not [secret for secret in SECRETS if secret in text], url
