"""What the dominator remembers, as plain values: who switched updates off (the
fleet-wide switch or one host's pause) and a host's record. Apart from the state
store (state.py) so that clients and views use them without loading SQLAlchemy."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Disabled:
    """Who switched updates off (fleet-wide, or for one host), why, when, and until when
    (0: until switched on again)."""

    by: str
    reason: str
    unix: int
    until_unix: int = 0

    def expired(self, now: float | None = None) -> bool:
        """Whether the switch has run out on its own."""
        return bool(self.until_unix) and (time.time() if now is None else now) >= self.until_unix


@dataclass(frozen=True)
class HostRecord:
    """What the dominator remembers of a host across restarts."""

    safety_cleared: bool = False
    intrusion_paths: tuple[str, ...] = ()
    intrusion_unix: int = 0
    last_sync_unix: int = 0
    current_image: str = ""
    disruption_allowed: bool = False
    paused: Disabled | None = None
