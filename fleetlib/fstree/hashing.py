"""Content hashes: SHA-256 of a file's bytes, written `sha256:<hex>` in text."""

import hashlib
import os
from typing import Protocol

from fleetlib.errors import FleetError

HASH_SIZE = 32
PREFIX = "sha256:"
READ_SIZE = 1 << 20
SMALL_FILE = 256 << 10  # hash_fd reads a file this small in one call
_sha256 = hashlib.sha256


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


def hash_fd(fd: int, expected: int = -1, buffer: bytearray | None = None
            ) -> tuple[bytes, int]:
    """SHA-256 and length of everything readable from an open descriptor.

    `expected` (the size an fstat showed, if known) lets a small file be read in one
    call of that size plus one: a read of a regular file that returns less than asked
    has reached its end. Larger reads go through `buffer` (READ_SIZE bytes made when
    not given; a caller hashing many files passes one to reuse)."""
    if 0 <= expected < SMALL_FILE:
        data = os.read(fd, expected + 1)
        if len(data) <= expected:
            return _sha256(data).digest(), len(data)
        h, size = _sha256(data), len(data)  # it grew: read on to its end
    else:
        h, size = hashlib.sha256(), 0
    buf = buffer if buffer is not None else bytearray(READ_SIZE)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            return h.digest(), size
        h.update(view[:n])
        size += n
