"""Running trigger actions (docs/DESIGN.md "How an update works", steps 3): which
services to stop before an update and start, reload or reboot after it, and the
command that does it (`systemctl {action} {service}` by default).

The command is split into arguments once, then each argument is formatted: a
service name can never add an argument or reach a shell. Failures are reported,
never raised: an update goes on when a service does not stop or start.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from fleetlib.errors import FleetError
from fleetlib.fstree.triggers import SERVICE_RE, Trigger, fired

log = logging.getLogger(__name__)

DEFAULT_COMMAND = "systemctl {action} {service}"
ACTIONS = ("stop", "start", "reload", "reboot")
Action = tuple[str, str]  # (action, service)


@dataclass
class TriggerActions:
    """What an update's changed paths ask of services: `stops` before the first
    change, `after` (start, reload, then at most one reboot) after the last."""

    stops: list[Action] = field(default_factory=list)
    after: list[Action] = field(default_factory=list)
    high_impact: list[str] = field(default_factory=list)


def plan_actions(old: Iterable[Trigger], new: Iterable[Trigger],
                 paths: Iterable[str]) -> TriggerActions:
    """The actions for `paths` changing: stop what the old or new image's triggers
    match (the new image's rule wins for a service in both; DoReload and DoReboot
    services are not stopped), then start or reload what the new image's match,
    and finish with one `reboot` when a DoReboot trigger fired."""
    paths = list(paths)
    new_fired = fired(new, paths)
    old_fired = fired(old, paths)
    actions = TriggerActions()
    rules: dict[str, Trigger] = {}
    for trigger in new_fired + old_fired:
        rules.setdefault(trigger.service, trigger)
    actions.stops = [("stop", service) for service, trigger in rules.items()
                     if not (trigger.do_reload or trigger.do_reboot)]
    actions.high_impact = [service for service, trigger in rules.items() if trigger.high_impact]
    reboot: list[Action] = []
    for trigger in new_fired:
        if rules[trigger.service] is not trigger:
            continue  # a second rule for the same service
        if trigger.do_reboot:
            reboot = reboot or [("reboot", trigger.service)]
        else:
            actions.after.append(("reload" if trigger.do_reload else "start", trigger.service))
    actions.after += reboot
    return actions


class TriggerRunner:
    """Runs one action on one service with the operator's command template."""

    def __init__(self, command_template: str = DEFAULT_COMMAND, timeout: float = 120.0) -> None:
        try:
            self._argv = shlex.split(command_template)
            for arg in self._argv:
                arg.format(action="stop", service="example")
        except (ValueError, KeyError, IndexError) as err:
            raise FleetError(f"invalid trigger command {command_template!r}: {err}") from None
        if not self._argv:
            raise FleetError("the trigger command is empty")
        self.command_template = command_template
        self.timeout = timeout

    def run(self, action: str, service: str) -> str:
        """Run `action` for `service`; "ok", or what went wrong in one line."""
        if action not in ACTIONS:
            return f"unknown action {action!r}"
        if not SERVICE_RE.fullmatch(service):
            return f"invalid service name {service!r}"
        argv = [arg.format(action=action, service=service) for arg in self._argv]
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"timed out after {self.timeout:g} s"
        except OSError as err:
            return f"cannot run {argv[0]}: {err.strerror}"
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            return f"exit status {result.returncode}" + (f": {detail[-1]}" if detail else "")
        return "ok"

    def run_all(self, actions: Iterable[Action]) -> tuple[list[str], list[str]]:
        """Run actions in order; returns (every action run, like "stop nginx",
        and one line per failure)."""
        ran: list[str] = []
        failures: list[str] = []
        for action, service in actions:
            ran.append(f"{action} {service}")
            result = self.run(action, service)
            if result != "ok":
                failures.append(f"trigger {action} {service} failed: {result}")
                log.warning("%s", failures[-1])
        return ran, failures
