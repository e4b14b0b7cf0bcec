"""Deploys with several dominators on one PostgreSQL MDB (FLEET_TEST_POSTGRES_URL;
skipped without it): real `dominator serve` processes, real subd, a real health gate.
A deploy POSTed to one dominator is seen through every other and run by exactly one
(its runner lease); a cancel through another dominator stops it; a runner SIGKILLed
mid-deploy has its deploy resumed by another dominator, and it ends SUCCEEDED with
every host on the image."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetlib.testing.daemons import TRACEBACK_RE, Daemon
from fleetlib.testing.dominators import TOKEN, Dominators
from fleetlib.testing.fleet import wait_for
from fleetlib.testing.trees import make_tree
from tests.integration.sharedfleet import start_hosts, start_sharing
from tests.integration.test_deploy import HealthServer

NAMES = ["dom-1", "dom-2", "dom-3"]
LEASE = "6"  # long enough that a loaded machine does not lapse a runner's lease


@pytest.fixture
def dominators(tmp_path: Path, ca: Path, postgres_url: str, imageserver: Daemon
               ) -> Iterator[Dominators]:
    started = Dominators(tmp_path, ca, postgres_url, imageserver, NAMES, LEASE)
    yield started
    started.stop()


@pytest.fixture
def health() -> Iterator[HealthServer]:
    server = HealthServer()
    yield server
    server.close()


class Api:
    """The deploy API of each dominator."""

    def __init__(self, doms: Dominators) -> None:
        self.doms = doms

    def call(self, name: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.doms.http[name]}{path}", timeout=30,
                             headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)

    def start(self, name: str, body: dict[str, Any]) -> str:
        reply = self.call(name, "POST", "/v1/deploys", json=body)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def get(self, name: str, deploy_id: str) -> dict[str, Any]:
        reply = self.call(name, "GET", f"/v1/deploys/{deploy_id}")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def wait(self, name: str, deploy_id: str, test: Callable[[dict[str, Any]], bool],
             what: str, timeout: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            state = self.get(name, deploy_id)
            return state if test(state) else None
        return wait_for(check, f"deploy {deploy_id} through {name}: {what}", timeout)


def ran_it(daemon: Daemon, deploy_id: str) -> bool:
    """Whether the dominator's log says it ran (started, resumed or took over) the deploy."""
    return bool(re.search(rf"deploy {deploy_id}: (v2 to|resuming|taking over|lease renewed)",
                          daemon.log()))


def test_any_dominator_takes_a_deploy_one_runs_it_another_resumes_it(
        tmp_path: Path, postgres_url: str, dominators: Dominators, health: HealthServer,
        start_subd: Callable[..., Daemon]) -> None:
    doms, api = dominators, Api(dominators)
    tree = make_tree(tmp_path / "tree")
    for image in ("v1", "v2"):
        (tree / "etc/release").write_text(f"{image}\n")
        doms.run("dom-1", "image", "add", image, str(tree))
    owner = start_sharing(doms, postgres_url, prefix=lambda name: f"{name}-host")
    hosts = sorted(owner)
    start_hosts(postgres_url, tmp_path, start_subd, hosts)
    wait_for(lambda: all(all(view.get(host, {}).get("status") in ("synced", "intrusion")
                             and view[host]["current_image"] == "v1" for host in hosts)
                         for view in doms.managers(NAMES).values()),
             "every host synced on v1 as every dominator shows it", 90)

    # A cancel through a dominator that does not run the deploy stops it.
    health.delay[hosts[0]] = 3.0
    canceled = api.start("dom-2", {"image": "v2", "select": {"hosts": hosts[:2]},
                                   "waves": ["1", "100%"], "healthCheck": {"url": health.url}})
    api.wait("dom-3", canceled, lambda s: s["hosts"][hosts[0]]["status"] == "checking",
             "its first host is being checked")
    reply = api.call("dom-3", "POST", f"/v1/deploys/{canceled}/cancel")
    assert reply.status_code == 202, reply.text
    assert reply.json()["runner"] == "dom-2" and "canceling" in reply.json()["progress"]
    assert "canceling" in api.get("dom-1", canceled)["progress"]  # seen everywhere at once
    state = api.wait("dom-1", canceled, lambda s: s["status"] != "RUNNING", "ended")
    assert state["status"] == "CANCELED", state
    assert "1 host(s) left untouched" in state["reason"], state["reason"]
    assert state["hosts"][hosts[0]]["status"] == "succeeded"
    assert state["hosts"][hosts[1]]["status"] == "skipped"
    assert [name for name in NAMES if ran_it(doms.daemons[name], canceled)] == ["dom-2"]

    # A deploy POSTed to dom-1 is seen through the others and run by dom-1 alone.
    for host in hosts:
        health.delay[host] = 1.5
    deploy_id = api.start("dom-1", {"image": "v2", "select": {"all": True},
                                    "waves": ["1", "2", "100%"],
                                    "healthCheck": {"url": health.url}})
    for name in NAMES:
        seen = api.get(name, deploy_id)
        assert seen["status"] == "RUNNING" and seen["runner"] == "dom-1", (name, seen)
        listed = api.call(name, "GET", "/v1/deploys").json()["deploys"]
        assert [d["id"] for d in listed] == [deploy_id, canceled], name
        assert listed[0]["runner"] == "dom-1"
    api.wait("dom-2", deploy_id, lambda s: s["waves"][1]["status"] == "RUNNING",
             "its second wave runs")
    assert [name for name in NAMES if ran_it(doms.daemons[name], deploy_id)] == ["dom-1"]

    # SIGKILL its runner mid-deploy: another dominator claims it once its lease expired
    # and resumes it from its saved state; it ends SUCCEEDED with every host on v2.
    doms.daemons["dom-1"].kill()
    survivors = NAMES[1:]
    taken = api.wait("dom-3", deploy_id, lambda s: s["runner"] in survivors,
                     "run by a survivor", 30)
    state = api.wait(survivors[0], deploy_id, lambda s: s["status"] != "RUNNING", "ended", 120)
    assert state["status"] == "SUCCEEDED", state
    assert state["runner"] == taken["runner"]
    assert [w["status"] for w in state["waves"]] == ["SUCCEEDED"] * 3
    assert {host["status"] for host in state["hosts"].values()} == {"succeeded"}
    assert state["hosts"][hosts[0]]["previousImage"] == "v2"  # the canceled deploy's
    assert {state["hosts"][host]["previousImage"] for host in hosts[1:]} == {"v1"}
    runners = [name for name in survivors if ran_it(doms.daemons[name], deploy_id)]
    assert runners == [taken["runner"]]
    assert f"deploy {deploy_id}: taking over from dom-1" in doms.daemons[runners[0]].log()
    for view in doms.managers(survivors).values():
        assert {view[host]["current_image"] for host in hosts} == {"v2"}
    assert all((tmp_path / host / "etc/release").read_text() == "v2\n" for host in hosts)
    for name in survivors:
        assert not TRACEBACK_RE.search(doms.daemons[name].log()), name
