"""JSON text from users (filter-adjacent files, MDB lists) to Python values, with
every decoder failure as one FleetError."""

from __future__ import annotations

import json
from typing import Any

from fleetlib.errors import FleetError


def load_json(text: str, origin: str) -> Any:
    """Decode `text`; FleetError naming `origin` when it is malformed, nested too deeply
    for the decoder (RecursionError) or holds a number too long to convert (ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise FleetError(f"{origin}: malformed JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, or "Exceeds the limit (4300 digits) ..."
        raise FleetError(f"{origin}: malformed JSON: {err}") from None
