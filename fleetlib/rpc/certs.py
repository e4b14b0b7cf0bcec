"""The certificate authority behind `dominator certs`: a CA, and certificates whose
identity is the subject CN and whose permitted RPC methods travel in the certificate.

Every certificate works for both ends of a connection (clientAuth and serverAuth),
so one identity folder (`ca.pem`, `cert.pem`, `key.pem`) serves a daemon and the
clients it runs. Keys are EC P-256, signatures ECDSA-SHA256.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetlib.errors import FleetError
from fleetlib.rpc.pem import CA_CERT as CA_CERT
from fleetlib.rpc.pem import CERT as CERT
from fleetlib.rpc.pem import KEY as KEY

log = logging.getLogger(__name__)

# Dominator's OID for the permitted-methods extension (Cloud-Foundations/Dominator).
PERMITTED_METHODS_OID = x509.ObjectIdentifier("1.3.6.1.4.1.9586.100.7.1")

# The identities `certs init` makes, and the methods each role needs.
ROLE_METHODS: dict[str, list[str]] = {
    "admin": ["*"],
    # An image server replicates from another image server.
    "imageserver": ["ImageServer.*", "ObjectServer.*"],
    # subd --trusted-keys reads an image's signed manifest itself (ImageServer.GetImage).
    "subd": ["ObjectServer.GetObjects", "ObjectServer.CheckObjects", "ImageServer.GetImage"],
    "dominator": [
        "Subd.*",
        "ImageServer.GetImage",
        "ImageServer.ListImages",
        "ImageServer.CheckImage",
        "ImageServer.WatchImages",
        "ImageServer.ListReplicas",  # the replicas hosts may fetch from
        "ObjectServer.CheckObjects",
        "ObjectServer.GetObjects",
    ],
}

CA_KEY = "ca.key"  # the identity folders' files are named in fleetlib/rpc/pem.py

CA_DAYS = 3650
CERT_DAYS = 365
# Backdate validity a little so a peer whose clock lags still accepts a fresh cert.
CLOCK_SKEW = datetime.timedelta(minutes=5)

_METHOD_PATTERN = re.compile(r"^[A-Za-z*?][A-Za-z0-9_*?]*(\.[A-Za-z0-9_*?]+)?$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HOST_PATTERN = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def init_ca(directory: Path) -> None:
    """Create a CA in DIRECTORY plus one ready identity folder per role in ROLE_METHODS.

    Refuses to run where a CA key already exists: replacing it would silently
    invalidate every certificate already handed out.
    """
    directory = Path(directory)
    if (directory / CA_KEY).exists():
        raise FleetError(f"{directory / CA_KEY} already exists: refusing to replace a CA")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleet-dominator"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fleet CA {secrets.token_hex(4)}"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    for role, methods in ROLE_METHODS.items():
        _issue(role, methods, ca_cert, ca_key, directory / role, ())
    # The key goes last, so an interrupted init can simply be run again.
    _write(directory / CA_KEY, _key_pem(ca_key), secret=True)
    log.info("created CA %s in %s", ca_name.rfc4514_string(), directory)


def issue(
    name: str,
    methods: list[str],
    ca_dir: Path,
    out_dir: Path,
    hosts: Iterable[str] = (),
) -> None:
    """Issue an identity folder OUT_DIR for NAME, signed by the CA in CA_DIR.

    The certificate may call only METHODS (`Service.Method` globs); HOSTS are extra
    names or addresses a server using it is reached at (besides NAME and localhost).
    """
    ca_dir = Path(ca_dir)
    ca_cert = _load_cert(ca_dir / CA_CERT)
    ca_key_path = ca_dir / CA_KEY
    try:
        ca_key = serialization.load_pem_private_key(_read(ca_key_path), password=None)
    except ValueError as err:
        raise FleetError(f"{ca_key_path} is not a PEM private key: {err}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise FleetError(f"{ca_key_path} is not an EC private key")
    _issue(name, methods, ca_cert, ca_key, Path(out_dir), tuple(hosts))


def permitted_methods(cert_pem: bytes) -> tuple[str, ...]:
    """The method patterns a certificate permits (empty if it carries none)."""
    cert = _parse_cert(cert_pem)
    try:
        ext = cert.extensions.get_extension_for_oid(PERMITTED_METHODS_OID)
    except x509.ExtensionNotFound:
        return ()
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return ()
    text = value.value.decode("utf-8", errors="replace")
    return tuple(p for p in text.split(",") if p)


def common_name(cert_pem: bytes) -> str:
    """The subject CN of a certificate: the identity of whoever presents it ("" if none)."""
    names = _parse_cert(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return ""
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def validate_methods(methods: Iterable[str]) -> list[str]:
    """Check method patterns (`Service.Method` globs or `*`); return them as a list."""
    checked = list(methods)
    if not checked:
        raise FleetError("no methods given: a certificate needs at least one method pattern")
    for pattern in checked:
        if pattern != "*" and not _METHOD_PATTERN.match(pattern):
            raise FleetError(
                f"bad method pattern {pattern!r}: expected Service.Method, "
                "globs allowed (e.g. 'Subd.*', 'ImageServer.GetImage')"
            )
    return checked


def _issue(
    name: str,
    methods: list[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    out_dir: Path,
    hosts: tuple[str, ...],
) -> None:
    if not name or "/" in name or not _NAME_PATTERN.match(name):
        raise FleetError(
            f"bad certificate name {name!r}: use up to 64 letters, digits, '.', '-', '_', '@'"
        )
    methods = validate_methods(methods)
    sans = _subject_alt_names((name, *_DEFAULT_HOSTS, *hosts))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .add_extension(
            x509.UnrecognizedExtension(PERMITTED_METHODS_OID, ",".join(methods).encode()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(out_dir / CERT, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(out_dir / KEY, _key_pem(key), secret=True)
    log.info("issued %s (methods %s) in %s", name, ",".join(methods), out_dir)


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # de-duplicated, in order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if len(host) > 253 or not _HOST_PATTERN.match(host):
            raise FleetError(f"bad host {host!r}: expected a DNS name or an IP address")
        names.append(x509.DNSName(host))
    return names


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _parse_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise FleetError(f"not a PEM certificate: {err}") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as err:
        raise FleetError(f"{path} is not a PEM certificate: {err}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise FleetError(f"cannot read {path}: {err.strerror}") from None


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Write atomically (temp, fsync, rename); secrets are never readable by others."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            if not secret:
                os.fchmod(out.fileno(), 0o644)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
