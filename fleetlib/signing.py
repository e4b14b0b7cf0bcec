"""Signed images: Ed25519 key pairs, signing an image's manifest and checking it.

The manifest digest is SHA-256 over `MANIFEST_PREFIX` (a versioned domain-separation
prefix: a digest of another kind, or of a later encoding, never collides with it)
followed by the deterministic protobuf serialization (`SerializeToString(
deterministic=True)`) of the image's `Image` message with `created_unix`,
`expires_unix` and `signature` cleared: what makes the image (name, tree, filter,
triggers, computed files), not when it was made or expires (metadata an operator may
change). The tree is put in a canonical order first (inodes by number, directories by
inode, directories without entries left out), so the digest survives any decode and
re-encode of the same image.

Key files: `NAME.key` is the private key (PKCS#8 PEM, unencrypted, mode 0600: a key
readable by group or others is refused), `NAME.pub` the public key (SubjectPublicKeyInfo
PEM). A signature carries the signer's key name and raw public key; trust is by the
public key (a folder of `*.pub`), the signer is named by the trusted file's name.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetlib.errors import FleetError
from fleetlib.fstree.image import Image, ImageSignature
from fleetlib.wire import imageserver_pb2
from fleetlib.wire.codec import image_to_proto

log = logging.getLogger(__name__)

MANIFEST_PREFIX = b"fleet image manifest v1\0"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"

TrustedKeys = Mapping[bytes, str]  # raw public key -> key name (its file's stem)


@dataclass(frozen=True)
class SigningKey:
    """A private key and the name it signs as."""

    name: str
    key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return raw_public(self.key.public_key())


def raw_public(key: Ed25519PublicKey) -> bytes:
    """A public key's raw 32 bytes."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: bytes) -> str:
    """A key's fingerprint as OpenSSH writes one: SHA256:base64 of its digest."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public_key).digest()).decode().rstrip("=")


def manifest_digest(image: Image) -> bytes:
    """The SHA-256 digest an image's signature signs (see the module docstring)."""
    return message_digest(image_to_proto(image))


def message_digest(message: imageserver_pb2.Image) -> bytes:
    """`manifest_digest` of the image MESSAGE encodes, from the message itself (left as
    it is): no decoding, for a replica checking what its upstream served."""
    msg = imageserver_pb2.Image()
    msg.CopyFrom(message)
    for metadata in ("created_unix", "expires_unix", "signature"):
        msg.ClearField(metadata)
    inodes = sorted(msg.tree.inodes, key=lambda inode: inode.number)
    directories = sorted((d for d in msg.tree.directories if d.entries),
                         key=lambda d: d.inode)
    del msg.tree.inodes[:]
    msg.tree.inodes.extend(inodes)
    del msg.tree.directories[:]
    msg.tree.directories.extend(directories)
    return hashlib.sha256(MANIFEST_PREFIX + msg.SerializeToString(deterministic=True)).digest()


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh key pair: (private key PEM, public key PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_private_key(path: Path) -> SigningKey:
    """The private key in `path`, named after the file; FleetError (one line) when it
    cannot be read, is not an Ed25519 private key, or is readable by group or others."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise FleetError(f"{path}: private key is accessible by group or others (mode "
                             f"{stat.S_IMODE(mode):04o}): chmod 600 {path}")
        data = path.read_bytes()
    except OSError as err:
        raise FleetError(f"cannot read private key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise FleetError(f"{path}: not an Ed25519 private key (make one with "
                         "`dominator keys create`)")
    name = path.name.removesuffix(PRIVATE_SUFFIX)
    return SigningKey(name, key)


def load_public_key(path: Path) -> bytes:
    """The raw public key in `path` (PEM); FleetError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FleetError(f"cannot read public key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise FleetError(f"{path}: not an Ed25519 public key (PEM)")
    return raw_public(key)


def load_trusted_keys(folder: Path) -> dict[bytes, str]:
    """The `*.pub` keys of a folder, by raw public key; FleetError when the folder cannot
    be read, holds no key, or a key file is bad (naming it)."""
    try:
        paths = sorted(p for p in folder.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
    except OSError as err:
        raise FleetError(f"cannot read trusted keys folder {folder}: {err.strerror}") from None
    if not paths:
        raise FleetError(f"no trusted keys (*{PUBLIC_SUFFIX}) in {folder}")
    trusted: dict[bytes, str] = {}
    for path in paths:
        trusted.setdefault(load_public_key(path), path.name.removesuffix(PUBLIC_SUFFIX))
    log.info("trusting %d signing key(s) from %s: %s", len(trusted), folder,
             ", ".join(sorted(trusted.values())))
    return trusted


def sign_image(image: Image, key: SigningKey) -> Image:
    """The image with its signature by `key`."""
    signature = key.key.sign(manifest_digest(image))
    return replace(image, signature=ImageSignature(key.name, key.public_key, signature))


def _verifies(image: Image) -> bool:
    assert image.signature is not None
    try:
        Ed25519PublicKey.from_public_bytes(image.signature.public_key).verify(
            image.signature.signature, manifest_digest(image))
    except (InvalidSignature, ValueError):
        return False
    return True


def check_self_signed(image: Image) -> None:
    """Refuse a signed image whose signature does not verify against the public key it
    carries (what an image server checks: it needs no trusted keys)."""
    if image.signature is not None and not _verifies(image):
        raise FleetError(f"image {image.name}: the signature of key "
                         f"{image.signature.key_name} does not verify: the image or its "
                         "signature was altered")


def verify_trusted(image: Image, trusted: TrustedKeys) -> str:
    """The name of the trusted key that signed the image; FleetError saying why when it
    is unsigned, signed by a key not trusted, or its signature does not verify."""
    signature = image.signature
    if signature is None:
        raise FleetError(f"image {image.name} is unsigned and only signed images are trusted")
    name = trusted.get(signature.public_key)
    if name is None:
        raise FleetError(f"image {image.name} is signed by key {signature.key_name} "
                         f"({fingerprint(signature.public_key)}), which is not trusted")
    if not _verifies(image):
        raise FleetError(f"image {image.name}: the signature of trusted key {name} does not "
                         "verify: the image or its signature was altered")
    return name


def describe_signer(signature: ImageSignature | None) -> str:
    """`signed by NAME (fingerprint)` or `unsigned`."""
    if signature is None:
        return "unsigned"
    return f"signed by {signature.key_name} ({fingerprint(signature.public_key)})"
