"""The identity folder's checks without `cryptography` (fleetlib/rpc/pem.py): the expiry
read from the DER is the one cryptography reads, for both encodings of a time, and each
bad file is named in one line (key mismatch and a cert that is not PEM are in
tests/integration/test_rpc_security.py)."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetlib.errors import FleetError
from fleetlib.rpc.certs import CA_CERT, CERT, KEY, init_ca
from fleetlib.rpc.pem import not_valid_after
from fleetlib.rpc.tls import Identity

UTC = datetime.UTC


def certificate(not_after: datetime.datetime, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A self-signed PEM certificate for KEY valid until NOT_AFTER."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(datetime.datetime(1990, 1, 1, tzinfo=UTC))
            .not_valid_after(not_after).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("not_after", [
    datetime.datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC),     # UTCTime, 19YY
    datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),  # UTCTime, 20YY
    datetime.datetime(2050, 1, 1, tzinfo=UTC),              # GeneralizedTime from 2050
    datetime.datetime(2150, 6, 7, 8, 9, 10, tzinfo=UTC),
])
def test_expiry_is_the_one_cryptography_reads(not_after: datetime.datetime) -> None:
    pem = certificate(not_after, ec.generate_private_key(ec.SECP256R1()))
    assert not_valid_after(b"leading text\n" + pem) == not_after
    assert x509.load_pem_x509_certificate(pem).not_valid_after_utc == not_after


@pytest.mark.parametrize("text", [
    b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
    b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----",
])
def test_not_a_certificate_is_a_value_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        not_valid_after(text)


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    """A copy of the admin identity of a fresh CA."""
    init_ca(tmp_path / "ca")
    return Path(shutil.copytree(tmp_path / "ca/admin", tmp_path / "id"))


def test_each_bad_file_is_named(identity: Path) -> None:
    key = serialization.load_pem_private_key((identity / KEY).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    good_cert = (identity / CERT).read_bytes()
    (identity / CERT).write_bytes(certificate(datetime.datetime(2020, 3, 4, tzinfo=UTC), key))
    with pytest.raises(FleetError, match=r"cert\.pem expired on 2020-03-04: issue a new one"):
        Identity.load(identity)
    (identity / CERT).write_bytes(good_cert)
    (identity / KEY).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(FleetError, match=r"key\.pem is not an unencrypted PEM private key"):
        Identity.load(identity)
    (identity / KEY).write_text("not a key\n")
    with pytest.raises(FleetError, match=r"key\.pem is not an unencrypted PEM private key"):
        Identity.load(identity)
    (identity / CA_CERT).write_text("not a certificate\n")
    with pytest.raises(FleetError, match=r"ca\.pem is not a PEM certificate"):
        Identity.load(identity)
