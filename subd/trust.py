"""`subd --trusted-keys DIR`: a host that fetches for and applies only images signed by
a trusted key, whatever image servers (replicas, proxies) stand between it and the
one that signed.

With trusted keys every Fetch and Update must name its image. subd reads that image's
manifest itself (ImageServer.GetImage) from the image servers the request lists, in
order, and keeps the first copy whose signature verifies against a trusted key; a
server whose copy does not verify is skipped with a warning naming it. The verified
manifests of the last few images stay in memory (images are immutable: a name is bound
to one content), as do the servers of the last request for each image, so an Update
after a Fetch reads nothing again. Then:

- a Fetch may ask only for objects of the verified manifest;
- every ADD, REPLACE and METADATA change of an Update must give its path exactly the
  manifest's inode there (kind, mode, owner, times, size, content, link target, device,
  extended attributes, hard links), but for the image's computed files, whose content
  comes inline in the update (the rest of their inode must still match); the filter and
  triggers must be the manifest's; a DELETE may remove only a path the manifest lacks.

Anything else is refused (FAILED_PRECONDITION) before anything is fetched or changed,
with one line that starts with `REFUSED` and says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from fleetlib.errors import FleetError, PreconditionError
from fleetlib.fstree.diff import Change
from fleetlib.fstree.hashing import format_hash
from fleetlib.fstree.image import Image
from fleetlib.fstree.tree import Inode
from fleetlib.rpc.certs import ROLE_METHODS
from fleetlib.rpc.chunks import join_chunks_async
from fleetlib.rpc.ports import IMAGESERVER_PORT
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security, call_timeout, open_channel, parse_address
from fleetlib.signing import TrustedKeys, verify_trusted
from fleetlib.wire import imageserver_pb2, imageserver_pb2_grpc
from fleetlib.wire.codec import image_from_proto
from subd.changes import UpdatePlan

log = logging.getLogger(__name__)

# How every refusal starts; the dominator shows it as "image not trusted".
REFUSED = "this host requires signed images (subd --trusted-keys)"
MANIFESTS_KEPT = 4       # verified manifests in memory (100k files are ~10 MB each)
SERVERS_KEPT = 256       # images whose last servers are remembered
REFUSAL_SECONDS = 10.0   # a refusal is repeated, not re-read, for as long (a dominator
                         # without --trusted-keys asks again every cycle)


def is_trust_refusal(text: str) -> bool:
    """Whether an error text (a Fetch or Update refused) is subd's signed-image check."""
    return REFUSED in text


@dataclass(frozen=True)
class SignedManifest:
    """A verified image and the indexes the checks use."""

    image: Image
    signer: str
    paths: dict[str, int]        # path -> inode number
    objects: frozenset[bytes]    # content hashes of its regular files
    computed: frozenset[str]     # paths of its computed files

    @classmethod
    def of(cls, image: Image, signer: str) -> SignedManifest:
        """Index a verified image."""
        return cls(image, signer, image.tree.paths(), frozenset(image.tree.object_sizes()),
                   frozenset(c.path for c in image.computed_files))


def _refuse(detail: str) -> PreconditionError:
    return PreconditionError(f"{REFUSED}: {detail}")


def _differing(got: Inode, want: Inode) -> list[str]:
    """The inode fields in which `got` differs from `want`."""
    return [f.name for f in dataclasses.fields(Inode)
            if getattr(got, f.name) != getattr(want, f.name)]


def _reissue_hint(address: str, details: str) -> str:
    methods = ",".join(ROLE_METHODS["subd"])
    return (f"image server {address} refused ImageServer.GetImage to this host's certificate "
            f"({details}): a subd with --trusted-keys reads signed manifests itself; re-issue "
            f"the subd certificate with `dominator certs issue subd --methods '{methods}' "
            "--ca CA_DIR --out DIR`")


class TrustedImages:
    """The signed-image check of one subd (see the module docstring)."""

    def __init__(self, trusted: TrustedKeys, security: Security,
                 capacity: int = MANIFESTS_KEPT) -> None:
        self.trusted = trusted
        self.security = security
        self.capacity = capacity
        self._manifests: OrderedDict[str, SignedManifest] = OrderedDict()
        self._servers: OrderedDict[str, list[str]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        # Recent refusals: name -> (until (time.monotonic()), the servers asked, the error).
        self._refused: dict[str, tuple[float, list[str], str]] = {}

    async def manifest(self, name: str, servers: Iterable[str], what: str) -> SignedManifest:
        """The verified manifest of image `name`, read from `servers` in order (or those
        of the last request for that image when empty); PreconditionError when the
        request (`what`: "fetch", "update") names no image or no server has a copy that
        verifies against a trusted key."""
        if not name:
            raise _refuse(f"the {what} names no image (a dominator or CLI older than "
                          "signed images?): upgrade it")
        addresses = list(dict.fromkeys(servers))
        if addresses:
            self._servers[name] = addresses
            self._servers.move_to_end(name)
            while len(self._servers) > SERVERS_KEPT:
                self._servers.popitem(last=False)
        cached = self._manifests.get(name)
        if cached is not None:
            self._manifests.move_to_end(name)
            return cached
        addresses = self._servers.get(name, [])
        if not addresses:
            raise _refuse(f"the {what} of image {name} names no image server to read its "
                          "signed manifest from")
        refused = self._refused.get(name)
        if refused is not None and refused[0] > time.monotonic() and refused[1] == addresses:
            raise PreconditionError(refused[2])
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name in self._manifests:
                return self._manifests[name]
            try:
                manifest = await self._read_verified(name, addresses)
            except PreconditionError as err:
                now = time.monotonic()
                self._refused = {n: r for n, r in self._refused.items() if r[0] > now}
                self._refused[name] = (now + REFUSAL_SECONDS, addresses, str(err))
                raise
            self._refused.pop(name, None)
            self._manifests[name] = manifest
            while len(self._manifests) > self.capacity:
                self._manifests.popitem(last=False)
        self._locks.pop(name, None)
        return manifest

    async def _read_verified(self, name: str, addresses: list[str]) -> SignedManifest:
        reasons = []
        for address in addresses:
            try:
                image = await self._read(address, name)
                if image.name != name:
                    raise FleetError(f"sent image {image.name} when asked for {name}")
                signer = await asyncio.to_thread(verify_trusted, image, self.trusted)
            except FleetError as err:
                log.warning("image %s from image server %s not used: %s", name, address, err)
                reasons.append(f"from {address}: {err}")
                continue
            manifest = await asyncio.to_thread(SignedManifest.of, image, signer)
            log.info("image %s from %s is signed by trusted key %s", name, address, signer)
            return manifest
        raise _refuse(f"no trusted copy of image {name}: " + "; ".join(reasons))

    async def _read(self, server: str, name: str) -> Image:
        """Image `name` as `server` sends it (decoded and validated, not yet verified)."""
        address = parse_address(server, IMAGESERVER_PORT)
        channel = open_channel(address, self.security, "imageserver", aio=True)
        try:
            stub = imageserver_pb2_grpc.ImageServerStub(channel)
            call = stub.GetImage(imageserver_pb2.GetImageRequest(name=name),
                                 timeout=call_timeout())
            data = await join_chunks_async(call)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise FleetError(_reissue_hint(address, err.details() or "")) from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise FleetError("no such image there") from None
            raise FleetError(describe_rpc_error(err)) from None
        finally:
            await channel.close()
        return await asyncio.to_thread(
            lambda: image_from_proto(imageserver_pb2.Image.FromString(data)))

    @staticmethod
    def check_fetch(manifest: SignedManifest, hashes: list[bytes]) -> None:
        """Refuse a fetch of objects that are not content of the signed image."""
        foreign = [h for h in hashes if h not in manifest.objects]
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise _refuse(f"object {format_hash(foreign[0])}{more} is not content of the "
                          f"signed image {manifest.image.name}: fetch refused")

    @staticmethod
    def check_update(manifest: SignedManifest, plan: UpdatePlan) -> None:
        """Refuse an update that would make the host hold anything but the signed image
        (see the module docstring); changes nothing."""
        image = manifest.image
        problem = _plan_problem(manifest, plan)
        if problem:
            raise _refuse(f"the update does not match the signed image {image.name} "
                          f"(signed by {manifest.signer}): {problem}")


def _plan_problem(manifest: SignedManifest, plan: UpdatePlan) -> str:
    """What in `plan` disagrees with the signed manifest, "" when nothing does."""
    image = manifest.image
    if (plan.filter.lines if plan.filter else None) != \
            (image.filter.lines if image.filter else None):
        return "its filter differs"
    if plan.triggers != image.triggers:
        return "its triggers differ"
    inline = {hashlib.sha256(data).digest() for data in plan.inline_objects if data}
    paths = manifest.paths
    for entry in plan.diff.entries:
        ino = paths.get(entry.path)
        if entry.change == Change.DELETE:
            if ino is not None:
                return f"it deletes {entry.path}, which the image holds"
            continue
        if ino is None or entry.new is None:
            return f"{entry.path} is not in the image"
        got, want = entry.new, image.tree.inodes[ino]
        if entry.path in manifest.computed:  # its content is rendered per host, inline
            want = dataclasses.replace(want, size=got.size, hash=got.hash)
            if got.size and entry.link_to is None and got.hash not in inline:
                return f"computed file {entry.path} without its content inline"
        fields = _differing(got, want)
        if fields:
            return f"{entry.path}: {', '.join(fields)} differ(s) from the image's"
        if entry.link_to is not None and paths.get(entry.link_to) != ino:
            return f"{entry.path}: the image does not link it to {entry.link_to}"
    return ""
