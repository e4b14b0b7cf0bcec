"""Which image servers a host fetches from, in what order: the nearest first (longest
common REGION/DC/RACK prefix), equals spread by a rendezvous hash, the master last."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageServerInfo:
    """One image server the dominator may send hosts to."""

    address: str
    location: str = ""
    is_master: bool = False


def components(location: str) -> list[str]:
    """A location's components ('' has none)."""
    return [part for part in location.split("/") if part]


def common_prefix(one: str, other: str) -> int:
    """How many leading components two locations share (`us/dc1/r4`, `us/dc1/r9`: 2)."""
    shared = 0
    for mine, theirs in zip(components(one), components(other), strict=False):
        if mine != theirs:
            break
        shared += 1
    return shared


def rendezvous(host: str, address: str) -> int:
    """A stable pseudo-random weight of (host, server): equally near servers each come
    first for about the same share of hosts, and a server's departure moves only its own."""
    digest = hashlib.blake2b(f"{host}\0{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_servers(host: str, location: str, servers: Iterable[ImageServerInfo]) -> list[str]:
    """The addresses of `servers` in the order `host` (standing at `location`) should try
    them: non-masters by longest common location prefix, ties by rendezvous hash, then
    the master(s). Deterministic; duplicates are dropped."""
    unique = {server.address: server for server in servers}.values()
    ordered = sorted(unique, key=lambda server: (
        server.is_master, -common_prefix(location, server.location),
        -rendezvous(host, server.address)))
    return [server.address for server in ordered]
