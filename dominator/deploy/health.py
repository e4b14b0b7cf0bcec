"""The health gate: a URL (GET, 2xx is healthy) or a command (exit 0 is healthy)
run on each host of a wave once the herd has it synced."""

from __future__ import annotations

import asyncio
import re
import shlex
from dataclasses import dataclass

import httpx

from dominator.deploy.errors import DeployError
from mdb.machine import BRACKETED_ADDRESS_RE, Machine

DEFAULT_HEALTH_TIMEOUT = 10.0
DEFAULT_HEALTH_RETRIES = 2
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
PLACEHOLDERS = ("host", "address")


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with `{host}` and `{address}` replaced (no other formatting)."""
    def one(match: re.Match) -> str:
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


@dataclass(frozen=True)
class HealthCheck:
    """A URL (GET, 2xx is healthy) or a command (exit 0 is healthy), per host."""

    url: str = ""
    command: str = ""
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    retries: int = DEFAULT_HEALTH_RETRIES

    def check(self) -> None:
        """Refuse a template that cannot work for any host."""
        sample = {"host": "host.example", "address": "192.0.2.1"}
        if self.url:
            url = httpx.URL(fill(self.url, sample))
            if url.scheme not in ("http", "https") or not url.host:
                raise DeployError(f"healthCheck.url {self.url!r}: expected http://... or "
                                  "https://... with a host")
        elif self.command:
            try:
                args = shlex.split(self.command)
            except ValueError as err:
                raise DeployError(f"healthCheck.command {self.command!r}: {err}") from None
            if not args:
                raise DeployError("healthCheck.command is empty")
            for arg in args:
                fill(arg, sample)

    async def run(self, machine: Machine, client: httpx.AsyncClient) -> tuple[bool, str]:
        """Check one host, retrying with a short backoff: (healthy, what was seen)."""
        seen = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            healthy, seen = await self._attempt(machine, client)
            if healthy:
                return True, seen
        tries = self.retries + 1
        return False, f"{seen} ({tries} attempt{'s' if tries > 1 else ''})"

    async def _attempt(self, machine: Machine, client: httpx.AsyncClient) -> tuple[bool, str]:
        host = machine.hostname
        if self.url:
            url = fill(self.url, {"host": host,
                                  "address": address_host(machine.address, host, True)})
            try:
                reply = await client.get(url, timeout=self.timeout)
            except httpx.TimeoutException:
                return False, f"GET {url}: no answer within {self.timeout:g} s"
            except httpx.HTTPError as err:
                return False, f"GET {url}: {type(err).__name__}: {err}"
            return reply.is_success, f"GET {url}: HTTP {reply.status_code}"
        values = {"host": host, "address": address_host(machine.address, host, False)}
        args = [fill(arg, values) for arg in shlex.split(self.command)]
        try:
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        except OSError as err:
            return False, f"{args[0]}: {err.strerror}"
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            return False, f"{shlex.join(args)}: still running after {self.timeout:g} s"
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode == 0:
            return True, f"{shlex.join(args)}: exit 0"
        detail = next((line.strip() for line in stderr.decode(errors="replace").splitlines()
                       if line.strip()), "")
        return False, (f"{shlex.join(args)}: exit {process.returncode}"
                       + (f": {detail[:200]}" if detail else ""))

