"""Dominator-compatible triggers: which services to restart when paths change.

JSON: `[{"MatchLines": [...], "Service": "nginx", "DoReload": false,
"DoReboot": false, "HighImpact": false}]`; lines whose first non-blank
character is `#` are comments. MatchLines are start-anchored regexes, like
filter lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fleetlib.errors import FleetError
from fleetlib.fstree.filter import compile_patterns, match_any
from fleetlib.jsoninput import load_json

_FIELDS = {"MatchLines": list, "Service": str, "DoReload": bool, "DoReboot": bool,
           "HighImpact": bool}
SERVICE_RE = re.compile(r"[A-Za-z0-9@_.:\-]+")


@dataclass(frozen=True)
class Trigger:
    """One rule: a service to stop before and start (or reload) after matching changes."""

    match_lines: tuple[str, ...]
    service: str
    do_reload: bool = False
    do_reboot: bool = False
    high_impact: bool = False
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def matches(self, path: str) -> bool:
        """Whether a changed path fires this trigger."""
        return match_any(self._patterns, path)

    def to_json(self) -> dict[str, object]:
        """The Dominator JSON form of this rule."""
        return {"MatchLines": list(self.match_lines), "Service": self.service,
                "DoReload": self.do_reload, "DoReboot": self.do_reboot,
                "HighImpact": self.high_impact}


def make_trigger(match_lines: Iterable[str], service: str, do_reload: bool = False,
                 do_reboot: bool = False, high_impact: bool = False) -> Trigger:
    """Validate and compile one trigger (from JSON or from the wire)."""
    lines = tuple(match_lines)
    if not SERVICE_RE.fullmatch(service):
        raise FleetError(f"trigger service {service!r} is not a valid service name")
    if not lines:
        raise FleetError(f"trigger for {service!r} has no MatchLines")
    patterns = compile_patterns((f"trigger for {service!r} MatchLines[{index}]", line)
                                for index, line in enumerate(lines))
    return Trigger(lines, service, do_reload, do_reboot, high_impact, patterns)


def parse_triggers(text: str, origin: str = "triggers") -> list[Trigger]:
    """Parse Dominator trigger JSON (with `#` comment lines); FleetError when malformed."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    data = load_json(body, origin) if body.strip() else []
    if not isinstance(data, list):
        raise FleetError(f"{origin}: expected a JSON array of triggers")
    triggers = []
    for index, item in enumerate(data):
        where = f"{origin}: trigger {index}"
        if not isinstance(item, dict):
            raise FleetError(f"{where}: expected an object")
        unknown = set(item) - set(_FIELDS)
        if unknown:
            raise FleetError(f"{where}: unknown field(s) {', '.join(map(repr, sorted(unknown)))}")
        for key, kind in _FIELDS.items():
            if key in item and not isinstance(item[key], kind):
                raise FleetError(f"{where}: {key} must be a {kind.__name__}")
        if "Service" not in item:
            raise FleetError(f"{where}: missing Service")
        if not all(isinstance(line, str) for line in item.get("MatchLines", [])):
            raise FleetError(f"{where}: MatchLines must be strings")
        try:
            triggers.append(make_trigger(
                item.get("MatchLines", []), item["Service"], item.get("DoReload", False),
                item.get("DoReboot", False), item.get("HighImpact", False)))
        except FleetError as err:
            raise FleetError(f"{where}: {err}") from None
    return triggers


def load_triggers(path: Path) -> list[Trigger]:
    """Read a triggers JSON file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FleetError(f"cannot read triggers {path}: {err}") from None
    return parse_triggers(text, origin=str(path))


def fired(triggers: Iterable[Trigger], paths: Iterable[str]) -> list[Trigger]:
    """The triggers any of `paths` matches, in rule order, each once."""
    rules = list(triggers)
    hit = [False] * len(rules)
    for path in paths:
        for index, trigger in enumerate(rules):
            if not hit[index] and trigger.matches(path):
                hit[index] = True
        if all(hit):
            break
    return [trigger for trigger, was_hit in zip(rules, hit, strict=True) if was_hit]
