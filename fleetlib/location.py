"""Where a host or an image server stands: REGION/DC[/RACK] (the MDB's `Location`)."""

from __future__ import annotations

import re

from fleetlib.errors import FleetError

COMPONENT_RE = re.compile(r"[A-Za-z0-9_.-]+")
MAX_LOCATION_LENGTH = 253


def check_location(location: str) -> str:
    """REGION/DC or REGION/DC/RACK, each component letters, digits, `-`, `_` and `.`
    (not `.` or `..` alone), e.g. `us-east/dc1/rack4`; FleetError otherwise."""
    parts = location.split("/")
    if (len(location) > MAX_LOCATION_LENGTH or not 2 <= len(parts) <= 3
            or not all(COMPONENT_RE.fullmatch(part) and part.strip(".") for part in parts)):
        raise FleetError(f"invalid location {location!r}: use REGION/DC or REGION/DC/RACK, "
                         f"each of letters, digits, '-', '_' and '.' (e.g. us-east/dc1/rack4)")
    return location
