"""Images: an immutable named tree plus its filter, triggers and computed files."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetlib.errors import FleetError
from fleetlib.fstree.filter import Filter
from fleetlib.fstree.tree import Tree, check_clean_path
from fleetlib.fstree.triggers import Trigger
from fleetlib.jsoninput import load_json


@dataclass(frozen=True)
class ComputedFile:
    """A path whose content the dominator renders per host from `source`."""

    path: str
    source: str


@dataclass(frozen=True)
class ImageSignature:
    """Who signed an image: an Ed25519 signature of its manifest digest
    (fleetlib/signing.py) and the raw public key that made it."""

    key_name: str
    public_key: bytes
    signature: bytes


@dataclass
class Image:
    """An image as stored by the image server. `filter` None means sparse."""

    name: str
    tree: Tree
    filter: Filter | None
    triggers: list[Trigger] = field(default_factory=list)
    computed_files: list[ComputedFile] = field(default_factory=list)
    created_unix: int = 0
    expires_unix: int = 0
    signature: ImageSignature | None = None


def parse_computed_files(text: str, origin: str = "computed files") -> list[ComputedFile]:
    """Dominator's computed-files JSON: `[{"Filename": "/etc/x", "Source": "gen"}]`."""
    data = load_json(text, origin)
    if not isinstance(data, list):
        raise FleetError(f"{origin}: expected a JSON array")
    result = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or set(item) - {"Filename", "Source"} \
                or not isinstance(item.get("Filename"), str) \
                or not isinstance(item.get("Source", ""), str):
            raise FleetError(f"{origin}: entry {index} must be "
                             '{"Filename": "/absolute/path", "Source": "generator"}')
        try:
            path = check_clean_path(item["Filename"])
        except FleetError as err:
            raise FleetError(f"{origin}: entry {index}: {err}") from None
        result.append(ComputedFile(path, item.get("Source", "")))
    return result
