"""Which server a CLI command talks to, where its address came from, and a failed
connection explained in those terms.

Every address option records an `Endpoint` as click parses it (`--dominator`, the
environment variable, or the default), and so do commands that name a host another way
(the HOST argument of `sub`, or its MDB record). When a call fails before any server
answered (refused, wrong port, foreign CA, TLS against plain text, ...), `explain`
turns gRPC's message into one line that names the server, the address, the setting
that chose it and the likely fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from fleetlib.errors import FleetError
from fleetlib.rpc.ports import ROLES

# "ipv4:127.0.0.1:6970: why" or "ipv6:[::1]:6970: why" in gRPC's connection failures.
_PEER = re.compile(r"ipv[46]:\[?([0-9A-Fa-f.:]+?)\]?:(\d+): (.*)$")
_RESOLVE = re.compile(r"errors resolving ([^\s:]+):(\d+)")


@dataclass(frozen=True)
class Endpoint:
    """A server a command may call: its role (the certificate CN expected), the address
    given, and where that address came from, as an operator would change it."""

    role: str
    address: str
    origin: str

    @property
    def label(self) -> str:
        """'the dominator', 'the image server', 'subd'."""
        return ROLES.get(self.role, (self.role, 0))[0]

    @property
    def port(self) -> int:
        """The port of the address (the role's default when it names none)."""
        _, sep, port = self.address.rpartition(":")
        if sep and port.isdigit() and not self.address.endswith("]"):
            return int(port)
        return ROLES.get(self.role, ("", 0))[1]


_endpoints: list[Endpoint] = []
_insecure = False


def remember(role: str, address: str, origin: str) -> None:
    """Record a server this command may call (latest first when looked up)."""
    _endpoints.append(Endpoint(role, address, origin))


def remember_security(insecure: bool) -> None:
    """Record whether this command talks without TLS (--insecure)."""
    global _insecure
    _insecure = insecure


def origin_of(option: str, envvar: str | None, source: object) -> str:
    """How an option's value was chosen, for an error message."""
    name = getattr(source, "name", "")
    if name == "ENVIRONMENT" and envvar:
        return f"from {envvar}"
    if name in ("DEFAULT", "DEFAULT_MAP"):
        return f"the default; set {option}" + (f" or {envvar}" if envvar else "")
    return f"set by {option}"


def check_not_url(text: str) -> None:
    """Refuse a URL where HOST:PORT is expected, saying what to give instead."""
    if "://" in text:
        rest = text.split("://", 1)[1].split("/", 1)[0]
        raise FleetError(f"{text!r} is a URL: give HOST:PORT (e.g. {rest or 'localhost:6970'})")


def _ports_hint(port: int) -> str:
    """Whose default port PORT is, or every role's default port."""
    owner = next((label for label, default in ROLES.values() if default == port), None)
    if owner:
        return f"{port} is the default port of {owner}"
    return "default ports: " + ", ".join(
        f"{label.removeprefix('the ')} {default}" for label, default in ROLES.values())


def _find(port: int | None, host: str | None = None) -> Endpoint | None:
    for endpoint in reversed(_endpoints):
        if host is not None and endpoint.address.rsplit(":", 1)[0].strip("[]") == host:
            return endpoint
        if port is not None and endpoint.port == port:
            return endpoint
    return _endpoints[-1] if len({e.address for e in _endpoints}) == 1 else None


def explain(err: grpc.RpcError) -> str | None:
    """One line saying which server could not be reached and what to try, or None when
    the failure is not a connection problem (the server's own answer is clearer)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else ""
    details = details or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        endpoint = _find(None)
        if endpoint is None:
            return None
        return (f"{endpoint.label} at {endpoint.address} ({endpoint.origin}) did not answer "
                f"in time; it may be overloaded or the network slow: retry")
    if code != grpc.StatusCode.UNAVAILABLE:
        return None
    resolve = _RESOLVE.search(details)
    if resolve:
        endpoint = _find(int(resolve.group(2)), resolve.group(1))
        where = f"{endpoint.label} at {endpoint.address} ({endpoint.origin})" if endpoint \
            else f"{resolve.group(1)}:{resolve.group(2)}"
        return f"cannot resolve the host name of {where}: check the name"
    peer = _PEER.search(details)
    if not peer:
        return None
    port, why = int(peer.group(2)), peer.group(3)
    endpoint = _find(port)
    if endpoint is None:
        return None
    where = f"{endpoint.label} at {endpoint.address} ({endpoint.origin})"
    if "Connection refused" in why:
        return (f"cannot reach {where}: connection refused; is it running, "
                f"and listening on port {port}? ({_ports_hint(port)})")
    if "Hostname Verification" in why:
        return (f"{endpoint.address} is not {endpoint.label} ({endpoint.origin}): its "
                f"certificate is for another role; is {port} the {endpoint.role} port? "
                f"({_ports_hint(port)})")
    if "CERTIFICATE_VERIFY_FAILED" in why:
        return (f"cannot trust {where}: its certificate is not signed by our CA (ca.pem of "
                f"--tls-dir / DOMINATOR_TLS_DIR); a certificate from another `certs init`?")
    if "WRONG_VERSION_NUMBER" in why:
        return (f"{where} does not speak TLS: was it started with --insecure? then pass "
                f"--insecure here too (development only)")
    if _insecure and ("Socket closed" in why or "Connection reset" in why):
        return (f"{where} closed the connection: it likely expects TLS, and --insecure was "
                f"given; pass --tls-dir DIR (or set DOMINATOR_TLS_DIR) instead")
    if "certificate" in why.lower() or "handshake" in why.lower():
        return (f"TLS with {where} failed: {why.split(': OK')[0]}; check --tls-dir / "
                f"DOMINATOR_TLS_DIR (our certificate may be expired or from another CA)")
    return f"cannot reach {where}: {why}"
