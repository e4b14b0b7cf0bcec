"""What the deploy engine needs from the rest of the dominator, as small protocols:
the herd (its subs, and a dry run's planning), the state store, the MDB and the
image server. The real Herd, DominatorState, Mdb and ImageCache fit them, and so do
a test's fakes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import sqlalchemy as sa

from dominator.herd.convergence import PlanSummary
from dominator.herd.herd import Sub
from dominator.herd.records import Disabled, HostRecord
from mdb.machine import Machine
from subd.changes import UpdatePlan


class HerdPort(Protocol):
    """The herd: the subs it runs, what converging one would change, and the
    once-only permission for a host's next update to run HighImpact triggers."""

    @property
    def subs(self) -> Mapping[str, Sub]: ...

    async def plan_for(self, hostname: str, image_name: str
                       ) -> tuple[UpdatePlan, PlanSummary, str]: ...

    def allow_disruption(self, hostname: str) -> None: ...

    def host_held(self, machine: Machine) -> str: ...


class StatePort(Protocol):
    """The dominator's state store: the fleet-wide switch, host records, and the
    database the dominators share (where the deploys are kept)."""

    @property
    def database(self) -> sa.Engine: ...

    def updates_disabled(self) -> Disabled | None: ...

    def host(self, hostname: str) -> HostRecord: ...

    def consume_disruption(self, hostname: str) -> None: ...


class MdbPort(Protocol):
    """The machine database."""

    def get(self, hostname: str) -> Machine | None: ...

    def list(self) -> list[Machine]: ...

    def update(self, hostname: str, /, **fields: Any) -> Machine: ...


class ImagesPort(Protocol):
    """The image server: whether it holds an image (None: it does not)."""

    async def get(self, name: str) -> object | None: ...
