"""Fencing (docs/DESIGN.md "Scale-out"): the highest lease token subd has accepted.

Several dominators share one fleet by leasing its shards; each lease grant carries a
fencing token from the shared database's sequence, strictly increasing across grants.
Every mutating call (Fetch, Update, Cleanup, SetConfiguration) from a lease holder
carries its owner's name and token (`fleet.Fence`). subd remembers the highest token it
accepted, on disk (ROOT/.subd/fence.json, replaced atomically), and refuses a call whose
token is lower: the host's shard has a newer owner, and a former one (paused, cut off,
its lease lapsed) must not touch the host. The same token is the same lease: accepted.

- A new highest is written to disk before the call is acted on; when that write fails,
  the call is refused (UNAVAILABLE), so what subd acts on is always on disk first.
- A call without a fence (an operator's `dominator sub push-image`, a dominator older
  than fencing: no lease) is accepted; once a token was seen it is logged. With
  `subd --require-fence` it is refused (FAILED_PRECONDITION, one line starting
  `unfenced: `, not `fenced: `: it says nothing of who holds the host's shard, so a
  dominator must not take it for a newer owner's).
- A corrupt or unreadable file at start: it is kept aside (fence.json.corrupt-UNIXTIME),
  an error is logged and reported in the status (`fence_error`), and the highest is
  unknown until the next fenced call sets it. Refusing every fenced call instead would
  wedge the host until an operator came; accepting the next token loses nothing the
  lease manager relies on, since a dominator also stops mutating on its own before its
  lease can expire: fencing is the second line.
- To reset the fence by hand (e.g. after a bogus huge token), stop subd, remove the
  file and start it.

Check and persist run synchronously on subd's one event loop (grpc.aio), with no await
between them and the start of the mutation, so two racing calls are serialized: once a
token is accepted no lower one can be.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fleetlib.errors import FleetError, PreconditionError, UnavailableError
from fleetlib.fstree.listing import quote
from fleetlib.fstree.objectstore import write_file_atomically
from fleetlib.wire import subd_pb2

log = logging.getLogger(__name__)

FENCE_FILE = "fence.json"
MAX_OWNER = 256  # characters of a dominator's name
MAX_TOKEN = (1 << 64) - 1


@dataclass(frozen=True)
class FenceToken:
    """A dominator's claim on one host: its name and its lease's fencing token."""

    owner: str
    token: int

    def to_proto(self) -> subd_pb2.Fence:
        """The wire form."""
        return subd_pb2.Fence(owner=self.owner, token=self.token)

    def __str__(self) -> str:
        return f"{self.token} from {quote(self.owner)}"


def fence_of(request: subd_pb2.FetchRequest | subd_pb2.UpdateRequest
             | subd_pb2.CleanupRequest | subd_pb2.Configuration) -> FenceToken | None:
    """The caller's fence on a mutating request (None: unfenced); FleetError
    (INVALID_ARGUMENT) for a fence without an owner or a token."""
    if not request.HasField("fence"):
        return None
    owner, token = request.fence.owner, request.fence.token
    if not owner:
        raise FleetError("fence without an owner")
    if len(owner) > MAX_OWNER:
        raise FleetError(f"fence owner longer than {MAX_OWNER} characters")
    if token == 0:
        raise FleetError(f"fence from {quote(owner)} without a token (tokens start at 1)")
    return FenceToken(owner, token)


def _parse(data: bytes) -> FenceToken:
    """The fence file's content; ValueError when malformed."""
    value = json.loads(data)
    if not isinstance(value, dict) or set(value) != {"owner", "token"}:
        raise ValueError("not an object of owner and token")
    owner, token = value["owner"], value["token"]
    if not isinstance(owner, str) or not owner:
        raise ValueError("owner is not a name")
    if not isinstance(token, int) or isinstance(token, bool) or not 0 < token <= MAX_TOKEN:
        raise ValueError("token is not a positive 64-bit integer")
    return FenceToken(owner, token)


class Fences:
    """The highest fencing token subd accepted, remembered in `path`."""

    def __init__(self, path: Path, require: bool = False) -> None:
        self.path = Path(path)
        self.require = require  # refuse every unfenced mutating call (--require-fence)
        self.highest: FenceToken | None = None
        self.error = ""  # why the remembered token was lost, until a new one is set
        self.refused = 0  # fenced calls refused since start
        self.unfenced_refused = 0  # unfenced calls refused since start (require)
        self._load()

    @classmethod
    def in_dir(cls, state_dir: Path, require: bool = False) -> Fences:
        """The fences of the subd whose state lives in `state_dir` (ROOT/.subd);
        `require`: unfenced mutating calls are refused."""
        return cls(Path(state_dir) / FENCE_FILE, require)

    def _load(self) -> None:
        try:
            self.highest = _parse(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeError included
            self._lose(err.strerror if isinstance(err, OSError) and err.strerror else err)
            return
        log.info("highest fencing token so far: %s", self.highest)

    def _lose(self, reason: object) -> None:
        """The file cannot be trusted: keep it aside and start with no highest."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        try:
            os.rename(self.path, aside)
            kept = f"kept as {aside.name}"
        except OSError as err:
            kept = f"could not be moved aside: {err.strerror or err}"
        self.error = (f"fence file {self.path} unreadable ({reason}; {kept}): the next "
                      f"fenced call sets the highest token")
        log.error("%s", self.error)

    def check(self, fence: FenceToken | None, what: str) -> None:
        """Refuse (PreconditionError: FAILED_PRECONDITION) a call whose fence is older
        than the highest accepted, or an unfenced one when fences are required;
        nothing is recorded."""
        highest = self.highest
        if fence is None and self.require:
            self.unfenced_refused += 1
            message = (f"unfenced: {what} without a fence refused (subd runs with "
                       "--require-fence: only a dominator holding this host's lease may "
                       "change it)")
            log.warning("%s", message)
            raise PreconditionError(message)
        if fence is None or highest is None or fence.token > highest.token:
            return
        if fence.token == highest.token and fence.owner == highest.owner:
            return
        self.refused += 1
        if fence.token == highest.token:
            message = (f"fenced: token {fence} is held by {quote(highest.owner)} "
                       f"(two owners claim one lease)")
        else:
            message = (f"fenced: token {fence} is older than {highest} "
                       f"(a newer owner holds this host's shard)")
        log.warning("%s refused: %s", what, message)
        raise PreconditionError(message)

    def admit(self, fence: FenceToken | None, what: str) -> None:
        """Check the call's fence and, when its token is a new highest, write it to disk
        before returning: the caller acts on the call right after, with no await in
        between. UnavailableError when the token cannot be recorded."""
        self.check(fence, what)
        highest = self.highest
        if fence is None:
            if highest is not None:
                log.info("unfenced %s accepted (an operator's call: no lease; highest "
                         "token %s)", what, highest)
            return
        if highest is not None and fence.token == highest.token:
            return
        data = json.dumps({"owner": fence.owner, "token": fence.token}).encode()
        try:
            write_file_atomically(self.path, data, mode=0o600)
        except OSError as err:
            raise UnavailableError(f"cannot record fencing token {fence}: "
                                   f"{err.strerror or err}") from None
        log.info("fencing token %s accepted for %s (before: %s)", fence, what,
                 highest if highest is not None else "none")
        self.highest, self.error = fence, ""

    def to_proto(self) -> subd_pb2.Fence | None:
        """The highest token for the status (None: none accepted yet)."""
        return self.highest.to_proto() if self.highest is not None else None
