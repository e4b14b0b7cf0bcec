"""The files of an identity folder (ca.pem, cert.pem, key.pem) and the checks a program
makes of them before it connects, with the standard library only: OpenSSL through `ssl`
(which gRPC has loaded already) parses the certificates and matches the key, and a few
lines of DER read the certificate's expiry. `cryptography` would take a third of a CLI
command's start (~40 ms) to import, for checks OpenSSL makes as well."""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import ssl
from pathlib import Path

from fleetlib.errors import FleetError

CA_CERT = "ca.pem"
CERT = "cert.pem"
KEY = "key.pem"

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")
_SEQUENCE, _EXPLICIT_VERSION, _UTC_TIME, _GENERALIZED_TIME = 0x30, 0xA0, 0x17, 0x18


class _Encrypted(Exception):
    """The key needs a password (ssl asks for one through a callback)."""


def _refuse_password() -> bytes:
    raise _Encrypted


def check_identity(tls_dir: Path, ca_pem: bytes, cert_pem: bytes) -> None:
    """Check the identity folder TLS_DIR (the certificates' contents given) as the TLS
    handshake will use it: the CA and our certificate parse, the key is an unencrypted
    private key matching the certificate, and the certificate has not expired; a
    FleetError names the bad file."""
    # A context used for nothing else: OpenSSL parses each certificate as it loads it
    # (ours as if it were a CA too), and loading the key checks it against ours.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for name, pem in ((CA_CERT, ca_pem), (CERT, cert_pem)):
        try:
            context.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError):
            raise FleetError(f"{tls_dir / name} is not a PEM certificate") from None
    try:
        context.load_cert_chain(tls_dir / CERT, tls_dir / KEY, password=_refuse_password)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise FleetError(f"{tls_dir / KEY} does not match {tls_dir / CERT}") from None
        raise FleetError(f"{tls_dir / KEY} is not an unencrypted PEM private key") from None
    except _Encrypted:
        raise FleetError(f"{tls_dir / KEY} is not an unencrypted PEM private key") from None
    try:
        expires = not_valid_after(cert_pem)
    except ValueError:
        raise FleetError(f"{tls_dir / CERT} is not a PEM certificate") from None
    if expires < datetime.datetime.now(datetime.UTC):
        raise FleetError(f"{tls_dir / CERT} expired on {expires:%Y-%m-%d}: issue a new one")


def not_valid_after(cert_pem: bytes) -> datetime.datetime:
    """The notAfter time (UTC) of the first certificate in CERT_PEM; ValueError when
    there is none or it is not DER as X.509 lays it out."""
    found = _PEM_CERT.search(cert_pem)
    if not found:
        raise ValueError("no PEM certificate")
    try:
        der = base64.b64decode(b"".join(found.group(1).split()), validate=True)
    except binascii.Error:
        raise ValueError("bad base64") from None
    # Certificate = SEQUENCE { tbsCertificate SEQUENCE { [0] version (optional), serial,
    # signature algorithm, issuer, validity SEQUENCE { notBefore, notAfter }, ... } }
    _, start, _ = _element(der, 0, _SEQUENCE)
    _, start, end = _element(der, start, _SEQUENCE)
    if start < end and der[start] == _EXPLICIT_VERSION:
        start = _element(der, start)[2]
    for _ in range(3):  # serial, signature algorithm, issuer
        start = _element(der, start)[2]
    _, start, _ = _element(der, start, _SEQUENCE)  # validity
    start = _element(der, start)[2]  # past notBefore
    tag, value, end = _element(der, start)
    if tag not in (_UTC_TIME, _GENERALIZED_TIME):
        raise ValueError("notAfter is not a time")
    text = der[value:end].decode("ascii", errors="replace")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ, YY 50-99 being 19YY (RFC 5280)
        text = ("19" if text[:2] >= "50" else "20") + text
    # YYYYMMDDHHMMSSZ (strptime would cost ~15 ms the first time: its locale set-up)
    if len(text) != 15 or not text[:14].isdigit() or text[14] != "Z":
        raise ValueError(f"bad time {text!r}")
    month, day, hour, minute, second = (int(text[at:at + 2]) for at in range(4, 14, 2))
    return datetime.datetime(int(text[:4]), month, day, hour, minute, second,
                             tzinfo=datetime.UTC)


def _element(der: bytes, at: int, expect: int | None = None) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at AT."""
    if at + 2 > len(der):
        raise ValueError("truncated")
    tag, length, at = der[at], der[at + 1], at + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or at + count > len(der):
            raise ValueError("bad length")
        length, at = int.from_bytes(der[at:at + count], "big"), at + count
    if at + length > len(der) or (expect is not None and tag != expect):
        raise ValueError("not the element expected")
    return tag, at, at + length
