"""The health gate, run on each host of a wave once the herd has it synced: a URL
(GET, 2xx is healthy) or a named check, a command the operator allow-listed on
the server (`dominator serve --health-check NAME=COMMAND`; exit 0 is healthy). A
request names a check, never carries a command line. Also the one redaction of
what a deploy shows (credentials and query values of every URL in it)."""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from dominator.deploy.errors import DeployError
from mdb.machine import BRACKETED_ADDRESS_RE, Machine

DEFAULT_HEALTH_TIMEOUT = 10.0
DEFAULT_HEALTH_RETRIES = 2
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
PLACEHOLDERS = ("host", "address")
CHECK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SAMPLE = {"host": "host.example", "address": "192.0.2.1"}
REDACTED = "REDACTED"
# A URL within a text (up to whitespace or a quote; a trailing `:`, `,` or `.` is the text's).
URL_IN_TEXT_RE = re.compile(r"""https?://[^\s"'<>]*[^\s"'<>:,.;)]""", re.IGNORECASE)
ALLOW_LIST_HINT = "dominator serve --health-check NAME=COMMAND"
STORED_COMMAND = ("not run: this deploy's healthCheck.command predates named checks, and "
                  "a command line never comes from a request (the operator allow-lists "
                  f"named checks with `{ALLOW_LIST_HINT}`)")


def fill(template: str, values: Mapping[str, str]) -> str:
    """`template` with `{host}` and `{address}` replaced (no other formatting)."""
    def one(match: re.Match[str]) -> str:
        name = match[1]
        if name not in values:
            raise DeployError(f"unknown placeholder {{{name}}} in {template!r}: use "
                              + " or ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        return values[name]
    return PLACEHOLDER_RE.sub(one, template)


def address_host(address: str, hostname: str, bracket: bool) -> str:
    """The host part of an MDB address (port dropped; the hostname when empty),
    bracketed when IPv6 and `bracket` (for URLs)."""
    if not address:
        return hostname
    bracketed = BRACKETED_ADDRESS_RE.fullmatch(address)
    if bracketed:
        host = bracketed["host"]
    elif address.count(":") == 1:
        host = address.split(":")[0]
    else:
        host = address
    return f"[{host}]" if bracket and ":" in host else host


# Redaction.

def redact_url(url: str) -> str:
    """`url` without its secrets: the user and password become REDACTED, and so does
    every query value (the keys stay: `?token=REDACTED`)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((rest.find(c) for c in "/?#" if c in rest), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    path, query_sep, query = tail.partition("?")
    if query_sep:
        query, hash_sep, fragment = query.partition("#")
        items = [f"{item.partition('=')[0]}={REDACTED}" if "=" in item
                 else (REDACTED if item else "") for item in query.split("&")]
        tail = f"{path}?{'&'.join(items)}{hash_sep}{fragment}"
    return f"{scheme}://{authority}{tail}"


def redact(value: Any, key: str = "") -> Any:
    """A deploy's JSON as anyone may see it: every URL in every string redacted
    (redact_url), and a stored command line hidden. The one redaction every view of
    a deploy goes through."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        if key == "command":
            return REDACTED
        return URL_IN_TEXT_RE.sub(lambda match: redact_url(match[0]), value)
    return value


# Named checks (the operator's allow-list).

@dataclass(frozen=True)
class NamedChecks:
    """The health checks the operator allow-listed: name -> command line (split
    with shlex; `{host}` and `{address}` each fill within one argument)."""

    commands: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def parse(cls, specs: Iterable[str]) -> NamedChecks:
        """From `NAME=COMMAND` texts (DeployError says what is wrong with one)."""
        commands: dict[str, tuple[str, ...]] = {}
        for spec in specs:
            name, sep, command = spec.partition("=")
            name = name.strip()
            if not sep or not CHECK_NAME_RE.fullmatch(name):
                raise DeployError(f"health check {spec!r}: expected NAME=COMMAND, NAME being "
                                  "letters, digits, '_', '.' or '-'")
            if name in commands:
                raise DeployError(f"health check {name!r} is given twice")
            try:
                args = tuple(shlex.split(command))
            except ValueError as err:
                raise DeployError(f"health check {name!r}: {command!r}: {err}") from None
            if not args:
                raise DeployError(f"health check {name!r}: the command is empty")
            for arg in args:
                fill(arg, SAMPLE)
            commands[name] = args
        return cls(tuple(sorted(commands.items())))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.commands]

    def command(self, name: str) -> tuple[str, ...]:
        """The command line of check `name` (DeployError listing the known ones)."""
        for known, args in self.commands:
            if known == name:
                return args
        known_names = ", ".join(self.names) or "none"
        raise DeployError(f"unknown health check {name!r}: this dominator allow-lists "
                          f"{known_names} (the operator adds one with `{ALLOW_LIST_HINT}`)")


NO_CHECKS = NamedChecks()


@dataclass(frozen=True)
class HealthCheck:
    """A URL (GET, 2xx is healthy) or a named check (exit 0 is healthy), per host.
    `refusal` fails every host without running anything (a stored command)."""

    url: str = ""
    check: str = ""
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    retries: int = DEFAULT_HEALTH_RETRIES
    refusal: str = ""

    def validate(self) -> None:
        """Refuse a URL template that cannot work for any host."""
        if self.url:
            url = httpx.URL(fill(self.url, SAMPLE))
            if url.scheme not in ("http", "https") or not url.host:
                raise DeployError(f"healthCheck.url {redact_url(self.url)!r}: expected "
                                  "http://... or https://... with a host")

    async def run(self, machine: Machine, client: httpx.AsyncClient,
                  checks: NamedChecks) -> tuple[bool, str]:
        """Check one host, retrying with a short backoff: (healthy, what was seen)."""
        if self.refusal:
            return False, self.refusal
        seen = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            healthy, seen = await self._attempt(machine, client, checks)
            if healthy:
                return True, seen
        tries = self.retries + 1
        return False, f"{seen} ({tries} attempt{'s' if tries > 1 else ''})"

    async def _attempt(self, machine: Machine, client: httpx.AsyncClient,
                       checks: NamedChecks) -> tuple[bool, str]:
        host = machine.hostname
        if self.url:
            url = fill(self.url, {"host": host,
                                  "address": address_host(machine.address, host, True)})
            shown = redact_url(url)
            try:
                reply = await client.get(url, timeout=self.timeout)
            except httpx.TimeoutException:
                return False, f"GET {shown}: no answer within {self.timeout:g} s"
            except httpx.HTTPError as err:
                return False, redact(f"GET {shown}: {type(err).__name__}: {err}")
            return reply.is_success, f"GET {shown}: HTTP {reply.status_code}"
        try:
            template = checks.command(self.check)
        except DeployError as err:
            return False, str(err)
        values = {"host": host, "address": address_host(machine.address, host, False)}
        return await run_command(self.check, [fill(arg, values) for arg in template],
                                 self.timeout)


async def run_command(name: str, args: list[str], timeout: float) -> tuple[bool, str]:
    """Run a check's command line (no shell): (exit 0, what was seen)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        return False, f"check {name}: {args[0]}: {err.strerror}"
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        return False, f"check {name}: still running after {timeout:g} s"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode == 0:
        return True, f"check {name}: exit 0"
    detail = next((line.strip() for line in stderr.decode(errors="replace").splitlines()
                   if line.strip()), "")
    return False, (f"check {name}: exit {process.returncode}"
                   + (f": {detail[:200]}" if detail else ""))
