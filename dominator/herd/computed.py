"""Computed files: per-host content rendered from MDB data.

An image marks some paths as computed (`ComputedFile(path, source)`); `source`
names a generator in the dominator's generator directory. An executable
generator is a program that reads the host's MDB record (Dominator JSON) on
stdin and writes the file on stdout; any other generator is a jinja2 template
rendered in a sandbox with the record's fields as variables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import selectors
import signal
import stat
import subprocess
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.sandbox
import xxhash

from fleetlib.errors import FleetError
from fleetlib.fstree.image import Image

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 16 << 20
MAX_STDERR_BYTES = 64 << 10
MAX_REASON_CHARS = 300
READ_CHUNK = 64 << 10
PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class MachineRecord(Protocol):
    """What rendering needs of an MDB machine (mdb.machine.Machine has this shape)."""

    @property
    def hostname(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def required_image(self) -> str: ...
    @property
    def planned_image(self) -> str: ...
    @property
    def disable_updates(self) -> bool: ...
    @property
    def owner_group(self) -> str: ...
    @property
    def tags(self) -> Mapping[str, str]: ...

    def to_json(self) -> dict[str, Any]:
        """The record in Dominator's MDB JSON format."""
        ...


def _one_line(text: str) -> str:
    """The first non-blank line of `text`, stripped and bounded in length."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS] + "..."


class ComputedFileError(FleetError):
    """A computed file could not be rendered for one host."""

    def __init__(self, hostname: str, source: str, reason: str, path: str = "") -> None:
        self.hostname = hostname
        self.source = source
        self.reason = _one_line(reason) or "failed"
        self.path = path
        what = f"computed file {path} (generator {source!r})" if path else f"generator {source!r}"
        super().__init__(f"host {hostname}: {what}: {self.reason}")

    def for_path(self, path: str) -> ComputedFileError:
        """The same error, naming the computed path it was rendering."""
        return ComputedFileError(self.hostname, self.source, self.reason, path)


class _ConfinedLoader(jinja2.FileSystemLoader):
    """A FileSystemLoader that refuses templates (includes too) whose real path,
    symlinks resolved, lies outside its directory."""

    def __init__(self, base: Path) -> None:
        super().__init__(str(base), followlinks=False)
        self._base = base

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Any]:
        """Load `template` after checking where it really is."""
        real = os.path.realpath(self._base.joinpath(*jinja2.loaders.split_template_path(template)))
        if not Path(real).is_relative_to(self._base):
            raise jinja2.exceptions.SecurityError(
                f"template {template!r} resolves outside the generator directory")
        return super().get_source(environment, template)


class Renderer:
    """Renders generators from `generator_dir` for one host at a time; thread-safe."""

    def __init__(self, generator_dir: Path | None, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._base: Path | None = None
        self._env: jinja2.Environment | None = None
        if generator_dir is not None:
            base = Path(generator_dir).resolve()
            if not base.is_dir():
                raise FleetError(f"generator directory {generator_dir}: not a directory")
            self._base = base
            self._env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                loader=_ConfinedLoader(base),
                undefined=jinja2.StrictUndefined,
                keep_trailing_newline=True,
                autoescape=False,
                auto_reload=True,
            )

    def render(self, source: str, machine: MachineRecord) -> bytes:
        """The content generator `source` produces for `machine`."""
        path, mode = self._generator(source, machine.hostname)
        if mode & 0o111:
            return self._run_program(path, source, machine)
        return self._render_template(source, machine)

    def _generator(self, source: str, hostname: str) -> tuple[Path, int]:
        """The real path and mode of generator `source`, refusing anything that is not a
        regular file inside the generator directory."""
        if self._base is None:
            raise ComputedFileError(hostname, source, "no generator directory is configured")
        parts = source.split("/")
        if not source or source.startswith("/") or "\0" in source \
                or any(part in ("", ".", "..") for part in parts):
            raise ComputedFileError(
                hostname, source, "generator names are relative paths inside the generator "
                "directory, without '.', '..' or empty components")
        try:
            path = self._base.joinpath(*parts).resolve(strict=True)
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ComputedFileError(hostname, source, "no such generator") from None
        except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
            raise ComputedFileError(hostname, source, f"cannot open generator: {err}") from None
        if not path.is_relative_to(self._base):
            raise ComputedFileError(hostname, source,
                                    "generator resolves outside the generator directory")
        if not stat.S_ISREG(mode):
            raise ComputedFileError(hostname, source, "generator is not a regular file")
        return path, mode

    def _render_template(self, source: str, machine: MachineRecord) -> bytes:
        """Render template `source` with the machine's fields as variables."""
        assert self._env is not None and self._base is not None
        context = {
            "hostname": machine.hostname,
            "address": machine.address,
            "required_image": machine.required_image,
            "planned_image": machine.planned_image,
            "owner_group": machine.owner_group,
            "disable_updates": machine.disable_updates,
            "tags": machine.tags,
            "machine": machine.to_json(),
        }
        try:
            text = self._env.get_template(source).render(context)
            content = text.encode("utf-8")
        except Exception as err:  # template code is operator input: any failure is its own
            raise ComputedFileError(machine.hostname, source,
                                    self._template_reason(err, source)) from err
        if len(content) > MAX_OUTPUT_BYTES:
            raise ComputedFileError(machine.hostname, source,
                                    f"template output exceeds {MAX_OUTPUT_BYTES >> 20} MiB")
        return content

    def _template_reason(self, err: Exception, source: str) -> str:
        """`template NAME line N: message` for an error raised while rendering."""
        if isinstance(err, jinja2.TemplateSyntaxError):
            name, line = err.name or source, err.lineno
            message = err.message or "syntax error"
        else:
            name, line = source, 0
            prefix = str(self._base) + os.sep
            for frame in reversed(traceback.extract_tb(err.__traceback__)):
                if frame.filename.startswith(prefix):
                    name, line = frame.filename[len(prefix):], frame.lineno or 0
                    break
            if isinstance(err, jinja2.TemplateNotFound):
                message = f"template {err.name!r} not found"
            elif isinstance(err, jinja2.TemplateError):
                message = str(err)
            else:
                message = f"{type(err).__name__}: {err}"
        where = f"template {name} line {line}" if line else f"template {name}"
        return f"{where}: {_one_line(message)}"

    def _run_program(self, path: Path, source: str, machine: MachineRecord) -> bytes:
        """Run program `path` with the machine's JSON on stdin; its stdout is the content."""
        hostname = machine.hostname
        assert self._base is not None
        data = (json.dumps(machine.to_json()) + "\n").encode("utf-8")
        try:
            proc = subprocess.Popen(
                [str(path)], cwd=self._base, env=dict(PROGRAM_ENV), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as err:
            raise ComputedFileError(hostname, source, f"cannot run generator: {err}") from None
        deadline = time.monotonic() + self.timeout
        try:
            stdout, stderr, failure = self._exchange(proc, data, deadline)
            if failure is None:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    failure = f"timed out after {self.timeout:g}s"
        finally:
            if proc.returncode is None:  # not reaped yet, so its group id is still ours
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        err_line = _one_line(stderr.decode("utf-8", "replace"))
        if failure is None and proc.returncode != 0:
            code = proc.returncode
            failure = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if failure is not None:
            reason = f"program {failure}" + (f": {err_line}" if err_line else "")
            raise ComputedFileError(hostname, source, reason)
        if err_line:
            log.debug("generator %s for %s wrote to stderr: %s", source, hostname, err_line)
        return stdout

    def _exchange(
        self, proc: subprocess.Popen[bytes], data: bytes, deadline: float
    ) -> tuple[bytes, bytes, str | None]:
        """Feed `data` to the program and collect stdout and stderr until both close,
        the deadline passes or stdout grows too large: (stdout, stderr, failure)."""
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()
        pending = memoryview(data)
        with selectors.DefaultSelector() as sel:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                os.set_blocking(pipe.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    return bytes(out), bytes(err), f"timed out after {self.timeout:g}s"
                for key, _ in sel.select(left):
                    if key.fileobj is proc.stdin:
                        try:
                            pending = pending[os.write(key.fd, pending[:READ_CHUNK]):]
                        except BrokenPipeError:  # the program does not read its input
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(proc.stdin)
                            proc.stdin.close()
                        continue
                    chunk = os.read(key.fd, READ_CHUNK)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    if key.fileobj is proc.stderr:
                        err += chunk[:max(0, MAX_STDERR_BYTES - len(err))]
                        continue
                    out += chunk
                    if len(out) > MAX_OUTPUT_BYTES:
                        return b"", bytes(err), f"output exceeds {MAX_OUTPUT_BYTES >> 20} MiB"
        return bytes(out), bytes(err), None


def render_image_files(
    image: Image, machine: MachineRecord, renderer: Renderer
) -> dict[str, bytes]:
    """Every computed path of `image` mapped to its content for `machine`; the first
    failure raises ComputedFileError naming the host and the path."""
    files: dict[str, bytes] = {}
    for computed in image.computed_files:
        try:
            files[computed.path] = renderer.render(computed.source, machine)
        except ComputedFileError as err:
            raise err.for_path(computed.path) from err
        log.debug("rendered %s for %s (%d bytes)", computed.path, machine.hostname,
                  len(files[computed.path]))
    return files


def content_key(files: dict[str, bytes]) -> bytes:
    """A 16-byte digest of a set of computed files (path and content), stable across
    runs and dict order: keys diff caches per distinct set of computed files."""
    digest = xxhash.xxh3_128()
    for path in sorted(files, key=os.fsencode):
        digest.update(os.fsencode(path) + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.digest()
