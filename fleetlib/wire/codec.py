"""Trees and images to protobuf and back. Decoding validates everything: a
tree from the network or disk is untrusted until this module accepts it."""

from __future__ import annotations

import os
from typing import cast

from fleetlib.errors import FleetError
from fleetlib.fstree.filter import Filter
from fleetlib.fstree.hashing import HASH_SIZE
from fleetlib.fstree.image import ComputedFile, Image, ImageSignature
from fleetlib.fstree.imagename import check_image_name
from fleetlib.fstree.tree import (
    DEVICE_KINDS,
    PERMISSION_BITS,
    Inode,
    Kind,
    Tree,
    check_clean_path,
    check_name,
)
from fleetlib.fstree.triggers import make_trigger
from fleetlib.wire import imageserver_pb2, tree_pb2

_KINDS = {kind.value: kind for kind in Kind}
PUBLIC_KEY_SIZE = 32  # Ed25519
SIGNATURE_SIZE = 64


def tree_to_proto(tree: Tree) -> tree_pb2.Tree:
    """Encode a tree; entries sorted by name bytes."""
    msg = tree_pb2.Tree(root=tree.root)
    msg.inodes.extend(inode_to_proto(number, inode) for number, inode in tree.inodes.items())
    for number in tree.children:
        entries = [tree_pb2.DirEntry(name=os.fsencode(name), inode=child)
                   for name, child in tree.entries(number)]
        msg.directories.add(inode=number, entries=entries)
    return msg


def inode_to_proto(number: int, inode: Inode) -> tree_pb2.Inode:
    """Encode one inode."""
    return tree_pb2.Inode(
        # Kind is an IntEnum whose values are InodeKind's (the stub types them apart).
        number=number, kind=cast(tree_pb2.InodeKind, inode.kind), mode=inode.mode,
        uid=inode.uid, gid=inode.gid,
        mtime_ns=inode.mtime_ns, size=inode.size, hash=inode.hash,
        symlink_target=inode.target, rdev=inode.rdev,
        xattrs=[tree_pb2.Xattr(name=n, value=v) for n, v in inode.xattrs],
    )


def inode_from_proto(msg: tree_pb2.Inode) -> Inode:
    """Decode and validate one inode."""
    kind = _KINDS.get(msg.kind)
    where = f"inode {msg.number}"
    if kind is None:
        raise FleetError(f"{where}: unknown kind {msg.kind}")
    if msg.mode & ~PERMISSION_BITS:
        raise FleetError(f"{where}: mode {msg.mode:o} has bits beyond 07777")
    xattrs = tuple((x.name, x.value) for x in msg.xattrs)
    if any(not name or b"\0" in name for name, _ in xattrs):
        raise FleetError(f"{where}: invalid extended attribute name")
    if any(a[0] >= b[0] for a, b in zip(xattrs, xattrs[1:], strict=False)):
        raise FleetError(f"{where}: extended attribute names not sorted or repeated")
    if kind == Kind.REGULAR:
        if msg.size and len(msg.hash) != HASH_SIZE:
            raise FleetError(f"{where}: regular file of {msg.size} bytes with a malformed hash")
        if not msg.size and msg.hash:
            raise FleetError(f"{where}: empty file with a hash")
        return Inode(kind, msg.mode, msg.uid, msg.gid, msg.mtime_ns, msg.size, msg.hash,
                     xattrs=xattrs)
    if msg.size or msg.hash:
        raise FleetError(f"{where}: a {kind.name.lower()} has no size or hash")
    if kind == Kind.DIRECTORY:
        return Inode(kind, msg.mode, msg.uid, msg.gid, xattrs=xattrs)
    if kind == Kind.SYMLINK:
        if not msg.symlink_target or b"\0" in msg.symlink_target:
            raise FleetError(f"{where}: invalid symlink target")
        return Inode(kind, 0o777, msg.uid, msg.gid, target=msg.symlink_target)
    rdev = msg.rdev if kind in DEVICE_KINDS else 0
    return Inode(kind, msg.mode, msg.uid, msg.gid, msg.mtime_ns, rdev=rdev, xattrs=xattrs)


def tree_from_proto(msg: tree_pb2.Tree) -> Tree:
    """Decode and validate a tree: a directory root, valid unique names, every
    entry naming a known inode, no directory reachable twice (no loops)."""
    inodes: dict[int, Inode] = {}
    for item in msg.inodes:
        if item.number == 0 or item.number in inodes:
            raise FleetError(f"tree: inode number {item.number} is zero or repeated")
        inodes[item.number] = inode_from_proto(item)
    root = inodes.get(msg.root)
    if root is None or root.kind != Kind.DIRECTORY:
        raise FleetError("tree: the root is missing or not a directory")
    children: dict[int, dict[str, int]] = {}
    for directory in msg.directories:
        where = f"tree: directory {directory.inode}"
        inode = inodes.get(directory.inode)
        if inode is None or inode.kind != Kind.DIRECTORY or directory.inode in children:
            raise FleetError(f"{where} is unknown, not a directory, or listed twice")
        kids: dict[str, int] = {}
        for entry in directory.entries:
            name = check_name(os.fsdecode(entry.name))
            if name in kids:
                raise FleetError(f"{where}: entry {name!r} repeated")
            if entry.inode not in inodes:
                raise FleetError(f"{where}: entry {name!r} names unknown inode {entry.inode}")
            kids[name] = entry.inode
        children[directory.inode] = kids
    for number, inode in inodes.items():
        if inode.kind == Kind.DIRECTORY:
            children.setdefault(number, {})
    parents: set[int] = set()
    for kids in children.values():
        for child in kids.values():
            if inodes[child].kind == Kind.DIRECTORY:
                if child == msg.root or child in parents:
                    raise FleetError(f"tree: directory inode {child} is linked twice")
                parents.add(child)
    check_reachable(msg.root, inodes, children)
    return Tree(msg.root, inodes, children)


def check_reachable(root: int, inodes: dict[int, Inode], children: dict[int, dict[str, int]]
                    ) -> None:
    """Refuse inodes the root does not reach (a detached directory cycle, say): they
    would be counted and fetched but never placed."""
    reached = {root}
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), {}).values():
            if child not in reached:
                reached.add(child)
                pending.append(child)
    stray = set(inodes) - reached
    if stray:
        raise FleetError(f"tree: inode {min(stray)} is not reachable from the root")


def image_to_proto(image: Image) -> imageserver_pb2.Image:
    """Encode an image (filter None stays absent: sparse)."""
    msg = imageserver_pb2.Image(
        name=image.name, tree=tree_to_proto(image.tree),
        triggers=[imageserver_pb2.Trigger(
            match_lines=t.match_lines, service=t.service, do_reload=t.do_reload,
            do_reboot=t.do_reboot, high_impact=t.high_impact) for t in image.triggers],
        computed_files=[imageserver_pb2.ComputedFile(path=c.path, source=c.source)
                        for c in image.computed_files],
        created_unix=image.created_unix, expires_unix=image.expires_unix,
    )
    if image.filter is not None:
        msg.filter.lines.extend(image.filter.lines)
    if image.signature is not None:
        msg.signature.CopyFrom(imageserver_pb2.Signature(
            key_name=image.signature.key_name, public_key=image.signature.public_key,
            signature=image.signature.signature))
    return msg


def signature_from_proto(name: str, msg: imageserver_pb2.Signature) -> ImageSignature:
    """Decode and check the shape of an image's signature (not whether it verifies)."""
    if not msg.key_name or len(msg.key_name) > 255 or not msg.key_name.isprintable():
        raise FleetError(f"image {name}: signature key name missing or not printable")
    if len(msg.public_key) != PUBLIC_KEY_SIZE or len(msg.signature) != SIGNATURE_SIZE:
        raise FleetError(f"image {name}: signature of key {msg.key_name} is malformed "
                         f"(a {PUBLIC_KEY_SIZE}-byte key and a {SIGNATURE_SIZE}-byte signature)")
    return ImageSignature(msg.key_name, msg.public_key, msg.signature)


def image_from_proto(msg: imageserver_pb2.Image) -> Image:
    """Decode and validate an image: name, tree, filter regexes, triggers."""
    name = check_image_name(msg.name)
    flt = Filter.from_lines(list(msg.filter.lines), f"image {name} filter") \
        if msg.HasField("filter") else None
    triggers = [make_trigger(t.match_lines, t.service, t.do_reload, t.do_reboot, t.high_impact)
                for t in msg.triggers]
    try:
        computed = [ComputedFile(check_clean_path(c.path), c.source) for c in msg.computed_files]
    except FleetError as err:
        raise FleetError(f"image {name}: computed file {err}") from None
    signature = signature_from_proto(name, msg.signature) if msg.HasField("signature") \
        else None
    return Image(name, tree_from_proto(msg.tree), flt, triggers, computed,
                 msg.created_unix, msg.expires_unix, signature)
