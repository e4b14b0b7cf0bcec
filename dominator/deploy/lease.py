"""This dominator's side of the deploy runner leases (the rows' side is store.py).

Every lease/3 the engine renews the deploys it runs and claims running deploys with no
runner or an expired one, in one transaction (DeployStore.round). Whether it may still
mutate for a deploy (save it, set a host's required image, grant a disruption) is by
its own monotonic clock, as the shard leases do (dominator/herd/leases.py): until the
start of its last good round plus the lease minus a safety margin of a third, which
ends before the database lets another dominator claim the deploy. Past that the
deploy pauses: its task stops without writing, and resumes from its saved state once
a round renews it (or another dominator claims it once it expired). With SQLite one
dominator runs every deploy and the lease never lapses."""

from __future__ import annotations

import math
import time

from fleetlib.errors import FleetError


class LeaseLost(FleetError):
    """This dominator may not mutate for the deploy: another took it over (stop),
    or the lease cannot be renewed now (`paused`: resume once it is)."""

    def __init__(self, message: str, paused: bool = False) -> None:
        super().__init__(message)
        self.paused = paused


class RunnerLease:
    """The tokens of the deploys this dominator runs, and until when (monotonic) they
    are trusted. Read and changed on the event loop; `check` also from threads."""

    def __init__(self, lease_seconds: float, expires: bool) -> None:
        self.lease_seconds = lease_seconds
        self.renew_interval = lease_seconds / 3
        self.safety_margin = lease_seconds / 3
        self.expires = expires  # False on SQLite: always trusted (one dominator)
        self.tokens: dict[str, int] = {}  # deploy id -> fencing token
        self.deadline = -math.inf if expires else math.inf
        self.failure = ""  # why the last round failed ("" when it worked)

    def renewed(self, began: float) -> None:
        """A round that began at `began` (time.monotonic()) succeeded."""
        self.deadline = began + self.lease_seconds - self.safety_margin \
            if self.expires else math.inf

    def trusted(self) -> bool:
        """Whether mutating is allowed now."""
        return time.monotonic() < self.deadline

    def check(self, deploy_id: str) -> int:
        """The token to fence a write for the deploy with; LeaseLost when there is none
        or it is no longer trusted (paused)."""
        token = self.tokens.get(deploy_id)
        if token is None:
            raise LeaseLost(f"deploy {deploy_id}: this dominator no longer runs it")
        if not self.trusted():
            raise LeaseLost(f"deploy {deploy_id}: its lease was not renewed in time "
                            f"({self.failure or 'no lease round succeeded lately'}): paused",
                            paused=True)
        return token
