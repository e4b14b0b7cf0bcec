"""Named, scoped HTTP tokens (issue 9 B) against a real dominator: made, listed
and revoked with the CLI, used against /v1 with httpx, and every create, revoke,
deploy start and cancel in the audit log under the token's name."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from dominator.herd.state import DominatorState
from dominator.herd.tokens import digest, permits
from dominator.herd.tokenstore import ApiTokens
from fleetlib.errors import ExistsError, FleetError
from fleetlib.rpc.certs import CERT, common_name
from fleetlib.testing.daemons import Daemon, cli, free_port
from fleetlib.testing.fleet import TOKEN, FleetUnderTest, wait_for


@pytest.fixture
def one_host(tmp_path: Path, ca: Path, imageserver: Daemon,
             start_subd: Callable[..., Daemon]) -> Iterator[FleetUnderTest]:
    """A dominator whose MDB knows one host that never answers (a deploy to it runs
    until cancelled), and a small image `small`."""
    fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd, hosts=0)
    tree = tmp_path / "small"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("small\n")
    fleet.run("image", "add", "small", str(tree))
    fleet.run("mdb", "set", "ghost", "--address", f"127.0.0.1:{free_port()}")
    wait_for(lambda: "ghost" in fleet.hosts(), "the dominator knows ghost")
    yield fleet
    fleet.stop()


def api(fleet: FleetUnderTest, token: str) -> httpx.Client:
    """The /v1 API with `token`."""
    return httpx.Client(base_url=fleet.base, timeout=30,
                        headers={"Authorization": f"Bearer {token}"})


DEPLOY = {"image": "small", "select": {"hosts": ["ghost"]}}


def test_read_and_deploy_tokens(one_host: FleetUnderTest, ca: Path) -> None:
    fleet = one_host
    created = json.loads(fleet.run("tokens", "create", "dashboards", "--scope", "read",
                                   "--json"))
    assert created["name"] == "dashboards" and created["scope"] == "read"
    reader = created["token"]
    made = cli("tokens", "create", "pipeline", "--scope", "deploy", env=fleet.env, check=True)
    deployer = made.stdout.strip()  # the value alone on stdout, for $(...)
    assert "never shown again" in made.stderr and deployer.startswith("fdt_")

    assert api(fleet, reader).get("/v1/deploys").status_code == 200
    refused = api(fleet, reader).post("/v1/deploys", json=DEPLOY)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == ("token 'dashboards' has scope read: POST /v1/deploys "
                                       "needs scope deploy")
    started = api(fleet, deployer).post("/v1/deploys", json=DEPLOY)
    assert started.status_code == 202, started.text
    deploy_id = started.json()["id"]
    assert api(fleet, reader).get(f"/v1/deploys/{deploy_id}").status_code == 200
    assert api(fleet, reader).post(f"/v1/deploys/{deploy_id}/cancel").status_code == 403
    cancelled = api(fleet, deployer).post(f"/v1/deploys/{deploy_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    assert api(fleet, TOKEN).get("/v1/deploys").status_code == 200  # the default keeps it all

    assert fleet.run("tokens", "revoke", "pipeline") == "revoked token pipeline (scope deploy)\n"
    gone = api(fleet, deployer).get("/v1/deploys")
    assert gone.status_code == 401 and gone.json()["error"] == "unknown or revoked bearer token"
    assert api(fleet, "fdt_no-such-token").get("/v1/deploys").status_code == 401
    again = cli("tokens", "create", "pipeline", "--scope", "read", env=fleet.env)
    assert again.returncode == 4 and "names are never reused" in again.stderr
    bad = cli("tokens", "create", "admin", "--scope", "read", env=fleet.env)
    assert bad.returncode == 2 and "default token" in bad.stderr
    assert cli("tokens", "revoke", "nobody", env=fleet.env).returncode == 1  # not found

    listed = fleet.run("tokens", "list", "--json")
    human = fleet.run("tokens", "list")
    for text in (listed, human):
        assert reader not in text and deployer not in text
    by_name = {token["name"]: token for token in json.loads(listed)}
    admin = common_name((ca / "admin" / CERT).read_bytes())
    assert by_name["dashboards"]["scope"] == "read" and not by_name["dashboards"]["revoked"]
    assert by_name["dashboards"]["last_used_unix"] > 0
    assert by_name["pipeline"]["revoked"] and by_name["pipeline"]["revoked_by"] == admin
    assert by_name["pipeline"]["created_by"] == admin
    assert "revoked" in human and "in force" in human

    entries = json.loads(fleet.run("audit", "--json"))
    mine = [(e["action"], e["who"], e["details"].get("name") or e["details"].get("deploy"))
            for e in entries if e["server"] == "dominator" and e["action"] != "mdb.set"]
    assert mine == [("token.create", admin, "dashboards"), ("token.create", admin, "pipeline"),
                    ("deploy.start", "token:pipeline", deploy_id),
                    ("deploy.cancel", "token:pipeline", deploy_id),
                    ("token.revoke", admin, "pipeline")]
    everything = json.dumps(entries)
    assert reader not in everything and deployer not in everything and TOKEN not in everything


def test_the_store_keeps_hashes_only_and_survives_a_restart(tmp_path: Path) -> None:
    """In process: a value is never written, a revocation outlives a restart, and
    each scope has exactly the rights it claims."""
    path = tmp_path / "dominator.sqlite"
    tokens = ApiTokens(DominatorState(path))
    token, value = tokens.create("ci", "deploy", "admin")
    checked = tokens.check(value)
    assert checked is not None and checked.last_used_unix
    assert checked == replace(token, last_used_unix=checked.last_used_unix)
    assert tokens.check(value + "x") is None
    tokens.revoke("ci", "admin")
    assert tokens.check(value) is None
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert value.encode() not in stored and digest(value).encode() in stored
    reopened = ApiTokens(DominatorState(path))
    assert reopened.check(value) is None
    ci, = reopened.list()
    assert ci.revoked_unix and ci.revoked_by == "admin" and ci.last_used_unix
    with pytest.raises(ExistsError):
        reopened.create("ci", "read", "admin")
    for bad in ("", "-x", "a b", "x" * 65):
        with pytest.raises(FleetError, match="token name"):
            reopened.create(bad, "read", "admin")
    assert [permits(scope, needed) for scope in ("read", "deploy", "admin", "bogus")
            for needed in ("read", "deploy")] == [True, False, True, True, True, True,
                                                   False, False]
