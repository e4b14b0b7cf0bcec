"""What subd remembers across restarts (docs/DESIGN.md step 5): the last update's
result, the last image it converged to, and the service starts an update owes.

Stored as JSON at ROOT/.subd/state.json, replaced atomically. `pending_starts`
is written before an update stops anything and cleared once its starts ran, so
a subd killed in between runs them when it comes back (`resume_pending`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetlib.fstree.objectstore import write_file_atomically
from subd.trigger_runner import Action, TriggerRunner

log = logging.getLogger(__name__)

STATE_FILE = Path(".subd") / "state.json"
_OUTCOME_TYPES = {"image_name": str, "success": bool, "error": str, "finished_unix": int,
                  "change_window_ns": int, "paths_changed": int, "triggers_run": list,
                  "warnings": list}


@dataclass
class UpdateOutcome:
    """The result of one update, as `fleet.UpdateResult` reports it."""

    image_name: str
    success: bool = False
    error: str = ""
    finished_unix: int = 0
    change_window_ns: int = 0
    paths_changed: int = 0
    triggers_run: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Any) -> UpdateOutcome:
        """Rebuild an outcome from its JSON form; ValueError when malformed."""
        if not isinstance(data, dict):
            raise ValueError("last_update is not an object")
        try:
            outcome = cls(**data)
        except TypeError as err:
            raise ValueError(f"last_update: {err}") from None
        for name, kind in _OUTCOME_TYPES.items():
            value = getattr(outcome, name)
            if kind is list:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"last_update.{name} is not a list of strings")
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"last_update.{name} is not a {kind.__name__}")
        return outcome


class SubdState:
    """subd's persistent state; a missing or corrupt file loads as empty."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.last_update: UpdateOutcome | None = None
        self.last_successful_image = ""
        self.pending_starts: list[Action] = []
        self._load()

    @classmethod
    def at_root(cls, root: Path) -> SubdState:
        """The state of the subd managing `root` (ROOT/.subd/state.json)."""
        return cls(Path(root) / STATE_FILE)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            last = data.get("last_update")
            last_update = None if last is None else UpdateOutcome.from_json(last)
            image = data.get("last_successful_image", "")
            if not isinstance(image, str):
                raise ValueError("last_successful_image is not a string")
            pending = data.get("pending_starts", [])
            if not isinstance(pending, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
                    for p in pending):
                raise ValueError("pending_starts is not a list of [action, service]")
        except FileNotFoundError:
            log.info("no subd state at %s yet: starting empty", self.path)
            return
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeError included
            log.warning("ignoring unreadable subd state %s: %s", self.path, err)
            return
        self.last_update = last_update
        self.last_successful_image = image
        self.pending_starts = [(action, service) for action, service in pending]

    def save(self) -> None:
        """Write the state durably (atomic replace)."""
        data = {"last_update": None if self.last_update is None else asdict(self.last_update),
                "last_successful_image": self.last_successful_image,
                "pending_starts": [list(p) for p in self.pending_starts]}
        write_file_atomically(self.path, json.dumps(data, indent=1).encode(), mode=0o600)

    def record(self, outcome: UpdateOutcome) -> None:
        """Remember an update's outcome (and its image, when it succeeded), durably."""
        self.last_update = outcome
        if outcome.success:
            self.last_successful_image = outcome.image_name
        self.save()

    def resume_pending(self, runner: TriggerRunner) -> list[str]:
        """Run the starts an interrupted update owes, then forget them; returns the
        actions run. Failures are logged and added to the last update's warnings."""
        if not self.pending_starts:
            return []
        log.info("running %d service action(s) an interrupted update left pending",
                 len(self.pending_starts))
        ran, failures = runner.run_all(self.pending_starts)
        if self.last_update is not None:
            self.last_update.triggers_run += ran
            self.last_update.warnings += failures
        self.pending_starts = []
        self.save()
        return ran
