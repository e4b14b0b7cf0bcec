"""Image names: `/`-separated components (streams). Apart from image.py so that a
client checking a name (`dominator image check NAME`) loads no tree library."""

from __future__ import annotations

import re

from fleetlib.errors import FleetError

NAME_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=,:-]*")
MAX_NAME_LENGTH = 255


def check_image_name(name: str) -> str:
    """Validate an image name: `/`-separated components (streams), no `..`, no
    leading or trailing `/`, each component starting with a letter or digit."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise FleetError(f"invalid image name {name!r}: must be 1 to {MAX_NAME_LENGTH} characters")
    for component in name.split("/"):
        if not NAME_COMPONENT_RE.fullmatch(component):
            raise FleetError(
                f"invalid image name {name!r}: components are letters, digits and ._+@=,:- "
                "and start with a letter or digit")
    return name
