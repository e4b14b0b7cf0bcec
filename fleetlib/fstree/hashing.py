"""Content hashes: SHA-256 of a file's bytes, written `sha256:<hex>` in text."""

import hashlib
import os
from typing import Protocol

from fleetlib.errors import FleetError

HASH_SIZE = 32
PREFIX = "sha256:"
READ_SIZE = 1 << 20


class Reader(Protocol):
    """Where an object's bytes are read from: a file, or a member of a tarball."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes (all that is left when negative); b"" at the end."""
        ...


def format_hash(digest: bytes) -> str:
    """Text form of a content hash."""
    return PREFIX + digest.hex()


def parse_hash(text: str) -> bytes:
    """Parse `sha256:<64 hex>` (or bare hex) into 32 bytes; FleetError when malformed."""
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    try:
        digest = bytes.fromhex(body)
    except ValueError:
        raise FleetError(f"malformed hash {text!r}: not hexadecimal") from None
    check_hash(digest)
    return digest


def check_hash(digest: bytes) -> bytes:
    """Validate a binary hash received from disk or network."""
    if len(digest) != HASH_SIZE:
        raise FleetError(f"malformed hash: {len(digest)} bytes, expected {HASH_SIZE}")
    return digest


def hash_bytes(data: bytes) -> bytes:
    """SHA-256 of `data`."""
    return hashlib.sha256(data).digest()


def hash_fd(fd: int) -> tuple[bytes, int]:
    """SHA-256 and length of everything readable from an open descriptor."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            return h.digest(), size
        h.update(view[:n])
        size += n
