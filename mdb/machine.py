"""One machine's MDB entry, and Dominator's JSON format for a list of them."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetlib.errors import FleetError
from fleetlib.fstree.imagename import check_image_name
from fleetlib.jsoninput import load_json
from fleetlib.location import check_location

HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOSTNAME_LENGTH = 253
BRACKETED_ADDRESS_RE = re.compile(r"\[(?P<host>[^\]]+)\](?::(?P<port>[0-9]{1,5}))?")


class Tags(Mapping[str, str]):
    """An immutable, hashable str -> str mapping, so that a Machine can be frozen
    and used in sets; compares equal to any mapping with the same items."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Tags({self._items!r})"


# (attribute, Dominator's JSON key, Python type) for every Machine field, in order.
FIELDS: tuple[tuple[str, str, type], ...] = (
    ("hostname", "Hostname", str),
    ("address", "IpAddress", str),
    ("required_image", "RequiredImage", str),
    ("planned_image", "PlannedImage", str),
    ("disable_updates", "DisableUpdates", bool),
    ("owner_group", "OwnerGroup", str),
    ("tags", "Tags", Mapping),
    ("location", "Location", str),
)
JSON_KEYS = frozenset(key for _, key, _ in FIELDS)
IMAGE_FIELDS = (("RequiredImage", "required_image"), ("PlannedImage", "planned_image"))
PAUSE_KEY = "pause"  # what `mdb get` / `mdb list --json` add beside an MDB record
TYPE_NAMES: dict[type, str] = {str: "a string", bool: "true or false", Mapping: "an object"}


def describe_type(value: object) -> str:
    """How an error names the type of a JSON (or Python) value."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
             str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def check_hostname(name: str) -> str:
    """RFC 1123: dot-separated labels of letters, digits and inner hyphens, each at
    most 63 characters, at most 253 in all."""
    if not name or len(name) > MAX_HOSTNAME_LENGTH or not all(
            HOSTNAME_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise FleetError(f"invalid hostname {name!r}: dot-separated labels of letters, digits "
                         f"and inner hyphens, each 1 to 63 characters, at most "
                         f"{MAX_HOSTNAME_LENGTH} in all")
    return name


def check_address(address: str) -> str:
    """An IP address or hostname, optionally with a port: `10.0.0.1`, `::1`,
    `[::1]:6969`, `host.example:6969`."""
    host, port = address, None
    bracketed = BRACKETED_ADDRESS_RE.fullmatch(address)
    if bracketed:
        host, port = bracketed["host"], bracketed["port"]
    elif address.count(":") == 1:
        host, port = address.split(":")
    invalid = f"invalid address {address!r}"
    # ASCII digits only: str.isdigit() also takes "²" (int() refuses it) and "١".
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise FleetError(f"{invalid}: port {port!r} is not 1 to 65535")
    try:
        ipaddress.ip_address(host)
        return address
    except ValueError:
        pass
    if bracketed or ":" in host:
        raise FleetError(f"{invalid}: {host!r} is not an IPv6 address")
    try:
        check_hostname(host)
    except FleetError as err:
        raise FleetError(f"{invalid}: {err}") from None
    return address


@dataclass(frozen=True)
class Machine:
    """What the MDB says about one host: where it is, which image it must run now
    (`required_image`) and next (`planned_image`, fetched ahead of time), whether
    updates are held, who owns it, and free-form tags for deploy selectors.
    Validated on construction, so an invalid Machine cannot exist."""

    hostname: str
    address: str = ""
    required_image: str = ""
    planned_image: str = ""
    disable_updates: bool = False
    owner_group: str = ""
    tags: Mapping[str, str] = field(default_factory=Tags)
    location: str = ""

    def __post_init__(self) -> None:
        for attribute, key, kind in FIELDS:
            value = getattr(self, attribute)
            if not isinstance(value, kind):
                raise FleetError(f"{key}: expected {TYPE_NAMES[kind]}, got {describe_type(value)}")
        try:
            check_hostname(self.hostname)
        except FleetError as err:
            raise FleetError(f"Hostname: {err}") from None
        try:
            self._check_values()
        except FleetError as err:
            raise FleetError(f"machine {self.hostname!r}: {err}") from None
        object.__setattr__(self, "tags", Tags(self.tags))

    def _check_values(self) -> None:
        """Every field but the hostname; raises naming the JSON key."""
        checks = (("IpAddress", self.address, check_address),
                  ("RequiredImage", self.required_image, check_image_name),
                  ("PlannedImage", self.planned_image, check_image_name),
                  ("Location", self.location, check_location))
        for key, value, check in checks:
            if value:
                try:
                    check(value)
                except FleetError as err:
                    raise FleetError(f"{key}: {err}") from None
        for name, value in self.tags.items():
            if not isinstance(name, str) or not name:
                raise FleetError(f"Tags: names must be non-empty strings, got {name!r}")
            if not isinstance(value, str):
                raise FleetError(f"Tags: {name!r}: expected a string, got {describe_type(value)}")

    def to_json(self) -> dict[str, Any]:
        """Dominator's JSON object for this machine (every key, always)."""
        result = {key: getattr(self, attribute) for attribute, key, _ in FIELDS}
        result["Tags"] = dict(self.tags)
        return result

    @classmethod
    def from_json(cls, obj: object, where: str) -> Machine:
        """A machine from Dominator's JSON object; strict: unknown keys and wrong
        types are errors. `where` names the entry in the error message."""
        if not isinstance(obj, dict):
            raise FleetError(f'{where}: expected an object {{"Hostname": ...}}, '
                             f"got {describe_type(obj)}")
        unknown = sorted(set(obj) - JSON_KEYS)
        if unknown:
            hint = ("; the dominator's pause is not an MDB field (`mdb list --json` shows "
                    "it): import what `mdb export` writes") if unknown[0] == PAUSE_KEY else ""
            raise FleetError(f"{where}: unknown field {unknown[0]!r} "
                             f"(known: {', '.join(key for _, key, _ in FIELDS)}){hint}")
        if "Hostname" not in obj:
            raise FleetError(f"{where}: Hostname is missing")
        try:
            return cls(**{attribute: obj[key] for attribute, key, _ in FIELDS if key in obj})
        except FleetError as err:
            raise FleetError(f"{where}: {err}") from None


def parse_machines_json(text: str, origin: str) -> list[Machine]:
    """Dominator's MDB JSON: an array of machine objects with unique hostnames."""
    data = load_json(text, origin)
    if not isinstance(data, list):
        raise FleetError(f"{origin}: expected a JSON array of machines, got {describe_type(data)}")
    machines = [Machine.from_json(item, f"{origin}: entry {index}")
                for index, item in enumerate(data)]
    check_unique_hostnames(machines, origin)
    return machines


def check_unique_hostnames(machines: Sequence[Machine], origin: str) -> None:
    """Refuse a list that names one host twice (which entry would win?)."""
    first: dict[str, int] = {}
    for index, machine in enumerate(machines):
        seen = first.setdefault(machine.hostname, index)
        if seen != index:
            raise FleetError(f"{origin}: entry {index}: duplicate Hostname {machine.hostname!r} "
                             f"(first at entry {seen})")


def machines_json(machines: list[Machine]) -> str:
    """The JSON text `mdb export` writes: an indented array, one object per machine."""
    return json.dumps([machine.to_json() for machine in machines], indent=2) + "\n"
