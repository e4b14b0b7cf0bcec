"""TLS identities (one folder: ca.pem, cert.pem, key.pem) and the channels and server
credentials built from them: mutual TLS everywhere unless `--insecure`."""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from fleetlib.errors import FleetError
from fleetlib.rpc.pem import CA_CERT, CERT, KEY, check_identity

log = logging.getLogger(__name__)

# Streams carry 1 MiB chunks; leave generous room for framing and metadata.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MESSAGE_SIZE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

# How long a connection may stay silent. Every channel pings its server every
# KEEPALIVE seconds and gives the connection up when a ping goes unanswered for as long
# again: a black-holed or half-open connection fails its calls (UNAVAILABLE) within
# 2 x KEEPALIVE (40 s), even a stream whose size nobody can bound. The answer queues
# behind data already sent our way, so a slow link needs that much room.
# Unary calls wait at most CALL_TIMEOUT for their reply, and a stream the caller reads
# message by message (subd's download) at most that long for its next message.
# Both can be lowered for tests through the environment (FLEET_RPC_KEEPALIVE_SECONDS,
# FLEET_RPC_TIMEOUT_SECONDS); every program of a fleet must be given the same values.
KEEPALIVE_ENV = "FLEET_RPC_KEEPALIVE_SECONDS"
KEEPALIVE_SECONDS = 20.0
CALL_TIMEOUT_ENV = "FLEET_RPC_TIMEOUT_SECONDS"
CALL_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_MS = 20_000

INSECURE_WARNING = (
    "TLS is OFF: --insecure means no encryption and no authentication, any caller may "
    "call any method; development only, never run a fleet like this"
)

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class Identity:
    """Who we are on the wire: our certificate and key, and the CA we trust."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def load(cls, tls_dir: Path) -> Identity:
        """Read and check an identity folder, failing with one line naming the bad file."""
        tls_dir = Path(tls_dir)
        ca_pem, cert_pem, key_pem = (_read(tls_dir / name) for name in (CA_CERT, CERT, KEY))
        check_identity(tls_dir, ca_pem, cert_pem)
        return cls(ca_pem, cert_pem, key_pem)

    @functools.cached_property
    def name(self) -> str:
        """Our certificate's subject CN (read on first use: a client never needs it, and
        reading it takes `cryptography`, slow to import)."""
        from fleetlib.rpc.certs import common_name

        return common_name(self.cert_pem)


@dataclass(frozen=True)
class Security:
    """How a program talks on the wire: with an identity (mutual TLS) or None (insecure)."""

    identity: Identity | None

    @classmethod
    def from_options(cls, tls_dir: str | None, insecure: bool) -> Security:
        """Turn `--tls-dir` / `--insecure` into a Security, refusing to guess between them."""
        if insecure:
            log.warning(INSECURE_WARNING)
            return cls(None)
        if tls_dir is None:
            raise FleetError(
                "no TLS identity: pass --tls-dir DIR (or set DOMINATOR_TLS_DIR), "
                "or --insecure for development"
            )
        return cls(Identity.load(Path(tls_dir)))


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 86400:
        raise FleetError(f"{variable}={text!r}: expected seconds from 0.1 to 86400")
    return value


def call_timeout() -> float:
    """Seconds a unary call waits for its reply (or a read stream for its next message)."""
    return _seconds(CALL_TIMEOUT_ENV, CALL_TIMEOUT_SECONDS)


def _keepalive_ms() -> int:
    return int(_seconds(KEEPALIVE_ENV, KEEPALIVE_SECONDS) * 1000)


def keepalive_options() -> list[tuple[str, int]]:
    """Channel options: a ping every KEEPALIVE s, the connection given up when one goes
    unanswered for KEEPALIVE s."""
    interval = _keepalive_ms()
    return [
        ("grpc.keepalive_time_ms", interval),
        ("grpc.keepalive_timeout_ms", interval),
        # gRPC 1.5x+ waits for any ping's answer ping_timeout (default 60 s), whatever
        # keepalive_timeout says: without it a silent connection lingers a minute more.
        ("grpc.http2.ping_timeout_ms", interval),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream that went silent
    ]


def server_keepalive_options() -> list[tuple[str, int]]:
    """Server options accepting our clients' pings (else gRPC answers a client pinging
    more often than every 5 minutes with GOAWAY "too_many_pings"), and pinging idle
    clients the same way, so a call to a vanished client is cancelled too."""
    interval = _keepalive_ms()
    return [
        *keepalive_options(),
        ("grpc.http2.min_ping_interval_without_data_ms", max(interval // 2, 100)),
    ]


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Server credentials that demand a client certificate signed by our CA."""
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


def open_channel(
    address: str,
    security: Security,
    server_role: str,
    aio: bool = False,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel | grpc.aio.Channel:
    """A channel to ADDRESS (HOST:PORT) that expects a server certificate for SERVER_ROLE.

    The server's certificate is checked against our CA and against the role name
    (e.g. "subd"), not the address, so one certificate serves every host of a role.
    Every channel keeps its connection alive (`keepalive_options`).
    """
    # One attempt to connect (TCP and TLS handshake) may take gRPC's 20 s, or less
    # when KEEPALIVE is lowered: a black hole then fails as quickly as a silence.
    connect = ("grpc.min_reconnect_backoff_ms", min(2 * _keepalive_ms(), CONNECT_TIMEOUT_MS))
    all_options = [*MESSAGE_SIZE_OPTIONS, *keepalive_options(), connect, *options]
    if security.identity is None:
        if aio:
            return grpc.aio.insecure_channel(address, options=all_options)
        return grpc.insecure_channel(address, options=all_options)
    identity = security.identity
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    all_options.append(("grpc.ssl_target_name_override", server_role))
    if aio:
        return grpc.aio.secure_channel(address, credentials, options=all_options)
    return grpc.secure_channel(address, credentials, options=all_options)


def parse_address(text: str, default_port: int) -> str:
    """Normalize "HOST", "HOST:PORT", "[V6]:PORT" (or a bare IPv6) into a gRPC target."""
    text = text.strip()
    if not text:
        raise FleetError("empty address: expected HOST or HOST:PORT")
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise FleetError(f"bad address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:] if rest else None
        _check_ipv6(host, text)
    elif text.count(":") > 1:
        host = text
        _check_ipv6(host, text)
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not _HOSTNAME.match(host):
            raise FleetError(f"bad address {text!r}: {host!r} is not a host name or address")
    port = default_port if port_text is None else _parse_port(port_text, text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_port(port_text: str, text: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FleetError(f"bad address {text!r}: port must be a number from 1 to 65535")
    return int(port_text)


def _check_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise FleetError(f"bad address {text!r}: {host!r} is not an IPv6 address") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise FleetError(f"cannot read TLS identity file {path}: {err.strerror}") from None
