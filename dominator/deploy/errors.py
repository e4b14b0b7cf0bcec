"""Why the deploy stage refuses a request, by kind. The kinds say nothing of HTTP:
the HTTP layer (dominator/server/http/deploys.py) maps each to its status code."""

from __future__ import annotations

from fleetlib.errors import FleetError


class DeployError(FleetError):
    """A refused request: it is wrong as it is (final)."""


class UnknownDeploy(DeployError):
    """No deploy of that id."""


class Conflict(DeployError):
    """It conflicts with another deploy or idempotency key (final)."""


class Busy(DeployError):
    """Too many deploys running: try later."""


class Unavailable(DeployError):
    """The dominator cannot take the request now (still loading, image server
    down, updates disabled): try later."""
