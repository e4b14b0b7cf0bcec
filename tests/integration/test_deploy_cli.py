"""`dominator deploy ...` as an operator runs it, the real CLI against a real
`dominator serve` and real subd: deploys allowed to run HighImpact triggers (at most
N hosts of a wave at a time), `deploy plan`'s per-host summary and exit codes,
`deploy list`, `deploy status` exit codes, `start --wait` printing only changes,
and HTTP errors as the common exit codes in one line naming the URL's setting."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from dominator.deploy.model import Deploy, HostProgress, Wave
from dominator.deploy.store import DeployStore
from dominator.herd.state import DominatorState
from fleetlib.testing.daemons import assert_one_line_error, cli, free_port
from tests.integration import test_deploy
from tests.integration.test_deploy import DeployFleet, HealthServer

make_fleet = test_deploy.make_fleet  # test_deploy's fixtures, for these tests too
health = test_deploy.health

TRIGGERS = ('[{"MatchLines": ["/etc/ssl/.*"], "Service": "certs"}, '
            '{"MatchLines": ["/boot/.*"], "Service": "kernel", "HighImpact": true}]')


def add_kernel_image(fleet: DeployFleet) -> None:
    """`k`: v2 plus a new /boot/vmlinuz, whose `kernel` trigger is HighImpact."""
    tree = fleet.tmp / "v1"  # holds v2's files once add_images ran
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz").write_text("kernel 2\n")
    (fleet.tmp / "kernel.json").write_text(TRIGGERS)
    fleet.run("image", "add", "k", str(tree), "--computed-files",
              str(fleet.tmp / "computed.json"), "--triggers", str(fleet.tmp / "kernel.json"))


def deploy_cli(fleet: DeployFleet, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`dominator deploy ARGS...` against the fleet (its result, whatever the exit)."""
    return cli("deploy", *args, env={**fleet.env, **env})


def kernel_runs(trigger_log: Path, action: str = "start") -> int:
    """How often the `kernel` trigger ran `action`."""
    return trigger_log.read_text().splitlines().count(f"{action} kernel") \
        if trigger_log.exists() else 0


def test_disruptive_deploys_from_plan_to_list(make_fleet: Callable[..., DeployFleet],
                                              health: HealthServer, trigger_log: Path) -> None:
    fleet = make_fleet(3)
    add_kernel_image(fleet)

    # The plan: readable per host; a HighImpact trigger without the allowance is refused.
    plan = deploy_cli(fleet, "plan", "k", "--select", "all")
    assert plan.returncode == 4, plan
    lines = plan.stdout.splitlines()
    assert lines[0].split() == ["HOST", "REACHABLE", "ADD", "CHANGE", "DELETE", "FETCH",
                                "TRIGGERS", "DISRUPTIVE", "VERDICT"]
    assert [line.split()[:2] for line in lines[1:]] == [[n, "yes"] for n in fleet.names]
    assert all("certs,kernel" in line and " yes " in line and "refused: disruption denied"
               in line and "--allow-disruption" in line for line in lines[1:]), plan.stdout
    allowed = deploy_cli(fleet, "plan", "k", "--select", "all", "--allow-disruption", "--json")
    assert allowed.returncode == 0, allowed
    hosts = json.loads(allowed.stdout)
    assert sorted(hosts) == fleet.names
    for detail in hosts.values():  # the existing keys, and the new ones
        assert detail["status"] == "planned" and detail["plan"]["wouldStop"] == ""
        assert detail["plan"]["added"] >= 2 and detail["plan"]["bytesToFetch"] > 0
        assert detail["plan"]["highImpact"] == ["kernel"] and detail["plan"]["disruptive"]
    assert set(fleet.required().values()) == {"v1"}

    # Without --allow-disruption the deploy fails on it (and says what allows it): exit 1.
    denied = deploy_cli(fleet, "start", "k", "--select", "host-1", "--waves", "100%",
                        "--wait")
    assert denied.returncode == 1, denied
    assert "TERMINAL" in denied.stdout and "--allow-disruption" in denied.stdout
    assert kernel_runs(trigger_log) == 0 and fleet.required()["host-1"] == "v1"
    terminal_id = denied.stdout.split()[1].rstrip(":")

    # With it, every host's update runs its HighImpact trigger, one host at a time.
    done = deploy_cli(fleet, "start", "k", "--select", "all", "--waves", "100%",
                      "--allow-disruption", "--max-disruptions", "1", "--wait", "--json")
    assert done.returncode == 0, done
    final = json.loads(done.stdout)
    assert final["status"] == "SUCCEEDED", final
    assert final["request"]["allowDisruption"] and final["request"]["maxDisruptions"] == 1
    assert final["started_by"] == "token:admin"
    spans = sorted((h["startedUnix"], h["finishedUnix"]) for h in final["hosts"].values())
    assert all(later[0] >= earlier[1]
               for earlier, later in zip(spans, spans[1:], strict=False)), spans
    assert kernel_runs(trigger_log) == 3
    assert all((root / "boot/vmlinuz").exists() for root in fleet.roots)
    for name in fleet.names:  # the allowance was spent: none is left behind
        shown = json.loads(fleet.run("fleet", "show", name, "--json"))
        assert shown["disruption_allowed"] is False, shown
    # Outside a terminal --wait printed a line per change, never the same one twice.
    progress = [line.split(" ", 1)[1] for line in done.stderr.splitlines()]
    assert progress, done
    assert all(a != b for a, b in zip(progress, progress[1:], strict=False)), done.stderr
    assert progress[-1].startswith("wave 1/1 SUCCEEDED: 3/3 hosts converged")
    succeeded_id = final["id"]

    # status: exit 0 for SUCCEEDED, 1 for TERMINAL, 1 (one line) for an unknown id.
    status = deploy_cli(fleet, "status", succeeded_id)
    assert status.returncode == 0 and f"deploy {succeeded_id}: SUCCEEDED" in status.stdout
    status = deploy_cli(fleet, "status", terminal_id, "--json")
    assert status.returncode == 1 and json.loads(status.stdout)["status"] == "TERMINAL"
    assert_one_line_error(deploy_cli(fleet, "status", "no-such-id"), "no deploy 'no-such-id'",
                          "HTTP 404", fleet.base, "DOMINATOR_URL", code=1)

    # list: a table newest first (no dry runs unless asked), a filter, a JSON list.
    listed = deploy_cli(fleet, "list")
    assert listed.returncode == 0, listed
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["ID", "IMAGE", "STATUS", "WAVE", "STARTED", "BY"]
    assert [(r[0], r[1], r[2], r[3]) for r in rows[1:]] == [
        (succeeded_id, "k", "SUCCEEDED", "1/1"), (terminal_id, "k", "TERMINAL", "1/1")]
    assert all(("ago" in r or "now" in r) and r[-1] == "token:admin" for r in rows[1:])
    only = deploy_cli(fleet, "list", "--status", "terminal", "--json")
    assert only.returncode == 0, only
    found = json.loads(only.stdout)
    assert [d["id"] for d in found] == [terminal_id]
    assert found[0]["status"] == "TERMINAL" and found[0]["created_unix"] > 0
    assert found[0]["wave"] == 1 and found[0]["wave_count"] == 1
    with_plans = json.loads(deploy_cli(fleet, "list", "--dry-runs", "--json").stdout)
    assert sum(d["dryRun"] for d in with_plans) == 2 and len(with_plans) == 4

    # The HTTP API takes the fields in snake_case too, and validates them.
    api = fleet.api
    body = {"image": "k", "select": {"hosts": ["host-1"]}, "dryRun": True}
    for bad, fragment in (({"max_disruptions": 1}, "needs allowDisruption"),
                          ({"allow_disruption": True, "max_disruptions": 0}, "greater than"),
                          ({"allow_disruption": True, "max_disruptions": "2"}, "integer"),
                          ({"allow_disruption": "yes"}, "boolean")):
        reply = api.post("/v1/deploys", json={**body, **bad})
        assert reply.status_code == 400 and fragment in reply.json()["error"], (bad, reply.text)
    reply = api.post("/v1/deploys", json={**body, "allow_disruption": True,
                                          "max_disruptions": 2})
    assert reply.status_code == 202, reply.text
    assert fleet.status(reply.json()["id"])["request"]["maxDisruptions"] == 2
    assert_one_line_error(deploy_cli(fleet, "start", "k", "--select", "all",
                                     "--max-disruptions", "2"), "--allow-disruption")
    assert_one_line_error(deploy_cli(fleet, "start", "k", "--select", "all",
                                     "--allow-disruption", "--max-disruptions", "0"),
                          "--max-disruptions")

    # HTTP errors: the common exit codes, one line naming the URL and its setting.
    nobody = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(deploy_cli(fleet, "list", DOMINATOR_URL=nobody), nobody,
                          "set by DOMINATOR_URL", "dominator serve", "--http-port", code=3)
    assert_one_line_error(deploy_cli(fleet, "list", "--url", nobody), "set by --url", code=3)
    assert_one_line_error(deploy_cli(fleet, "list", DOMINATOR_URL="127.0.0.1:6980"),
                          "not an http:// or https:// URL", code=2)
    assert_one_line_error(deploy_cli(fleet, "list", DOMINATOR_TOKEN="wrong"), "HTTP 401",
                          "--token", code=4)
    reader = json.loads(fleet.run("tokens", "create", "viewer", "--scope", "read",
                                  "--json"))["token"]
    assert deploy_cli(fleet, "list", DOMINATOR_TOKEN=reader).returncode == 0
    assert_one_line_error(deploy_cli(fleet, "start", "k", "--select", "all",
                                     DOMINATOR_TOKEN=reader), "HTTP 403", "scope", code=4)
    assert_one_line_error(deploy_cli(fleet, "cancel", succeeded_id), "HTTP 409",
                          "nothing to cancel", code=4)
    assert_one_line_error(deploy_cli(fleet, "start", "nope", "--select", "all"),
                          "HTTP 400", "unknown image", code=2)
    fleet.run("fleet", "disable-updates", "--reason", "freeze")
    assert_one_line_error(deploy_cli(fleet, "start", "k", "--select", "all"), "HTTP 503",
                          "freeze", "try again", code=3)
    fleet.run("fleet", "enable-updates")

    # A deploy resumed after a restart keeps its settings: back to v2, whose deleted
    # /boot fires k's HighImpact trigger, one host at a time, the dominator killed mid-wave.
    for name in fleet.names:
        health.delay[name] = 1.0
    deploy_id = fleet.deploy({"image": "v2", "select": {"all": True}, "waves": ["100%"],
                              "allow_disruption": True, "max_disruptions": 1,
                              "healthCheck": {"url": health.url}})
    fleet.wait_until(deploy_id, lambda s: any(h["status"] in ("checking", "succeeded")
                                              for h in s["hosts"].values()),
                     "a first host is synced")
    running = deploy_cli(fleet, "status", deploy_id)
    assert running.returncode == 0, running  # still running is not a failure, and says so
    assert "RUNNING (still running)" in running.stdout or "SUCCEEDED" in running.stdout
    fleet.dominator.kill()
    fleet.dominator.start()
    fleet.wait_http()
    state = fleet.wait_end(deploy_id, timeout=120)
    assert state["status"] == "SUCCEEDED", state
    assert state["request"]["allowDisruption"] and state["request"]["maxDisruptions"] == 1
    assert kernel_runs(trigger_log, "stop") == 6  # 3 for k, 3 for v2: each update ran once
    assert not any((root / "boot/vmlinuz").exists() for root in fleet.roots)

    # A cancel while hosts of the wave wait for a disruption slot leaves them untouched.
    health.delay.clear()
    deploy_id = fleet.deploy({"image": "k", "select": {"all": True}, "waves": ["100%"],
                              "allowDisruption": True, "maxDisruptions": 1})
    fleet.wait_until(deploy_id, lambda s: s["hosts"]["host-1"]["status"] != "pending",
                     "host-1 starts")
    assert api.post(f"/v1/deploys/{deploy_id}/cancel").status_code == 202  # at once
    state = fleet.wait_end(deploy_id)
    assert state["status"] == "CANCELED", state
    assert "canceled during wave 1 of 1" in state["reason"], state["reason"]
    assert state["hosts"]["host-3"]["status"] == "skipped"
    assert fleet.required()["host-3"] == "v2"
    status = deploy_cli(fleet, "status", deploy_id)
    assert status.returncode == 1 and "CANCELED" in status.stdout

    # A host that cannot be reached: the plan is not a success (exit 3).
    fleet.sub("host-3").stop()
    plan = deploy_cli(fleet, "plan", "v2", "--select", "all", "--allow-disruption")
    assert plan.returncode == 3, plan
    row = next(line for line in plan.stdout.splitlines() if line.startswith("host-3"))
    assert row.split()[1] == "no" and "cannot plan: unreachable" in row


def test_deploys_stored_before_disruption_settings_load(tmp_path: Path) -> None:
    state = DominatorState(tmp_path / "state.sqlite")
    store = DeployStore(state.engine)
    request = {"image": "v2", "select": {"hosts": ["h1"]}, "waves": ["100%"],
               "maxFailures": 0, "dryRun": False, "waveTimeoutSeconds": 900.0}
    deploy = Deploy("0123456789abcdef", None, request, [Wave("100%", 1, ["h1"])],
                    {"h1": HostProgress(1)})
    store.insert(deploy)
    record = deploy.to_record()  # as saved before the new fields existed
    del record["started_by"]
    del record["hosts"]["h1"]["disruption_granted"]
    with state.engine.begin() as conn:
        conn.execute(sa.text("UPDATE deploys SET state = :state"),
                     {"state": json.dumps(record)})
    loaded = store.get("0123456789abcdef")
    assert loaded is not None and loaded.started_by == ""
    assert not loaded.spec.allow_disruption and loaded.spec.max_disruptions is None
    assert not loaded.hosts["h1"].disruption_granted
