"""The one exception type every component raises for bad input or refused work."""


class FleetError(Exception):
    """A failure with a one-line, operator-readable message (no traceback needed)."""


class NotFoundError(FleetError):
    """The named thing (image, object, host) does not exist."""


class ExistsError(FleetError):
    """The thing to create exists already (images are immutable)."""


class PreconditionError(FleetError):
    """The request is well-formed but the state does not allow it now."""


class NoSpaceError(FleetError):
    """The filesystem lacks the room the work needs (gRPC: RESOURCE_EXHAUSTED)."""


class UnavailableError(FleetError):
    """A server could not be reached or did not answer in time: worth retrying."""
