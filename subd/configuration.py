"""subd's runtime configuration (Get/SetConfiguration): the settings, their ranges and
meanings, checked the same way by subd (a bad value is INVALID_ARGUMENT) and by the CLI
(`dominator sub config HOST --set KEY=VALUE`).

A value set over the wire lasts until subd restarts: its flags (the systemd unit) are
the defaults, as with the reference's `subtool set-config`, so a boost never outlives
the process that got it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fleetlib.cli.display import ago
from fleetlib.errors import FleetError
from fleetlib.fstree.filter import Filter
from fleetlib.wire import subd_pb2

UINT64_MAX = (1 << 64) - 1
EXCLUSIONS = "scan_exclusions"


@dataclass(frozen=True)
class Setting:
    """One numeric setting: its Configuration field, range and meaning."""

    key: str
    low: int
    high: int
    meaning: str

    @property
    def range(self) -> str:
        """The accepted values, as an error message says them."""
        if self.high == UINT64_MAX:
            return f"a whole number of at least {self.low}"
        return f"a whole number from {self.low} to {self.high}"

    def check(self, value: int) -> int:
        """`value` if in range, else FleetError saying the range."""
        if not self.low <= value <= self.high:
            raise FleetError(f"{self.key} must be {self.range}, not {value}")
        return value


PERCENT_NOTE = "100: no limit"
SETTINGS = {s.key: s for s in (
    Setting("scan_speed_percent", 1, 100,
            f"scan reads, % of the device's measured read bandwidth ({PERCENT_NOTE})"),
    Setting("cpu_percent", 1, 100, f"CPU a scan may use while it runs, % of one core "
                                   f"({PERCENT_NOTE})"),
    Setting("network_speed_percent", 1, 100,
            f"fetch bandwidth, % of the network interface's speed ({PERCENT_NOTE})"),
    Setting("verify_period_seconds", 1, UINT64_MAX,
            "every file is re-hashed at least this often"),
)}
KNOWN_KEYS = (*SETTINGS, EXCLUSIONS)
EXCLUSIONS_MEANING = "path regexes subd does not scan (each --set adds one; replaces the list)"


MAX_BOOST_SECONDS = 7 * 86400


def check_configuration(config: subd_pb2.Configuration) -> None:
    """FleetError for a value out of range, a bad exclusion regex or a boost of more
    than MAX_BOOST_SECONDS (0 or an empty list: unchanged, so always fine)."""
    for key, setting in SETTINGS.items():
        value = getattr(config, key)
        if value:
            setting.check(value)
    if config.scan_exclusions:
        Filter.from_lines(list(config.scan_exclusions), EXCLUSIONS)
    if config.for_seconds > MAX_BOOST_SECONDS:
        raise FleetError(f"a boost lasts at most {MAX_BOOST_SECONDS // 86400} days, not "
                         f"{config.for_seconds} s")


def requested(config: subd_pb2.Configuration) -> dict[str, Any]:
    """The settings a SetConfiguration request changes, by key, with their new values."""
    values: dict[str, Any] = {key: getattr(config, key) for key in SETTINGS
                              if getattr(config, key)}
    if config.scan_exclusions:
        values[EXCLUSIONS] = list(config.scan_exclusions)
    return values


def parse_assignments(assignments: list[str] | tuple[str, ...]) -> subd_pb2.Configuration:
    """KEY=VALUE texts as the changes they ask for; FleetError for an unknown key
    (listing the known ones), a value that is not a number or is out of range."""
    changes = subd_pb2.Configuration()
    for text in assignments:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep:
            raise FleetError(f"{text!r}: give KEY=VALUE (keys: {', '.join(KNOWN_KEYS)})")
        if key == EXCLUSIONS:
            if not value:
                raise FleetError(f"{EXCLUSIONS}= needs a regex (the list cannot be emptied)")
            changes.scan_exclusions.append(value)
            continue
        setting = SETTINGS.get(key)
        if setting is None:
            raise FleetError(f"unknown setting {key!r}: known settings are "
                             f"{', '.join(KNOWN_KEYS)}")
        try:
            number = int(value.strip())
        except ValueError:
            raise FleetError(f"{key} must be {setting.range}, not {value!r}") from None
        setattr(changes, key, setting.check(number))
    check_configuration(changes)
    return changes


def configuration_json(config: subd_pb2.Configuration) -> dict[str, Any]:
    """A configuration as plain data (snake_case keys, the Configuration fields)."""
    data: dict[str, Any] = {key: getattr(config, key) for key in SETTINGS}
    data[EXCLUSIONS] = list(config.scan_exclusions)
    data["restore_unix"] = config.restore_unix
    data["restore_keys"] = list(config.restore_keys)
    return data


def describe(config: subd_pb2.Configuration) -> list[str]:
    """A configuration as lines people read: `key  value  (meaning)`."""
    width = max(len(key) for key in KNOWN_KEYS)
    lines = []
    for key, setting in SETTINGS.items():
        value = getattr(config, key)
        shown = "0 (no limit)" if value == 0 and key.endswith("_percent") else str(value)
        lines.append(f"{key:<{width}}  {shown:<12}  {setting.meaning}")
    lines.append(f"{EXCLUSIONS:<{width}}  {len(config.scan_exclusions):<12}  "
                 f"{EXCLUSIONS_MEANING}")
    lines += [f"  {regex}" for regex in config.scan_exclusions]
    if config.restore_unix:
        when = time.strftime("%H:%M:%S", time.localtime(config.restore_unix))
        lines.append(f"boost: {', '.join(config.restore_keys)} back to the values before "
                     f"it at {when} ({ago(config.restore_unix)})")
    return lines
