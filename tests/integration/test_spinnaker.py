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
import pytest
import yaml

from fleetlib.testing.daemons import PROJECT, Daemon
from fleetlib.testing.fleet import FleetUnderTest, add_images, names

STAGE_FILE = PROJECT / "spinnaker" / "orca-local.yml"
PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
# The functions kork's ExpressionsSupport registers for SpEL (Orca's pipeline helpers
# are not needed by a webhook stage); `#environment` is not among them.
SPEL_FUNCTIONS = frozenset({"toJson", "toInt", "toFloat", "toBoolean", "toBase64",
                            "fromBase64", "alphanumerical"})
SPRING_PROPERTY = re.compile(r"[A-Za-z0-9_.-]+")


def load_stage(environment: dict[str, str]) -> dict:
    """The preconfigured stage as Orca holds it after start-up: Spring Boot replaces
    each ${NAME} whose NAME is a property (environment variables are) and keeps
    the placeholders it cannot resolve for SpEL (ignoreUnresolvablePlaceholders)."""
    def resolve(value: object) -> object:
        if isinstance(value, str):
            def spring(match: re.Match[str]) -> str:
                name = match.group(1)
                if SPRING_PROPERTY.fullmatch(name) and name in environment:
                    return environment[name]
                return match.group(0)
            return PLACEHOLDER.sub(spring, value)
        if isinstance(value, list):
            return [resolve(item) for item in value]
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        return value
    stage = resolve(yaml.safe_load(STAGE_FILE.read_text())["webhook"]["preconfigured"][0])
    assert isinstance(stage, dict)
    return stage


def render(template: str, values: dict[str, str], context: dict[str, object]) -> str:
    """Orca's SpEL evaluation of one stage field: parameter values, paths into the
    stage context and kork's functions; anything else fails as it would in Orca."""
    def evaluate(match: re.Match[str]) -> str:
        expression = match.group(1)
        if found := re.fullmatch(r"parameterValues\['(\w+)'\]", expression):
            return values[found.group(1)]
        if found := re.match(r"#(\w+)", expression):
            if found.group(1) not in SPEL_FUNCTIONS:
                raise AssertionError(f"Orca cannot evaluate ${{{expression}}}: SpEL has no "
                                     f"function or variable #{found.group(1)}")
            raise AssertionError(f"not emulated (the stage needs no function): ${{{expression}}}")
        value: object = context
        for part in expression.split("."):
            if not isinstance(value, dict) or part not in value:
                raise AssertionError(f"Orca cannot evaluate ${{{expression}}}: "
                                     f"no {part!r} in the stage context")
            value = value[part]
        return str(value)
    return PLACEHOLDER.sub(evaluate, template)


def test_stage_uses_only_what_orca_evaluates() -> None:
    """Every ${...} left after Spring's start-up resolution is SpEL Orca can evaluate,
    and the old `#environment` form is refused by this emulator as by Orca."""
    stage = load_stage({"DOMINATOR_URL": "http://d:6980", "DOMINATOR_TOKEN": "t"})
    assert stage["url"] == "http://d:6980/v1/deploys"
    assert stage["customHeaders"]["Authorization"] == ["Bearer t"]
    context: dict[str, object] = {"execution": {"id": "e"}, "stage": {"refId": "1"},
                                  "webhook": {"body": {"id": "d1"}}}
    values = {"image": "i", "selector": "{}", "waves": "[]", "maxFailures": "0"}
    for field in ("url", "payload", "cancelEndpoint"):
        assert "${" not in render(stage[field], values, context)
    with pytest.raises(AssertionError, match="no function or variable #environment"):
        render("${#environment['DOMINATOR_URL']}", values, context)


def json_path(document: dict, path: str) -> object:
    """`$.a.b` lookups (all the stage's paths need)."""
    value: object = document
    for part in path.removeprefix("$.").split("."):
        value = value[part]  # type: ignore[index]  # JSON: a wrong path fails the test
    return value


class OrcaWebhookStage:
    """One execution of the preconfigured stage, as Orca's webhook tasks run it."""

    def __init__(self, values: dict[str, str], environment: dict[str, str]) -> None:
        self.values = values
        self.stage = load_stage(environment)
        self.context: dict[str, object] = {"execution": {"id": "01HEXECUTION"},
                                           "stage": {"refId": "3"}}
        self.http = httpx.Client(timeout=30)
        self.status_url = ""

    def headers(self) -> dict[str, str]:
        return {name: render(values[0], self.values, self.context)
                for name, values in self.stage["customHeaders"].items()}

    def start(self) -> httpx.Response:
        """CreateWebhookTask: the POST, then the status URL from the Location header."""
        assert self.stage["method"] == "POST"
        url = render(self.stage["url"], self.values, self.context)
        payload = json.loads(render(self.stage["payload"], self.values, self.context))
        response = self.http.post(url, json=payload, headers=self.headers())
        if response.status_code < 300:
            self.context["webhook"] = {"body": response.json()}
            assert self.stage["statusUrlResolution"] == "locationHeader"
            self.status_url = response.headers["Location"]
        return response

    def monitor(self, on_poll: Callable[[dict], None] = lambda state: None,
                timeout: float = 240) -> tuple[str, list[str]]:
        """MonitorWebhookTask: poll until a success, terminal or canceled status."""
        outcomes = {status: outcome for outcome, key in (
            ("SUCCEEDED", "successStatuses"), ("TERMINAL", "terminalStatuses"),
            ("CANCELED", "canceledStatuses")) for status in self.stage[key].split(",")}
        progress: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.http.get(self.status_url, headers=self.headers())
            assert response.status_code == 200, response.text
            state = response.json()
            progress.append(str(json_path(state, self.stage["progressJsonPath"])))
            on_poll(state)
            status = str(json_path(state, self.stage["statusJsonPath"]))
            if status in outcomes:
                return outcomes[status], progress
            time.sleep(1)
        raise AssertionError("the stage never finished")

    def cancel(self) -> httpx.Response:
        """What Orca calls when the pipeline is canceled."""
        url = render(self.stage["cancelEndpoint"], self.values, self.context)
        return self.http.request(self.stage["cancelMethod"], url, headers=self.headers(),
                                 content=self.stage["cancelPayload"])


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
