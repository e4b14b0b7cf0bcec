"""Applying an update to ROOT exactly as docs/DESIGN.md's safety contract says.

`check` refuses an unsafe plan before anything changes: paths escaping ROOT
(`..`, symlinked parents, paths under what the update makes a non-directory),
filtered or unscanned paths, `/.subd`, deleting more than half the inodes,
objects missing from the cache, too little free space, HighImpact triggers
without permission. `apply` then works in this order: stage every new inode in
ROOT/.subd/tmp (copies, nodes, their metadata), stop services, make
directories, install inodes by rename, make hard links, delete, set metadata,
start services. A final path only ever changes by rename of a complete inode,
so a killed subd leaves no partial file; `recover` clears its temporary names.

Every path is resolved from ROOT one directory at a time through descriptors
opened with O_NOFOLLOW (openat-style): no symlink, whoever made it and when,
can take a change outside ROOT.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from fleetlib.errors import FleetError, PreconditionError
from fleetlib.fstree.diff import Change, DiffEntry
from fleetlib.fstree.filter import is_filtered
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.safeopen import Directories
from fleetlib.fstree.scan import Exclude
from fleetlib.fstree.tree import Inode, Kind, Tree, check_clean_path, split
from fleetlib.fstree.unpack import apply_metadata, make_node, stage_regular
from subd.changes import UpdatePlan
from subd.state import SubdState, UpdateOutcome
from subd.trigger_runner import Action, TriggerActions, TriggerRunner, plan_actions

log = logging.getLogger(__name__)

SUBD_PATH = "/.subd"
TMP_PREFIX = ".subd-tmp-"
INTERRUPTED = "interrupted: subd stopped before the update finished"
_INSTALLS = (Change.ADD, Change.REPLACE)
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # missing, or not a real directory


def _readable(message: str) -> str:
    """`message` as valid UTF-8 text for logs, the wire and state.json: bytes of
    file names that are not UTF-8 (surrogate escapes) are shown as \\xNN."""
    return os.fsencode(message).decode("utf-8", "backslashreplace")


def _refuse(message: str) -> PreconditionError:
    return PreconditionError(_readable(f"update refused: {message}"))


@contextlib.contextmanager
def _about(path: str) -> Iterator[None]:
    """Turn an OSError while handling `path` into a one-line FleetError naming it."""
    try:
        yield
    except OSError as err:
        raise FleetError(_readable(f"{path}: {err.strerror or err}")) from err


def _ancestors(path: str) -> Iterator[str]:
    """The proper ancestors of a path, below the root, outermost first."""
    index = path.find("/", 1)
    while index != -1:
        yield path[:index]
        index = path.find("/", index + 1)


def _is_dir(st: os.stat_result | None) -> TypeGuard[os.stat_result]:
    return st is not None and stat.S_ISDIR(st.st_mode)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _new(entry: DiffEntry) -> Inode:
    """The inode an ADD, REPLACE or METADATA entry leaves at its path."""
    assert entry.new is not None  # checked by _PlanCheck._check_syntax
    return entry.new


def _makes_dir(entry: DiffEntry) -> bool:
    """An ADD or REPLACE leaving a directory."""
    return entry.change in _INSTALLS and _new(entry).kind == Kind.DIRECTORY


def _makes_other(entry: DiffEntry) -> bool:
    """An ADD or REPLACE leaving a non-directory."""
    return entry.change in _INSTALLS and _new(entry).kind != Kind.DIRECTORY


@dataclass
class _Work:
    """A checked plan: the entries to carry out and the service actions around them."""

    entries: list[DiffEntry]
    actions: TriggerActions


class _PlanCheck:
    """Every refusal of the safety contract, decided before any change."""

    def __init__(self, updater: Updater, plan: UpdatePlan, tree: Tree,
                 excluded: Exclude | None, dirs: Directories) -> None:
        self.plan = plan
        self.tree = tree
        self.excluded = excluded
        self.dirs = dirs
        self.cache = updater.cache
        self.tmp_dir = updater.tmp_dir
        self.dev = os.stat(updater.tmp_dir).st_dev
        self.tree_paths = tree.paths()
        entries = plan.diff.entries
        for entry in entries:
            self._check_syntax(entry)
        self.new_dirs = {e.path for e in entries if _makes_dir(e)}
        self.new_others = {e.path for e in entries if _makes_other(e)}
        self.deleted = {e.path for e in entries if e.change == Change.DELETE}

    def run(self) -> _Work:
        """The entries to apply (no-op ones dropped) and trigger actions, or a refusal."""
        entries = self.plan.diff.entries
        needed_parents = {a for e in entries if not self._unowned(e.path)
                          for a in _ancestors(e.path)}
        work: list[DiffEntry] = []
        made: set[str] = set()
        removals: list[str] = []
        for entry in entries:
            with _about(entry.path):
                st = self._on_disk(entry)
            why = self._unowned(entry.path)
            if why:
                bare_parent = entry.change == Change.ADD and _makes_dir(entry) and (
                    _is_dir(st) or (st is None and entry.path in needed_parents))
                if not bare_parent:
                    raise _refuse(f"{entry.path} is {why}: the update may not touch it")
                if st is not None:
                    continue  # a parent the host already has: nothing to do
            self._check_state(entry, st)
            if entry.link_to is not None and entry.link_to not in made:
                raise _refuse(f"{entry.path}: link target {entry.link_to} is not a file "
                              "this update makes before it")
            if _is_dir(st) and (entry.change == Change.DELETE or _makes_other(entry)):
                removals.append(entry.path)
            if _makes_other(entry):
                made.add(entry.path)
            work.append(entry)
        self._check_removals(removals)
        self._check_deletion_count(work)
        self._check_objects_and_space(work)
        actions = plan_actions(self.plan.old_triggers, self.plan.triggers,
                               [e.path for e in work])
        if actions.high_impact and not self.plan.disruption_permitted:
            raise _refuse(f"HighImpact trigger(s) {', '.join(actions.high_impact)} would fire "
                          "and disruption is not permitted")
        return _Work(work, actions)

    def _check_syntax(self, entry: DiffEntry) -> None:
        """Clean absolute paths outside /.subd; an inode wherever one is needed."""
        for path in (entry.path, entry.link_to):
            if path is None:
                continue
            try:
                check_clean_path(path)
            except FleetError as err:
                raise _refuse(str(err)) from None
            if path == SUBD_PATH or path.startswith(SUBD_PATH + "/"):
                raise _refuse(f"{path} is subd's own state")
        if entry.change != Change.DELETE and entry.new is None:
            raise _refuse(f"{entry.path}: {entry.change.name.lower()} without an inode")
        if entry.path == "/" and (entry.change not in (Change.ADD, Change.METADATA)
                                  or _new(entry).kind != Kind.DIRECTORY):
            raise _refuse("the root directory can only have its metadata changed")

    def _unowned(self, path: str) -> str:
        """Why the image does not own `path` ("" when it does)."""
        if path == "/":
            return ""
        if is_filtered(self.plan.filter, path):
            return "filtered (the image does not own it)"
        if self.excluded is not None and self.excluded(path):
            return "not scanned by this sub"
        return ""

    def _on_disk(self, entry: DiffEntry) -> os.stat_result | None:
        """What is at the entry's path now (None: nothing, or its parent is yet to be
        made). Refuses a parent that is not a real directory on ROOT's filesystem,
        or that this update deletes or turns into a non-directory."""
        if entry.change != Change.DELETE:
            for ancestor in _ancestors(entry.path):
                if ancestor in self.deleted or ancestor in self.new_others:
                    raise _refuse(f"{entry.path} lies under {ancestor}, which this update "
                                  f"{'deletes' if ancestor in self.deleted else 'replaces'}")
        parent = split(entry.path)[0]
        try:
            fd, name = self.dirs.parent(entry.path)
        except OSError as err:
            if err.errno in _GONE and parent in self.new_dirs:
                return None  # this update makes the parent
            if err.errno in _GONE:
                raise _refuse(f"{entry.path}: {self._describe(parent)}") from None
            raise
        if os.fstat(fd).st_dev != self.dev:
            raise _refuse(f"{entry.path} is on another filesystem than ROOT (a mount point)")
        st = _lstat(fd, name)
        if st is not None and st.st_dev != self.dev and entry.change in (
                Change.DELETE, Change.REPLACE):
            raise _refuse(f"{entry.path} is a mount point")
        return st

    def _describe(self, parent: str) -> str:
        """Why the directory `parent` cannot be used (for the refusal message)."""
        fd = self.dirs.fd("/")
        for path in [*_ancestors(parent), parent]:
            st = _lstat(fd, split(path)[1])
            if st is None:
                return f"parent {path} does not exist"
            if stat.S_ISLNK(st.st_mode):
                return f"parent {path} is a symlink"
            if not stat.S_ISDIR(st.st_mode):
                return f"parent {path} is not a directory"
            fd = self.dirs.fd(path)
        return f"parent {parent} cannot be opened"

    def _check_state(self, entry: DiffEntry, st: os.stat_result | None) -> None:
        """The sub's tree and disk must hold what the plan expects at the path."""
        ino = self.tree_paths.get(entry.path)
        if entry.change == Change.ADD:
            fits_tree = ino is None or (self.tree.inodes[ino].kind == Kind.DIRECTORY
                                        and _new(entry).kind == Kind.DIRECTORY)
            fits_disk = st is None or (_is_dir(st) and _new(entry).kind == Kind.DIRECTORY)
        else:
            fits_tree = ino is not None
            fits_disk = entry.change == Change.DELETE or st is not None and (
                entry.change == Change.REPLACE
                or stat.S_IFMT(st.st_mode) == _new(entry).kind.type_bits)
        if not (fits_tree and fits_disk):
            raise _refuse(f"{entry.path}: the sub does not hold what the plan expects "
                          f"for a {entry.change.name.lower()} (stale diff?)")

    def _check_removals(self, removals: list[str]) -> None:
        """A directory removed (deleted, or replaced by a non-directory) may hold only
        paths the update deletes: never filtered or unscanned ones, nor a mount."""
        walked: set[str] = set()
        for path in sorted(removals, key=lambda p: p.count("/")):
            if any(a in walked for a in _ancestors(path)):
                continue
            walked.add(path)
            fd, name = self.dirs.parent(path)
            with _about(path):
                for where, dirnames, filenames, where_fd in os.fwalk(name, dir_fd=fd):
                    if os.fstat(where_fd).st_dev != self.dev:
                        raise _refuse(f"removing {path} would cross a mount point")
                    base = path + where[len(name):]
                    for child in dirnames + filenames:
                        if f"{base}/{child}" not in self.deleted:
                            raise _refuse(f"removing {path} would remove {base}/{child}, which "
                                          "the update does not delete (filtered or unscanned)")

    def _check_deletion_count(self, work: list[DiffEntry]) -> None:
        """Deleting more than half the sub's inodes needs the operator's say-so."""
        links = Counter(self.tree_paths.values())
        gone = Counter(self.tree_paths[e.path] for e in work
                       if e.change == Change.DELETE and e.path in self.tree_paths)
        deleted = sum(1 for ino, count in gone.items() if count == links[ino])
        total = len(self.tree.inodes)
        if 2 * deleted > total and not self.plan.disable_safety_check:
            raise _refuse(f"it would delete {deleted} of the sub's {total} inodes (more than "
                          "half): unsafe unless the safety check is disabled")

    def _check_objects_and_space(self, work: list[DiffEntry]) -> None:
        """Every object is cached, and the filesystem holds every copy made of one
        (an object's last use is a rename, earlier ones copies) and every new inode."""
        uses = _object_uses(work)
        missing = [users[0].path for digest, users in uses.items()
                   if self.cache.size_of(digest) != _new(users[0]).size]
        if missing:
            raise _refuse(f"{len(missing)} object(s) missing from the cache (the first for "
                          f"{missing[0]}): fetch first")
        vfs = os.statvfs(self.tmp_dir)
        block = vfs.f_frsize or 4096
        new_inodes = sum(1 for e in work if e.change in _INSTALLS and e.link_to is None)
        need = block * len(self.new_dirs) + sum(
            (len(users) - 1) * -(-_new(users[0]).size // block) * block for users in uses.values())
        free = vfs.f_bavail * vfs.f_frsize
        if need > free:
            raise _refuse(f"not enough free space: the update writes {need} bytes, "
                          f"{free} are free")
        if vfs.f_files and new_inodes > vfs.f_favail:
            raise _refuse(f"not enough free inodes: the update makes {new_inodes}, "
                          f"{vfs.f_favail} are free")


def _staged(entries: list[DiffEntry]) -> Iterator[DiffEntry]:
    """The entries whose new inode is staged and renamed into place (not
    directories, not hard links)."""
    return (e for e in entries if _makes_other(e) and e.link_to is None)


def _object_uses(entries: list[DiffEntry]) -> dict[bytes, list[DiffEntry]]:
    """The staged entries each cached object serves, in order: the last one
    consumes the object, the others copy it."""
    uses: dict[bytes, list[DiffEntry]] = {}
    for entry in _staged(entries):
        if _new(entry).kind == Kind.REGULAR and _new(entry).size:
            uses.setdefault(_new(entry).hash, []).append(entry)
    return uses


class _Run:
    """One checked update being carried out; fills in its outcome."""

    def __init__(self, updater: Updater, dirs: Directories, outcome: UpdateOutcome) -> None:
        self.updater = updater
        self.dirs = dirs
        self.outcome = outcome
        self.skipped: set[str] = set()  # inodes that could not be made (devices, not root)
        self.first_ns = self.last_ns = 0

    def _changed(self) -> None:
        """Note a change at a final path (the change window spans them all)."""
        self.last_ns = time.monotonic_ns()
        self.first_ns = self.first_ns or self.last_ns

    def carry_out(self, work: _Work) -> None:
        """Stage, stop, change the tree in docs/DESIGN.md's order, start."""
        staged = self.stage(work.entries)
        state = self.updater.state
        state.pending_starts = list(dict.fromkeys(state.pending_starts + work.actions.after))
        self.outcome.error = INTERRUPTED
        state.record(self.outcome)
        try:
            self.trigger(work.actions.stops)
            self.make_directories(work.entries)
            self.install(work.entries, staged)
            self.link(work.entries)
            self.delete(work.entries)
            self.set_metadata(work.entries)
        finally:
            self.trigger(state.pending_starts)
            state.pending_starts = []
        self.outcome.error = ""

    def trigger(self, actions: list[Action]) -> None:
        """Run service actions, reporting (not raising) failures."""
        ran, failures = self.updater.runner.run_all(actions)
        self.outcome.triggers_run += ran
        self.warn(failures)

    def warn(self, messages: list[str]) -> None:
        """Report what could not be done (the update goes on)."""
        self.outcome.warnings += [_readable(m) for m in messages]

    def stage(self, entries: list[DiffEntry]) -> dict[str, str]:
        """Every new non-directory inode, complete with metadata, under a temporary
        name (or, for an object's last use, the object itself); by path."""
        tmp_dir = self.updater.tmp_dir
        cache = self.updater.cache
        last_uses = {users[-1].path for users in _object_uses(entries).values()}
        staged: dict[str, str] = {}
        for entry in _staged(entries):
            inode = _new(entry)
            with _about(entry.path):
                if inode.kind == Kind.REGULAR:
                    path = stage_regular(cache, inode, consume=entry.path in last_uses,
                                         tmp_dir=tmp_dir)
                else:
                    path = os.fspath(tmp_dir / (TMP_PREFIX + secrets.token_hex(8)))
                    try:
                        make_node(path, inode)
                    except PermissionError:
                        self.skipped.add(entry.path)
                        self.warn([f"{entry.path}: cannot make a "
                                   f"{inode.kind.name.lower()} (not root)"])
                        continue
                self.warn(apply_metadata(path, inode, shown=entry.path))
            staged[entry.path] = path
        return staged

    def make_directories(self, entries: list[DiffEntry]) -> None:
        """mkdir new directories (parents first); existing ones stay, updated in place."""
        for entry in entries:
            if not _makes_dir(entry):
                continue
            with _about(entry.path):
                fd, name = self.dirs.parent(entry.path)
                st = _lstat(fd, name)
                if _is_dir(st):
                    continue
                if st is not None and entry.change == Change.REPLACE:
                    self._remove(fd, name, entry.path, st)
                os.mkdir(name, 0o700, dir_fd=fd)
                self._changed()

    def install(self, entries: list[DiffEntry], staged: dict[str, str]) -> None:
        """Rename each staged inode to its final path (over the old one)."""
        for entry in _staged(entries):
            if entry.path in self.skipped:
                continue
            with _about(entry.path):
                fd, name = self.dirs.parent(entry.path)
                self._clear_directory(fd, name, entry)
                os.rename(staged[entry.path], name, dst_dir_fd=fd)
                self._changed()
                self.outcome.paths_changed += 1

    def link(self, entries: list[DiffEntry]) -> None:
        """Make each hard link under a temporary name, then rename it into place."""
        tmp_dir = self.updater.tmp_dir
        for entry in entries:
            if entry.change not in _INSTALLS or entry.link_to is None:
                continue
            if entry.link_to in self.skipped:
                self.skipped.add(entry.path)
                self.warn([f"{entry.path}: not linked, {entry.link_to} could not be made"])
                continue
            with _about(entry.path):
                source_fd, source = self.dirs.parent(entry.link_to)
                tmp = os.fspath(tmp_dir / (TMP_PREFIX + secrets.token_hex(8)))
                os.link(source, tmp, src_dir_fd=source_fd, follow_symlinks=False)
                fd, name = self.dirs.parent(entry.path)
                self._clear_directory(fd, name, entry)
                # Onto a link of the same inode, rename does nothing and leaves `tmp`:
                # the temporary folder is emptied after every update.
                os.rename(tmp, name, dst_dir_fd=fd)
                self._changed()
                self.outcome.paths_changed += 1

    def delete(self, entries: list[DiffEntry]) -> None:
        """Remove deleted paths, deepest first."""
        for entry in entries:
            if entry.change != Change.DELETE:
                continue
            with _about(entry.path):
                try:
                    fd, name = self.dirs.parent(entry.path)
                except OSError as err:
                    if err.errno in _GONE:
                        continue  # went with a directory replaced by a non-directory
                    raise
                st = _lstat(fd, name)
                if st is not None:
                    self._remove(fd, name, entry.path, st)
                    self.outcome.paths_changed += 1

    def set_metadata(self, entries: list[DiffEntry]) -> None:
        """Metadata changes, and directories' final metadata, children before parents
        (a directory's mode may forbid writing into it)."""
        for entry in reversed(entries):
            if entry.change != Change.METADATA and not _makes_dir(entry):
                continue
            with _about(entry.path):
                fd, name = self.dirs.parent(entry.path)
                self.warn(apply_metadata(name, _new(entry), dir_fd=fd, shown=entry.path))
                self._changed()
                self.outcome.paths_changed += 1

    def _clear_directory(self, fd: int, name: str, entry: DiffEntry) -> None:
        """Before a non-directory replaces a directory, remove the directory (the
        check made sure the update deletes everything in it)."""
        if entry.change == Change.REPLACE:
            st = _lstat(fd, name)
            if _is_dir(st):
                self._remove(fd, name, entry.path, st)

    def _remove(self, fd: int, name: str, path: str, st: os.stat_result) -> None:
        """Remove what `st` describes at `path` (a whole directory, or one name)."""
        if stat.S_ISDIR(st.st_mode):
            self.dirs.forget(path)
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
        self._changed()


class Updater:
    """Makes ROOT match an update plan, refusing unsafe ones (one update at a time)."""

    def __init__(self, root: Path, cache: ObjectStore, state: SubdState,
                 runner: TriggerRunner) -> None:
        self.root = Path(root)
        self.cache = cache
        self.state = state
        self.runner = runner
        self.tmp_dir = self.root / SUBD_PATH.lstrip("/") / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def recover(self) -> list[str]:
        """At start, after a possible kill: remove the temporary names an update
        left and run the service starts it owed; returns the actions run."""
        with self._lock:
            self._empty_tmp()
            return self.state.resume_pending(self.runner)

    def check(self, plan: UpdatePlan, tree: Tree, excluded: Exclude | None = None) -> None:
        """Refuse (FleetError) a plan that is unsafe for this sub, changing nothing.
        `tree` is the sub's current scan; `excluded` the paths it does not scan."""
        with self._lock, _about(os.fspath(self.root)), Directories(self.root) as dirs:
            _PlanCheck(self, plan, tree, excluded, dirs).run()

    def apply(self, plan: UpdatePlan, tree: Tree, excluded: Exclude | None = None
              ) -> UpdateOutcome:
        """Check, then carry out the plan. A refusal raises FleetError having
        changed nothing; a failure part way is reported in the outcome (success
        False). Either way the outcome is persisted."""
        with self._lock, Directories(self.root) as dirs:
            outcome = UpdateOutcome(plan.image_name)
            try:
                with _about(os.fspath(self.root)):
                    work = _PlanCheck(self, plan, tree, excluded, dirs).run()
            except FleetError as err:
                outcome.error = str(err)
                outcome.finished_unix = int(time.time())
                self.state.record(outcome)
                raise
            run = _Run(self, dirs, outcome)
            try:
                run.carry_out(work)
            except (FleetError, OSError) as err:
                outcome.error = _readable(str(err))
            finally:
                self._empty_tmp()
            outcome.success = not outcome.error
            outcome.finished_unix = int(time.time())
            outcome.change_window_ns = run.last_ns - run.first_ns
            self.state.record(outcome)
        if not outcome.success:
            log.warning("update to %s failed: %s", plan.image_name, outcome.error)
            return outcome
        log.info("updated to %s: %d path(s) in a %.1f ms window", plan.image_name,
                 outcome.paths_changed, outcome.change_window_ns / 1e6)
        return outcome

    def _empty_tmp(self) -> None:
        """Remove every temporary name (staged inodes, links) an update left."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        if removed:
            log.info("removed %d temporary name(s) from %s", removed, self.tmp_dir)
