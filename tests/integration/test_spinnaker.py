"""The ready Spinnaker stage (spinnaker/orca-local.yml), driven the way Orca's
webhook stage drives it: render the preconfigured stage's URL, headers and
payload, POST, follow the Location header, poll every second reading
$.status and $.progress, and map statuses to succeeded/terminal/canceled.
This is deliberately not the project's own client."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from fleetlib.testing.daemons import PROJECT, Daemon
from tests.integration.test_fleet import FleetUnderTest, add_images, names

STAGE = yaml.safe_load((PROJECT / "spinnaker" / "orca-local.yml").read_text())[
    "webhook"]["preconfigured"][0]
SPEL = re.compile(r"\$\{([^}]*)\}")


def render(template: str, values: dict[str, str], environment: dict[str, str],
           context: dict[str, object]) -> str:
    """The few SpEL forms the stage uses, evaluated as Orca would."""
    def evaluate(match: re.Match[str]) -> str:
        expression = match.group(1)
        if found := re.fullmatch(r"parameterValues\['(\w+)'\]", expression):
            return values[found.group(1)]
        if found := re.fullmatch(r"#environment\['(\w+)'\]", expression):
            return environment[found.group(1)]
        value: object = context
        for part in expression.split("."):
            value = value[part]  # type: ignore[index]
        return str(value)
    return SPEL.sub(evaluate, template)


def json_path(document: dict, path: str) -> object:
    """`$.a.b` lookups (all the stage's paths need)."""
    value: object = document
    for part in path.removeprefix("$.").split("."):
        value = value[part]  # type: ignore[index]
    return value


class OrcaWebhookStage:
    """One execution of the preconfigured stage, as Orca's webhook tasks run it."""

    def __init__(self, values: dict[str, str], environment: dict[str, str]) -> None:
        self.values = values
        self.environment = environment
        self.context: dict[str, object] = {"execution": {"id": "01HEXECUTION"},
                                           "stage": {"refId": "3"}}
        self.http = httpx.Client(timeout=30)
        self.status_url = ""

    def headers(self) -> dict[str, str]:
        return {name: render(values[0], self.values, self.environment, self.context)
                for name, values in STAGE["customHeaders"].items()}

    def start(self) -> httpx.Response:
        """CreateWebhookTask: the POST, then the status URL from the Location header."""
        assert STAGE["method"] == "POST"
        url = render(STAGE["url"], self.values, self.environment, self.context)
        payload = json.loads(render(STAGE["payload"], self.values, self.environment,
                                    self.context))
        response = self.http.post(url, json=payload, headers=self.headers())
        if response.status_code < 300:
            self.context["webhook"] = {"body": response.json()}
            assert STAGE["statusUrlResolution"] == "locationHeader"
            self.status_url = response.headers["Location"]
        return response

    def monitor(self, on_poll: Callable[[dict], None] = lambda state: None,
                timeout: float = 240) -> tuple[str, list[str]]:
        """MonitorWebhookTask: poll until a success, terminal or canceled status."""
        outcomes = {status: outcome for outcome, key in (
            ("SUCCEEDED", "successStatuses"), ("TERMINAL", "terminalStatuses"),
            ("CANCELED", "canceledStatuses")) for status in STAGE[key].split(",")}
        progress: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.http.get(self.status_url, headers=self.headers())
            assert response.status_code == 200, response.text
            state = response.json()
            progress.append(str(json_path(state, STAGE["progressJsonPath"])))
            on_poll(state)
            status = str(json_path(state, STAGE["statusJsonPath"]))
            if status in outcomes:
                return outcomes[status], progress
            time.sleep(1)
        raise AssertionError("the stage never finished")

    def cancel(self) -> httpx.Response:
        """What Orca calls when the pipeline is canceled."""
        url = render(STAGE["cancelEndpoint"], self.values, self.environment, self.context)
        return self.http.request(STAGE["cancelMethod"], url, headers=self.headers(),
                                 content=STAGE["cancelPayload"])


def set_up(tmp_path: Path, ca: Path, imageserver: Daemon,
           start_subd: Callable[..., Daemon]) -> FleetUnderTest:
    fleet = FleetUnderTest(tmp_path, ca, imageserver, start_subd)
    add_images(fleet)
    for index, sub in enumerate(fleet.subs, 1):
        fleet.run("mdb", "set", f"host-{index}", "--address", sub.address,
                  "--required-image", "v1", "--tag", f"rack=r{index}")
    fleet.wait_status(names(1, 2, 3, 4, 5), "synced", "v1")
    return fleet


def test_spinnaker_stage_rolls_out_and_reports(tmp_path: Path, ca: Path, imageserver: Daemon,
                                              start_subd: Callable[..., Daemon]) -> None:
    fleet = set_up(tmp_path, ca, imageserver, start_subd)
    try:
        environment = {"DOMINATOR_URL": fleet.env["DOMINATOR_URL"],
                       "DOMINATOR_TOKEN": fleet.env["DOMINATOR_TOKEN"]}
        values = {"image": "v2", "selector": '{"all": true}', "waves": '["1", "100%"]',
                  "maxFailures": "0"}
        stage = OrcaWebhookStage(values, environment)
        first = stage.start()
        assert first.status_code == 202, first.text
        again = OrcaWebhookStage(values, environment).start()  # Orca retrying the POST
        assert again.json()["id"] == first.json()["id"]
        outcome, progress = stage.monitor()
        assert outcome == "SUCCEEDED"
        assert progress[-1].startswith("5/5 hosts converged")
        assert all((root / "usr/bin/new-in-v2").exists() for root in fleet.roots)

        values["image"] = "v1"
        canceled = OrcaWebhookStage(values, environment)
        canceled.context["execution"] = {"id": "01HSECOND"}
        assert canceled.start().status_code == 202
        sent = False

        def cancel_once(state: dict) -> None:
            nonlocal sent
            if not sent:
                assert canceled.cancel().status_code < 300
                sent = True

        outcome, _ = canceled.monitor(on_poll=cancel_once)
        assert outcome == "CANCELED"
    finally:
        fleet.dominator.stop()
